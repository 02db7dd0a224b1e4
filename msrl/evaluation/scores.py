"""Every evaluation number of one set of volumes, as flat records.

Each record says which metric, extractor, view (3d or a plane), class, real reference (the held-out
split by default, the training split beside it for FID), sample counts and 95 % interval it has: the
rows of metrics.json and of the tables in metrics.md and the report. Intervals resample volumes,
never slices (the slices of one volume are not independent; docs/design.md §5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from msrl.evaluation.extractors import FeatureExtractor
from msrl.evaluation.memorisation import memorisation_summary, nearest_distances
from msrl.evaluation.metrics import (
    Estimate,
    bootstrap_ci,
    bootstrap_mean_ci,
    fid,
    fid_from_samples,
    kid,
    mmd,
    ms_ssim_diversity,
)
from msrl.evaluation.utility import PREDICTION_METRICS, LabelledVolumes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
Features = dict[str, dict[str, torch.Tensor]]  # {extractor name: {view: [N·rows per volume, F]}}


def record(metric: str, estimate: Estimate | float, **fields: Any) -> dict[str, Any]:
    """One metrics.json row: metric name, value, 95 % interval, std (if any) and the fields that qualify it."""
    if isinstance(estimate, Estimate):
        value, ci, std = estimate.value, list(estimate.ci95), estimate.std
    else:
        value, ci, std = float(estimate), None, None
    return {"metric": metric, "value": value, "ci95": ci, "std": std, **fields}


def class_subsets(labels: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """{"all": None, "0": mask, "1": mask, …}: the pooled set and one subset per class present."""
    subsets: dict[str, torch.Tensor | None] = {"all": None}
    if labels is not None:
        for label in sorted(set(labels.tolist())):
            subsets[str(label)] = labels == label
    return subsets


def select_rows(features: torch.Tensor, mask: torch.Tensor | None, per_volume: int) -> torch.Tensor:
    """Rows of the volumes in `mask` (a volume owns `per_volume` consecutive rows)."""
    if mask is None:
        return features
    return features[mask.repeat_interleave(per_volume)]


class FeatureCache:
    """Features of every real reference set per extractor, computed once and reused for every source.

    Args:
        extractors: the feature extractors (the first is the primary one).
        references: {"test": volumes, "train": volumes, …}; the first is the primary reference.
        batch_size: volumes per forward pass.
    """

    def __init__(self, extractors: Sequence[FeatureExtractor], references: dict[str, LabelledVolumes],
                 batch_size: int = 8) -> None:
        names = [e.name for e in extractors]
        if len(set(names)) != len(names):
            raise ValueError(f"extractor names must be distinct, got {names}")
        self.extractors, self.references, self.batch_size = list(extractors), references, batch_size
        self.primary_reference = next(iter(references))
        self.real = {split: self.features(volumes.volumes) for split, volumes in references.items()}

    def features(self, volumes: torch.Tensor) -> Features:
        """Every extractor's features of `volumes`."""
        return {e.name: e.extract(volumes, self.batch_size) for e in self.extractors}


def main_view(features: dict[str, torch.Tensor]) -> str:
    """The view a summary uses: "3d" for a volume network, else a slice network's "pooled"."""
    return "3d" if "3d" in features else "pooled"


def distribution_records(cache: FeatureCache, generated: Features, labels: torch.Tensor, num_bootstrap: int = 50,
                         kid_subsets: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """FID, KID and MMD against the primary reference per extractor, view and class; FID against the others."""
    rows = []
    for reference, real_features in cache.real.items():
        primary = reference == cache.primary_reference
        real_labels = cache.references[reference].labels
        for extractor, views in real_features.items():
            for view, real_view in views.items():
                if not primary and view != main_view(views):
                    continue
                real_rows, generated_rows = len(real_view) // len(real_labels), \
                    len(generated[extractor][view]) // len(labels)
                for name, real_mask in class_subsets(real_labels).items():
                    generated_mask = None if name == "all" else labels == int(name)
                    if generated_mask is not None and not generated_mask.any():
                        continue
                    x = select_rows(real_view, real_mask, real_rows)
                    y = select_rows(generated[extractor][view], generated_mask, generated_rows)
                    if len(x) < 2 * real_rows or len(y) < 2 * generated_rows:
                        log.warning("skipping %s/%s class %s: fewer than 2 volumes", extractor, view, name)
                        continue
                    fields = {"extractor": extractor, "view": view, "class": name, "reference": reference,
                              "num_real": len(x) // real_rows, "num_generated": len(y) // generated_rows}
                    per_volume = {"real_per_volume": real_rows, "generated_per_volume": generated_rows}
                    interval = bootstrap_ci(x, y, fid_from_samples, num_bootstrap, seed, **per_volume)
                    rows.append(record("fid", Estimate(fid(x, y), interval), **fields))
                    if not primary:
                        continue
                    rows.append(record("kid", kid(x, y, num_subsets=kid_subsets, seed=seed, **per_volume), **fields))
                    statistic = partial(mmd, **per_volume)  # pairs of slices of one volume left out
                    interval = bootstrap_ci(x, y, statistic, num_bootstrap, seed, **per_volume)
                    rows.append(record("mmd", Estimate(statistic(x, y), interval), **fields))
    return rows


def diversity_records(volumes: torch.Tensor, num_pairs: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """MS-SSIM between random pairs of volumes (lower = more diverse)."""
    estimate = ms_ssim_diversity(volumes, num_pairs, seed)
    return [record("ms_ssim", estimate, extractor=None, view="3d", **{"class": "all"}, num_real=0,
                   num_generated=len(volumes), num_pairs=num_pairs)]


def utility_records(results: dict[str, Estimate], per_seed: list[dict[str, Any]], num_test: int,
                    num_train: int, train_set: str, seeds: Sequence[int],
                    test_labels: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Accuracy, balanced accuracy and AUROC on held-out real volumes: mean, t-interval over seeds, per seed.

    Where the runs carry each test volume's predicted class (`UtilityProtocol.test`) and the test
    labels are given, the accuracy and balanced-accuracy rows also keep `test_labels` and
    `per_test_volume` (predicted class per seed and test volume, in test-split order): a comparison
    of two sources then resamples test volumes (`paired_test_volumes`), not only seeds.
    """
    rows = []
    for name, estimate in results.items():
        fields: dict[str, Any] = {}
        if name in PREDICTION_METRICS and test_labels is not None and all("predicted" in run for run in per_seed):
            fields = {"test_labels": [int(v) for v in test_labels],
                      "per_test_volume": [[int(v) for v in run["predicted"]] for run in per_seed]}
        rows.append(record(f"utility/{name}", estimate, extractor=None, view="3d", train_set=train_set,
                           **{"class": "all"}, num_real=num_test, num_generated=num_train, seeds=list(seeds),
                           per_seed=[run[name] for run in per_seed], **fields))
    return rows


def reward_records(scores: dict[str, torch.Tensor], seed: int = 0) -> list[dict[str, Any]]:
    """The fine-tuned run's reward components (raw) on these volumes: mean with a bootstrap interval over volumes."""
    rows = []
    for component, values in scores.items():
        array = values.double().numpy()
        interval = bootstrap_mean_ci(array, seed=seed) if len(array) > 1 else (float("nan"), float("nan"))
        rows.append(record(f"reward_raw/{component}", Estimate(float(array.mean()), interval,
                                                               float(array.std(ddof=1)) if len(array) > 1 else 0.0),
                           extractor=None, view="3d", **{"class": "all"}, num_real=0, num_generated=len(array),
                           per_volume=[float(v) for v in array]))
    return rows


def memorisation_records(generated: Features, volumes: torch.Tensor, cache: FeatureCache, extractor: str,
                         train: str = "train") -> list[dict[str, Any]]:
    """Nearest training vs nearest held-out volume of every sample, in features and in voxels.

    The held-out set is the primary reference; the summary says how many samples are closer to a
    training volume than held-out real volumes are (docs/design.md §5).
    """
    heldout = cache.primary_reference
    if train not in cache.real or train == heldout:
        return []
    view = main_view(cache.real[train][extractor])
    spaces = {
        extractor: (generated[extractor][view], cache.real[train][extractor][view],
                    cache.real[heldout][extractor][view], len(volumes)),
        "voxels": (volumes.flatten(1).double(), cache.references[train].volumes.flatten(1).double(),
                   cache.references[heldout].volumes.flatten(1).double(), len(volumes)),
    }
    rows = []
    for space, (samples, train_rows, heldout_rows, count) in spaces.items():
        if len(samples) != count:  # slice features: one row per volume, the mean of its slices
            samples, train_rows, heldout_rows = (_per_volume_mean(t, n) for t, n in (
                (samples, count), (train_rows, len(cache.references[train].labels)),
                (heldout_rows, len(cache.references[heldout].labels))))
        distances = nearest_distances(samples, train_rows, heldout_rows)
        summary = memorisation_summary(distances)
        rows.append(record("memorisation/share_closer_than_heldout", float(summary["share_closer_than_heldout"]),
                           extractor=None if space == "voxels" else space, view="3d" if space == "voxels" else view,
                           **{"class": "all"}, reference=f"{train} vs {heldout}", num_real=len(train_rows),
                           num_generated=count, summary={k: _plain(v) for k, v in summary.items()},
                           per_volume={k: [float(x) for x in v] for k, v in distances.items()
                                       if len(v) == count}))
    return rows


def _per_volume_mean(rows: torch.Tensor, count: int) -> torch.Tensor:
    return rows.reshape(count, -1, rows.shape[-1]).mean(1)


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    return float(value) if isinstance(value, int | float) else value
