"""Lesion masks as ControlNet conditions: BraTS label codes → one-hot channels, pooled onto the latent grid.

The data modules serve `seg` [B, 1, S, S, S] with BraTS's codes (1 necrotic core, 2 oedema, 4 enhancing
tumour; 0 elsewhere): the template cohort draws its lesions with these codes (datamodules/template.py,
`SEG_LABELS`) and BraTS releases them. A ControlNet sees one channel per label, so codes that are not
ordinal (4 is not "twice" 2) do not become intensities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# BraTS's label codes and what they mean; a ControlNet's channel k holds the k-th label it was built with.
BRATS_LABELS: dict[int, str] = {1: "necrotic core", 2: "oedema", 4: "enhancing tumour"}
MASK_LABELS: tuple[int, ...] = tuple(BRATS_LABELS)


def check_mask_labels(labels: Sequence[int]) -> tuple[int, ...]:
    """The labels as a tuple, refused unless each is a distinct BraTS code (0, the background, is no channel)."""
    labels = tuple(int(label) for label in labels)
    unknown = [label for label in labels if label not in BRATS_LABELS]
    if not labels or unknown or len(set(labels)) != len(labels):
        raise ValueError(f"mask_labels {list(labels)} must be distinct BraTS labels from {sorted(BRATS_LABELS)} "
                         f"({BRATS_LABELS}); not allowed: {unknown or 'repeats or none'}")
    return labels


def label_channels(labels: Sequence[int]) -> list[dict[str, object]]:
    """What each condition channel holds: [{"channel": k, "label": code, "meaning": …}] (recorded in checkpoints)."""
    return [{"channel": index, "label": label, "meaning": BRATS_LABELS[label]}
            for index, label in enumerate(check_mask_labels(labels))]


def mask_channels(seg: torch.Tensor, labels: Sequence[int] = MASK_LABELS) -> torch.Tensor:
    """One-hot float channels [B, len(labels), S, S, S] of label maps `seg` [B, 1, S, S, S].

    Raises:
        ValueError: `seg` holds a value outside {0} ∪ `labels` (named, with its voxel count): a mask from
            another labelling would otherwise condition on silently dropped voxels.
    """
    labels = check_mask_labels(labels)
    if seg.ndim != 5 or seg.shape[1] != 1:
        raise ValueError(f"seg must be [B, 1, D, H, W] label maps, got shape {tuple(seg.shape)}")
    values, counts = torch.unique(seg, return_counts=True)
    unknown = {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)
               if v not in (0, *labels)}
    if unknown:
        raise ValueError(f"seg holds labels {sorted(unknown)} (voxels per label: {unknown}) outside 0 and the "
                         f"mask labels {list(labels)} ({ {label: BRATS_LABELS[label] for label in labels} })")
    return torch.cat([(seg == label) for label in labels], dim=1).float()


def pool_to(channels: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool one-hot channels [B, K, S, S, S] to [B, K, size, size, size]: each cell's label fractions.

    The fractions lie in [0, 1] and sum to at most 1 per cell (the rest is background).
    """
    side = channels.shape[-1]
    if side % size:
        raise ValueError(f"masks of side {side} cannot be pooled onto a {size}³ grid ({side} is not a multiple)")
    return F.avg_pool3d(channels, side // size) if side != size else channels
