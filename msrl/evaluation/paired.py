"""Paired comparison of two generators sampled with the same seeds (e.g. pretrained and fine-tuned).

Volume i of source `a` and volume i of source `b` come from the same initial noise, so much of
their sampling noise is shared. Comparing each source's interval with the other's ignores that and
calls real improvements "overlapping"; resampling the same volume indices for both and bootstrapping
the difference b − a cancels the shared noise (docs/design.md §7, paired statistics). Volumes are
resampled, never the slices of a 2D view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msrl.evaluation.metrics import bias_corrected_interval, mean_t_ci, volume_count, volume_rows

VERDICTS = ("better", "worse", "no difference")
Values = Sequence[float] | np.ndarray | torch.Tensor  # one number per volume or per seed


@dataclass
class PairedEstimate:
    """b − a with its 95 % interval, and whether b is better than a.

    Attributes:
        difference: value of b minus value of a (e.g. fine-tuned − pretrained).
        ci95: 95 % interval of the difference.
        verdict: "better" when the whole interval lies on b's good side of 0 (below 0 when lower is
            better), "worse" when it lies on the bad side, else "no difference".
        a: the metric's value for source a.
        b: the metric's value for source b.
        lower_is_better: whether a smaller value is better (FID, KID, MMD, distances to training data).
    """

    difference: float
    ci95: tuple[float, float]
    verdict: str
    a: float
    b: float
    lower_is_better: bool


def verdict(ci95: tuple[float, float], lower_is_better: bool) -> str:
    """"better", "worse" or "no difference" for an interval of b − a (a NaN interval decides nothing)."""
    low, high = ci95
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no difference"
    if high < 0 or low > 0:
        improves = high < 0 if lower_is_better else low > 0
        return "better" if improves else "worse"
    return "no difference"


def paired_bootstrap(real: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     statistic: Callable[[torch.Tensor, torch.Tensor], float], *, lower_is_better: bool = True,
                     num_resamples: int = 200, seed: int = 0, real_per_volume: int = 1,
                     generated_per_volume: int = 1) -> PairedEstimate:
    """Difference statistic(real, b) − statistic(real, a) of two same-seed sources, with a paired bootstrap interval.

    Args:
        real: real reference features [N·real_per_volume, F].
        a: features of source a [M·generated_per_volume, F]; row block i is volume i.
        b: features of source b, the same shape, volume i sampled with the same seed as a's volume i.
        statistic: a distribution distance such as `fid_from_samples`, `unbiased_mmd2` or `mmd`.
        lower_is_better: direction of the statistic, for the verdict.
        num_resamples: bootstrap resamples.
        seed: seed of the resampling.
        real_per_volume: feature rows per real volume (slices of a 2D view; 1 for 3D features).
        generated_per_volume: feature rows per generated volume.

    Each resample draws one set of generated volume indices used for both a and b (the pairing) and
    an independent resample of the real volumes shared by both terms (both were measured against the
    same real set). The interval is the bias-corrected percentile interval of the resampled
    differences (`bias_corrected_interval`, as for `bootstrap_ci`): repeating volumes inflates
    distances such as FID, and the shift keeps the interval on the estimate's scale; for a difference
    most of that inflation cancels, so the shift is small.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired sources need features of the same shape (volume i of a paired with volume i of "
                         f"b), got {tuple(a.shape)} and {tuple(b.shape)}")
    real_count = volume_count(real, real_per_volume, "real")
    generated_count = volume_count(a, generated_per_volume, "generated")
    value_a, value_b = statistic(real, a), statistic(real, b)
    generator = torch.Generator().manual_seed(seed)
    differences = []
    for _ in range(num_resamples):
        x = real[volume_rows(torch.randint(0, real_count, (real_count,), generator=generator), real_per_volume)]
        rows = volume_rows(torch.randint(0, generated_count, (generated_count,), generator=generator),
                           generated_per_volume)
        differences.append(statistic(x, b[rows]) - statistic(x, a[rows]))
    interval = bias_corrected_interval(np.asarray(differences), value_b - value_a)
    return PairedEstimate(value_b - value_a, interval, verdict(interval, lower_is_better), value_a, value_b,
                          lower_is_better)


def paired_per_volume(values_a: Values, values_b: Values, *, lower_is_better: bool,
                      num_resamples: int = 1000, seed: int = 0) -> PairedEstimate:
    """Mean of per-volume differences b_i − a_i (rewards, nearest-neighbour distances) with a bootstrap interval.

    The interval is the 2.5–97.5 percentile interval of the mean of resampled differences (the
    mean is unbiased under resampling, so no shift is needed).
    """
    a, b = _paired_arrays(values_a, values_b, minimum=2)
    differences = b - a
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (num_resamples, len(differences)))].mean(1)
    interval = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
    return PairedEstimate(float(differences.mean()), interval, verdict(interval, lower_is_better),
                          float(a.mean()), float(b.mean()), lower_is_better)


def paired_seeds(values_a: Values, values_b: Values, *, lower_is_better: bool) -> PairedEstimate:
    """Mean of per-seed differences b_s − a_s with a paired t interval (e.g. over the seeds of a study).

    Utility comparisons use `paired_test_volumes` (seeds and test volumes); this one remains for
    AUROC and for metrics.json files written before per-test-volume predictions were kept. With 2–5
    seeds a bootstrap has too few values; the interval is mean ± t₀.₉₇₅,ₙ₋₁ · sd / √n (`mean_t_ci`) of
    the differences. One seed gives a NaN interval and "no difference".
    """
    a, b = _paired_arrays(values_a, values_b, minimum=1)
    estimate = mean_t_ci(b - a)
    return PairedEstimate(estimate.value, estimate.ci95, verdict(estimate.ci95, lower_is_better),
                          float(a.mean()), float(b.mean()), lower_is_better)


def paired_test_volumes(labels: Values, predicted_a: Values, predicted_b: Values, *, balanced: bool,
                        num_resamples: int = 1000, seed: int = 0) -> PairedEstimate:
    """Accuracy (or balanced accuracy) of classifiers b − a on the same test volumes, with a bootstrap over them.

    Utility is a discrete measure on a few dozen held-out volumes: one volume is worth 1/N, and an
    interval over classifier seeds alone (`paired_seeds`) calls that a difference when the seeds
    agree, or gives none at one seed. Each resample draws test-volume indices, the same for a and b,
    stratified by class (as many volumes of each class as the test split has, so balanced accuracy
    always has every class and the split's composition stays fixed), and averages each source's
    score over its classifier seeds, so both seeds and test volumes count. The interval is the plain
    2.5–97.5 percentile interval: a (class-)mean is unbiased under this resampling, and the bias shift
    of `bias_corrected_interval` would move a boundary lying at exactly 0 off 0 by Monte-Carlo noise.

    Args:
        labels: true class of each test volume [N].
        predicted_a: predicted class per classifier seed and test volume of source a [S, N].
        predicted_b: the same for source b [S, N], seed s and volume i as a's.
        balanced: balanced accuracy (mean recall over the classes present) instead of accuracy.
        num_resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    truth = np.asarray(labels, dtype=np.int64)
    a, b = np.asarray(predicted_a, dtype=np.int64), np.asarray(predicted_b, dtype=np.int64)
    if truth.ndim != 1 or a.ndim != 2 or a.shape != b.shape or a.shape[1] != len(truth) or len(truth) < 2:
        raise ValueError(f"paired test volumes need labels [N] and predictions [S, N] of the same shape for both "
                         f"sources, got {truth.shape}, {a.shape} and {b.shape}")
    order = np.argsort(truth, kind="stable")  # class blocks: each resample keeps every class's count
    counts = np.unique(truth, return_counts=True)[1]
    starts = np.concatenate([[0], np.cumsum(counts)])
    rng = np.random.default_rng(seed)
    draws = np.concatenate([order[start + rng.integers(0, count, (num_resamples, count))]
                            for start, count in zip(starts[:-1], counts, strict=True)], axis=1)  # [R, N]
    blocks = [slice(start, end) for start, end in zip(starts[:-1], starts[1:], strict=True)]
    correct_a, correct_b = (a == truth).astype(np.float64), (b == truth).astype(np.float64)
    value_a = _seed_mean_score(correct_a[:, order], blocks, balanced)
    value_b = _seed_mean_score(correct_b[:, order], blocks, balanced)
    differences = (_seed_mean_score(correct_b[:, draws], blocks, balanced)
                   - _seed_mean_score(correct_a[:, draws], blocks, balanced))
    interval = (float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5)))
    return PairedEstimate(float(value_b - value_a), interval, verdict(interval, lower_is_better=False),
                          float(value_a), float(value_b), False)


def _seed_mean_score(correct: np.ndarray, blocks: list[slice], balanced: bool) -> np.ndarray:
    """Accuracy of `correct` [S, ..., N] (volumes sorted by class, `blocks` per class), averaged over seeds (axis 0)."""
    if balanced:
        return np.stack([correct[..., block].mean(-1) for block in blocks], -1).mean(-1).mean(0)
    return correct.mean(-1).mean(0)


def _paired_arrays(values_a: Values, values_b: Values, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < minimum:
        raise ValueError(f"paired values need two 1-D lists of the same length (at least {minimum}), got shapes "
                         f"{a.shape} and {b.shape}")
    return a, b
