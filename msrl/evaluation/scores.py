"""Every evaluation number for one set of generated volumes against the real reference.

`metric_records` returns a flat list of records, one per number, each saying which metric,
extractor, view (3d or a plane), class, sample counts and 95 % interval it has: the rows of
metrics.json and of the tables in metrics.md and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from msrl.evaluation.extractors import FeatureExtractor
from msrl.evaluation.metrics import Estimate, bootstrap_ci, fid, fid_from_samples, kid, mmd, ms_ssim_diversity
from msrl.evaluation.utility import LabelledVolumes, UtilityProtocol

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


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


class FeatureCache:
    """Features of the real reference per extractor, computed once and reused for every source."""

    def __init__(self, extractors: Sequence[FeatureExtractor], real: LabelledVolumes, batch_size: int = 8) -> None:
        names = [e.name for e in extractors]
        if len(set(names)) != len(names):
            raise ValueError(f"extractor names must be distinct, got {names}")
        self.extractors, self.real, self.batch_size = list(extractors), real, batch_size
        self.real_features = {e.name: e.extract(real.volumes, batch_size) for e in self.extractors}


def distribution_records(cache: FeatureCache, generated: LabelledVolumes, num_bootstrap: int = 50,
                         kid_subsets: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """FID (with bootstrap CI), KID (mean ± std over subsets) and MMD per extractor, view and class."""
    rows = []
    real_labels = cache.real.labels
    for extractor in cache.extractors:
        generated_features = extractor.extract(generated.volumes, cache.batch_size)
        for view, real_view in cache.real_features[extractor.name].items():
            generated_view = generated_features[view]
            per_volume_real = len(real_view) // len(real_labels)  # slices per volume for 2D views, else 1
            per_volume_generated = len(generated_view) // len(generated.labels)
            for name, real_mask in class_subsets(real_labels).items():
                if name != "all" and not (generated.labels == int(name)).any():
                    continue
                x = _select(real_view, real_mask, per_volume_real)
                y = _select(generated_view, None if name == "all" else generated.labels == int(name),
                            per_volume_generated)
                if len(x) < 2 or len(y) < 2:
                    log.warning("skipping %s/%s class %s: fewer than 2 feature vectors", extractor.name, view, name)
                    continue
                fields = {"extractor": extractor.name, "view": view, "class": name, "num_real": len(x),
                          "num_generated": len(y)}
                value = fid(x, y)
                interval = bootstrap_ci(x, y, fid_from_samples, num_bootstrap, seed)
                rows.append(record("fid", Estimate(value, interval), **fields))
                rows.append(record("kid", kid(x, y, num_subsets=kid_subsets, seed=seed), **fields))
                rows.append(record("mmd", Estimate(mmd(x, y), bootstrap_ci(x, y, mmd, num_bootstrap, seed)),
                                   **fields))
    return rows


def diversity_records(volumes: torch.Tensor, num_pairs: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """MS-SSIM between random pairs of volumes (lower = more diverse)."""
    estimate = ms_ssim_diversity(volumes, num_pairs, seed)
    return [record("ms_ssim", estimate, extractor=None, view="3d", **{"class": "all"}, num_real=0,
                   num_generated=len(volumes), num_pairs=num_pairs)]


def utility_records(protocol: UtilityProtocol, train: LabelledVolumes, test: LabelledVolumes, num_classes: int,
                    train_set: str) -> list[dict[str, Any]]:
    """Accuracy, balanced accuracy and AUROC on held-out real volumes, mean ± std over the protocol's seeds."""
    results = protocol.evaluate(train, test, num_classes)
    return [record(f"utility/{name}", estimate, extractor=None, view="3d", train_set=train_set,
                   **{"class": "all"}, num_real=len(test.labels), num_generated=len(train.labels),
                   seeds=list(protocol.seeds))
            for name, estimate in results.items()]


def _select(features: torch.Tensor, mask: torch.Tensor | None, per_volume: int) -> torch.Tensor:
    """Rows of the volumes in `mask` (a volume owns `per_volume` consecutive rows)."""
    if mask is None:
        return features
    return features[mask.repeat_interleave(per_volume)]
