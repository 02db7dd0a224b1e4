"""Paired comparisons: candidate − baseline for every metric, with a 95 % interval and a verdict.

Two checkpoints sampled with the same seeds and the same sampler are paired volume by volume (the
same starting noise). A paired bootstrap draws one set of volume indices for both and an independent
resample of the real reference, so the interval of the difference is much narrower than the
difference of two independent intervals (docs/design.md §5). Utility accuracy and balanced accuracy
pair test volumes and classifier seeds (a bootstrap over the held-out test volumes, averaged over
seeds); utility AUROC and segmentation Dice pair classifier (segmenter) seeds (and synthetic draws)
with a t-interval; rewards, class fidelity and mask fidelity pair volumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from msrl.evaluation.metrics import fid_from_samples, mmd, polynomial_kernel, unbiased_mmd2
from msrl.evaluation.paired import (
    PairedEstimate,
    paired_bootstrap,
    paired_per_volume,
    paired_seeds,
    paired_test_volumes,
)
from msrl.evaluation.scores import FeatureCache, Features, class_subsets, main_view, select_rows

HIGHER_IS_BETTER_PREFIXES = ("utility/", "reward_raw/", "class_fidelity/", "segmentation/", "mask_fidelity/")


def distribution_statistics(real_rows: int, generated_rows: int
                            ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], float]]:
    """FID, KID's unbiased MMD² and MMD on feature rows; pairs of rows of one volume (slices) left out."""
    return {"fid": fid_from_samples,
            "kid": lambda x, y: unbiased_mmd2(x, y, polynomial_kernel, real_rows, generated_rows),
            "mmd": lambda x, y: mmd(x, y, real_rows, generated_rows)}



def comparison_record(metric: str, estimate: PairedEstimate, **fields: Any) -> dict[str, Any]:
    """One row of a comparison: the difference, its interval, the verdict and both values."""
    return {"metric": metric, "difference": estimate.difference, "ci95": list(estimate.ci95),
            "verdict": estimate.verdict, "baseline": estimate.a, "candidate": estimate.b,
            "lower_is_better": estimate.lower_is_better, **fields}


def paired_distribution(cache: FeatureCache, baseline: Features, candidate: Features, labels: torch.Tensor,
                        num_resamples: int, seed: int) -> list[dict[str, Any]]:
    """FID, KID and MMD differences per extractor (its main view) and class, against the primary reference."""
    reference = cache.primary_reference
    real_labels = cache.references[reference].labels
    rows = []
    for extractor, views in cache.real[reference].items():
        view = main_view(views)
        real_rows = len(views[view]) // len(real_labels)
        generated_rows = len(baseline[extractor][view]) // len(labels)
        for name, real_mask in class_subsets(real_labels).items():
            mask = None if name == "all" else labels == int(name)
            if mask is not None and int(mask.sum()) < 2:
                continue
            x = select_rows(views[view], real_mask, real_rows)
            if len(x) < 2 * real_rows:  # a Gaussian fit needs two real volumes
                continue
            a = select_rows(baseline[extractor][view], mask, generated_rows)
            b = select_rows(candidate[extractor][view], mask, generated_rows)
            for metric, statistic in distribution_statistics(real_rows, generated_rows).items():
                estimate = paired_bootstrap(x, a, b, statistic, lower_is_better=True, num_resamples=num_resamples,
                                            seed=seed, real_per_volume=real_rows, generated_per_volume=generated_rows)
                rows.append(comparison_record(metric, estimate, extractor=extractor, view=view, reference=reference,
                                              **{"class": name}, num_volumes=len(a) // generated_rows))
    return rows


def paired_records(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]], num_resamples: int,
                   seed: int) -> list[dict[str, Any]]:
    """Differences of the per-volume and per-seed records both entries have (rewards, class fidelity, utility).

    Utility accuracy and balanced accuracy with each test volume's prediction get a paired bootstrap
    over the test volumes, averaged over classifier seeds (`paired_test_volumes`, one seed or
    several): a discrete measure differs only beyond the test volumes' sampling. Utility AUROC, and
    rows of metrics.json files written without predictions, keep the t-interval over classifier
    seeds (two or more seeds; one seed gives no comparison).
    """
    rows = []
    by_key = {_key(row): row for row in baseline}
    for row in candidate:
        other = by_key.get(_key(row))
        if other is None:
            continue
        lower = not row["metric"].startswith(HIGHER_IS_BETTER_PREFIXES)
        if "per_test_volume" in row and "per_test_volume" in other:
            estimate = paired_utility(other, row, num_resamples, seed)
            fields = {"num_volumes": len(row["test_labels"]), "num_seeds": len(row["per_test_volume"]),
                      "train_set": row.get("train_set")}
        elif "per_seed" in row and len(row["per_seed"]) >= 2:
            estimate = paired_seeds(other["per_seed"], row["per_seed"], lower_is_better=lower)
            fields = {"num_seeds": len(row["per_seed"]), "train_set": row.get("train_set")}
        elif isinstance(row.get("per_volume"), list) and len(row["per_volume"]) >= 2:
            if row.get("volumes") != other.get("volumes"):  # mask fidelity: the volumes whose mask has the label
                raise ValueError(f"{row['metric']} (label {row.get('label')}): the two sources judged different "
                                 "volumes; a paired comparison needs samples drawn from the same masks")
            estimate = paired_per_volume(other["per_volume"], row["per_volume"], lower_is_better=lower,
                                         num_resamples=num_resamples, seed=seed)
            fields = {"num_volumes": len(row["per_volume"]), "train_set": row.get("train_set")}
        else:
            continue
        if "label" in row:  # segmentation and mask fidelity: one row per label and the whole tumour
            fields["label"] = row["label"]
        rows.append(comparison_record(row["metric"], estimate, extractor=row.get("extractor"), view=row["view"],
                                      **{"class": row["class"]}, **fields))
    return rows


def paired_utility(baseline: dict[str, Any], candidate: dict[str, Any], num_resamples: int,
                   seed: int) -> PairedEstimate:
    """Candidate − baseline of a utility accuracy row, bootstrapping test volumes (see `paired_test_volumes`).

    Both rows must hold the same test labels and classifier seeds: the pairing is volume i and seed s.
    """
    where = f"{candidate['metric']} ({candidate.get('train_set')})"
    if baseline["test_labels"] != candidate["test_labels"]:
        raise ValueError(f"{where}: the two sources were tested on different test volumes; a paired comparison "
                         "needs the same test split in the same order")
    if baseline.get("seeds") != candidate.get("seeds"):
        raise ValueError(f"{where}: classifier seeds differ ({baseline.get('seeds')} vs {candidate.get('seeds')}); "
                         "a paired comparison needs the same utility seeds")
    balanced = {"utility/accuracy": False, "utility/balanced_accuracy": True}.get(candidate["metric"])
    if balanced is None:
        raise ValueError(f"{where}: per-test-volume predictions give accuracy or balanced accuracy, not "
                         f"{candidate['metric']}")
    return paired_test_volumes(candidate["test_labels"], baseline["per_test_volume"], candidate["per_test_volume"],
                               balanced=balanced, num_resamples=num_resamples, seed=seed)


def beyond_interval(comparison: dict[str, Any]) -> list[str]:
    """Plain sentences for every difference whose 95 % interval excludes 0."""
    sentences = []
    for row in comparison["records"]:
        if row["verdict"] == "no difference":
            continue
        label = f"label {row['label']}" if row.get("label") else None
        where = ", ".join(str(v) for v in (row.get("extractor"), row.get("train_set"), label, f"class {row['class']}")
                          if v)
        sentences.append(f"{row['metric']} ({where}): {row['verdict']}, {comparison['candidate']} − "
                         f"{comparison['baseline']} = {row['difference']:.3g} [{row['ci95'][0]:.3g}, "
                         f"{row['ci95'][1]:.3g}]")
    return sentences


def _key(row: dict[str, Any]) -> tuple:
    return row["metric"], row.get("extractor"), row["view"], row["class"], row.get("train_set"), row.get("label")
