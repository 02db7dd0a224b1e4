"""Memorisation check: are generated volumes closer to training volumes than new real volumes are?

A reward learned from the training split (a critic) can pull samples towards the training volumes
(docs/design.md §7, memorisation). For each generated sample we measure the Euclidean distance to
its nearest training vector and to its nearest held-out vector, and, as the reference, how close
each genuinely new real volume (the held-out split) lies to the training set. Vectors are flattened
features [N, F] or voxels [N, C, D, H, W]; distances are computed in chunks so that a hundred 64³
volumes fit in little memory.
"""

from __future__ import annotations

from typing import Any

import torch


def nearest_distances(generated: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor,
                      chunk_size: int = 16) -> dict[str, torch.Tensor]:
    """Nearest-neighbour Euclidean distances between generated, training and held-out vectors.

    Args:
        generated: generated samples [G, ...] (features or volumes, flattened per sample).
        train: training-split vectors [N, ...] of the same per-sample shape.
        heldout: held-out real vectors [H, ...] of the same per-sample shape.
        chunk_size: query vectors compared at once (memory ~ chunk_size × N distances).

    Returns:
        "generated_to_train" [G]: each sample's distance to its nearest training vector;
        "generated_to_heldout" [G]: to its nearest held-out vector;
        "heldout_to_train" [H]: each held-out vector's distance to its nearest training vector;
        "nearest_train_index" [G]: which training vector is nearest to each sample (for figures).
    """
    sets = {"generated": generated, "train": train, "heldout": heldout}
    shapes = {name: tuple(tensor.shape[1:]) for name, tensor in sets.items()}
    if len(set(shapes.values())) != 1 or any(t.ndim < 2 for t in sets.values()):
        raise ValueError("generated, train and heldout must be [N, ...] with the same per-sample shape, got "
                         + ", ".join(f"{name} {tuple(t.shape)}" for name, t in sets.items()))
    if any(len(t) == 0 for t in sets.values()):
        raise ValueError(f"need at least one vector in each set, got sizes {[len(t) for t in sets.values()]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    flat = {name: _flatten(tensor) for name, tensor in sets.items()}
    to_train, index = _nearest(flat["generated"], flat["train"], chunk_size)
    to_heldout, _ = _nearest(flat["generated"], flat["heldout"], chunk_size)
    heldout_to_train, _ = _nearest(flat["heldout"], flat["train"], chunk_size)
    return {"generated_to_train": to_train, "generated_to_heldout": to_heldout,
            "heldout_to_train": heldout_to_train, "nearest_train_index": index}


def memorisation_summary(distances: dict[str, torch.Tensor], quantile: float = 0.05) -> dict[str, Any]:
    """How many samples sit closer to a training volume than held-out real volumes do.

    `share_closer_than_heldout` is the share of samples closer to a training volume than held-out
    real volumes are: the threshold is the `quantile` (5 % by default) of the held-out volumes'
    distances to their nearest training volume, and a sample counts when its own nearest-training
    distance is below it. A model that generalises makes new volumes like the held-out ones, so the
    share is about `quantile`; a model that copies training volumes gives a share near 1.
    `median_ratio_train_to_heldout` is the median over samples of d(nearest train) / d(nearest
    held-out): below 1 means closer to the training set; it also depends on the two splits' sizes
    (a larger set has nearer neighbours), so compare it between models, not with 1.

    Returns:
        plain numbers for metrics.json: share_closer_than_heldout, threshold, quantile,
        median_ratio_train_to_heldout, median_generated_to_train, median_heldout_to_train,
        num_generated, num_heldout.
    """
    missing = {"generated_to_train", "generated_to_heldout", "heldout_to_train"} - set(distances)
    if missing:
        raise ValueError(f"distances lack {sorted(missing)}: pass the dict nearest_distances returns")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    to_train = distances["generated_to_train"].double()
    to_heldout = distances["generated_to_heldout"].double()
    reference = distances["heldout_to_train"].double()
    threshold = float(torch.quantile(reference, quantile))
    ratio = to_train / to_heldout.clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "share_closer_than_heldout": float((to_train < threshold).double().mean()),
        "threshold": threshold,
        "quantile": quantile,
        "median_ratio_train_to_heldout": float(ratio.median()),
        "median_generated_to_train": float(to_train.median()),
        "median_heldout_to_train": float(reference.median()),
        "num_generated": len(to_train),
        "num_heldout": len(reference),
    }


def _flatten(tensor: torch.Tensor) -> torch.Tensor:
    """[N, ...] → [N, D], at least float32 (float64 stays float64)."""
    return tensor.reshape(len(tensor), -1).to(torch.promote_types(tensor.dtype, torch.float32))


def _nearest(queries: torch.Tensor, references: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance [Q] from each query to its nearest reference, and that reference's index [Q].

    Differences are summed directly (not |x|² + |y|² − 2x·y, which loses the small distances of
    near-copies to cancellation in float32), `chunk_size` queries at a time.
    """
    dtype = torch.promote_types(queries.dtype, references.dtype)
    references = references.to(dtype)
    values, indices = [], []
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start : start + chunk_size].to(dtype)
        distance = torch.cdist(chunk, references, compute_mode="donot_use_mm_for_euclid_dist")
        value, index = distance.min(1)
        values.append(value)
        indices.append(index)
    return torch.cat(values), torch.cat(indices)
