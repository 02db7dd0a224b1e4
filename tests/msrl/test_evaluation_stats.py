"""Statistics of the evaluation: MMD over all rows, volume bootstrap, KID interval, t intervals, paired
comparisons (evaluation/paired.py) and the memorisation check (evaluation/memorisation.py)."""

import numpy as np
import pytest
import scipy.stats
import torch
from monai.metrics import MMDMetric

from msrl.evaluation.memorisation import memorisation_summary, nearest_distances
from msrl.evaluation.metrics import (
    bootstrap_ci,
    bootstrap_mean_ci,
    fid_from_samples,
    kid,
    linear_kernel,
    mean_std_ci,
    mean_t_ci,
    mmd,
    polynomial_kernel,
    unbiased_mmd2,
)
from msrl.evaluation.paired import paired_bootstrap, paired_per_volume, paired_seeds


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _squared_mean_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    """A statistic that repeating every row the same number of times leaves unchanged."""
    return float((x.mean(0) - y.mean(0)).square().sum())


def _width(interval: tuple[float, float]) -> float:
    return interval[1] - interval[0]


# --- MMD over all rows ---------------------------------------------------------------------------------------------

def test_mmd_uses_every_real_row_not_the_first_class() -> None:
    # the real set is ordered by class (A then B) and longer than the generated set, which mixes both
    real = torch.cat([_randn(30, 4, seed=0), _randn(30, 4, seed=1) + 2.0])
    generated = torch.cat([_randn(10, 4, seed=2), _randn(10, 4, seed=3) + 2.0])
    x, y = real.numpy(), generated.numpy()
    explicit = ((x @ x.T).sum() - (x * x).sum()) / (60 * 59) + ((y @ y.T).sum() - (y * y).sum()) / (20 * 19) \
        - 2 * (x @ y.T).mean()
    first_rows = float(MMDMetric()(real[:20], generated))  # the former value: class A only
    assert mmd(real, generated) == pytest.approx(explicit, rel=1e-9)
    assert mmd(real, generated) == pytest.approx(unbiased_mmd2(real, generated, linear_kernel), rel=1e-9)
    assert abs(mmd(real, generated)) < 0.5 < first_rows - 2  # same mixture: near 0; class A alone: far


def test_mmd_equals_monai_for_equal_sizes() -> None:
    real, generated = _randn(25, 6, seed=4), _randn(25, 6, seed=5) * 1.5 + 0.3
    assert mmd(real, generated) == pytest.approx(float(MMDMetric()(real, generated)), rel=1e-9)


def test_pairs_of_slices_of_one_volume_are_left_out_like_the_diagonal() -> None:
    volumes_x, volumes_y = _randn(12, 5, seed=30), _randn(15, 5, seed=31) + 0.2
    slices_x, slices_y = volumes_x.repeat_interleave(4, 0), volumes_y.repeat_interleave(3, 0)  # identical slices
    for statistic in (mmd, lambda x, y, *p: unbiased_mmd2(x, y, polynomial_kernel, *p)):
        assert statistic(slices_x, slices_y, 4, 3) == pytest.approx(statistic(volumes_x, volumes_y), rel=1e-9)
        assert statistic(slices_x, slices_y) != pytest.approx(statistic(volumes_x, volumes_y), rel=0.05)
    different_slices = _randn(48, 5, seed=32)
    assert mmd(different_slices, slices_y, 4, 3) == pytest.approx(
        unbiased_mmd2(different_slices, slices_y, linear_kernel, 4, 3), rel=1e-9)


# --- bootstrap over volumes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("statistic", [_squared_mean_difference, fid_from_samples, mmd])
def test_bootstrap_resamples_volumes_so_repeated_slices_do_not_shrink_the_interval(statistic) -> None:
    volumes_x, volumes_y = _randn(12, 4, seed=6), _randn(10, 4, seed=7) + 0.3
    rows_x, rows_y = volumes_x.repeat_interleave(6, 0), volumes_y.repeat_interleave(6, 0)  # 6 identical slices
    one_row = bootstrap_ci(volumes_x, volumes_y, statistic, 100, seed=1)
    by_volume = bootstrap_ci(rows_x, rows_y, statistic, 100, seed=1, real_per_volume=6, generated_per_volume=6)
    by_row = bootstrap_ci(rows_x, rows_y, statistic, 100, seed=1)
    assert _width(by_volume) >= 0.9 * _width(one_row)
    assert _width(by_row) < 0.7 * _width(one_row)  # what resampling slices did (≈ 1/√6 on average)
    if statistic is _squared_mean_difference:  # the same volume draws give the same values
        assert by_volume == pytest.approx(one_row, rel=1e-9)


def test_rows_that_are_not_whole_volumes_are_refused() -> None:
    with pytest.raises(ValueError, match="per_volume=4"):
        bootstrap_ci(_randn(10, 3, seed=0), _randn(8, 3, seed=1), mmd, 5, real_per_volume=4)


# --- KID -----------------------------------------------------------------------------------------------------------

def test_kid_interval_is_a_bootstrap_of_the_value() -> None:
    same = kid(_randn(60, 8, seed=8), _randn(60, 8, seed=9), num_subsets=50)
    different = kid(_randn(60, 8, seed=10), _randn(60, 8, seed=11) + 0.7, num_subsets=50)
    assert same.ci95[0] < 0 < same.ci95[1] and same.ci95[0] < same.value < same.ci95[1]
    assert different.ci95[0] > 0 and different.ci95[0] < different.value < different.ci95[1]
    # not the spread of subset values (the former interval): with one subset there is no spread, still an interval
    single = kid(_randn(60, 8, seed=10), _randn(60, 8, seed=11) + 0.7, num_subsets=1)
    assert single.std == 0.0 and single.ci95[0] < single.value < single.ci95[1]


def test_kid_subset_mean_estimates_the_full_unbiased_mmd2() -> None:
    x, y = _randn(20, 4, seed=12), _randn(20, 4, seed=13) + 0.3
    assert kid(x, y, num_subsets=4000, num_resamples=2).value == pytest.approx(unbiased_mmd2(x, y), rel=0.05)


def test_kid_with_identical_slices_per_volume_equals_kid_of_the_volumes() -> None:
    x, y = _randn(16, 4, seed=14), _randn(14, 4, seed=15) + 0.5
    volumes = kid(x, y, num_subsets=20, num_resamples=30)
    slices = kid(x.repeat_interleave(5, 0), y.repeat_interleave(5, 0), num_subsets=20, num_resamples=30,
                 real_per_volume=5, generated_per_volume=5)
    assert slices.value == pytest.approx(volumes.value, rel=1e-9)
    assert slices.ci95 == pytest.approx(volumes.ci95, rel=1e-9) and slices.std == pytest.approx(volumes.std)


# --- t intervals ---------------------------------------------------------------------------------------------------

def test_mean_t_ci_uses_the_t_quantile() -> None:
    estimate = mean_t_ci([1.0, 2.0, 3.0])
    expected = scipy.stats.t.interval(0.95, 2, loc=2.0, scale=1.0 / np.sqrt(3))
    assert estimate.value == 2.0 and estimate.std == pytest.approx(1.0)
    assert estimate.ci95 == pytest.approx(expected) and estimate.ci95[1] - 2.0 == pytest.approx(2.484, abs=1e-3)
    assert mean_std_ci([1.0, 2.0, 3.0]) == estimate
    single = mean_t_ci([0.7])
    assert single.value == 0.7 and np.isnan(single.ci95).all() and np.isnan(single.std)
    with pytest.raises(ValueError, match="non-empty"):
        mean_t_ci([])


# --- paired comparisons --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("statistic", [fid_from_samples, unbiased_mmd2, mmd])
def test_paired_bootstrap_finds_the_better_source_with_slices(statistic) -> None:
    per_volume = 3  # a 2D view: 3 slice rows per volume
    real = _randn(30 * per_volume, 6, seed=16)
    a = _randn(20 * per_volume, 6, seed=17) + 0.8  # shifted
    b = _randn(20 * per_volume, 6, seed=18)  # from the real distribution
    result = paired_bootstrap(real, a, b, statistic, num_resamples=60, seed=3, real_per_volume=per_volume,
                              generated_per_volume=per_volume)
    assert result.difference == pytest.approx(result.b - result.a) and result.difference < 0
    assert result.ci95[1] < 0 and result.verdict == "better"
    reverse = paired_bootstrap(real, b, a, statistic, num_resamples=60, seed=3, real_per_volume=per_volume,
                               generated_per_volume=per_volume)
    assert reverse.verdict == "worse"
    higher_is_better = paired_bootstrap(real, a, b, statistic, lower_is_better=False, num_resamples=60, seed=3,
                                        real_per_volume=per_volume, generated_per_volume=per_volume)
    assert higher_is_better.verdict == "worse"


def test_identical_sources_differ_by_nothing() -> None:
    real, a = _randn(20, 4, seed=19), _randn(16, 4, seed=20) + 0.2
    result = paired_bootstrap(real, a, a.clone(), fid_from_samples, num_resamples=30)
    assert result.difference == 0 and result.ci95 == (0.0, 0.0) and result.verdict == "no difference"
    assert paired_per_volume(a[:, 0], a[:, 0], lower_is_better=True).verdict == "no difference"


def test_pairing_cancels_shared_sampling_noise() -> None:
    # b is a with a small constant improvement: the same seeds, so the same per-volume noise
    real, noise = _randn(40, 4, seed=21), _randn(40, 4, seed=22)
    a, b = noise + 0.5, noise + 0.4
    paired = paired_bootstrap(real, a, b, mmd, num_resamples=100, seed=4)
    alone_a, alone_b = bootstrap_ci(real, a, mmd, 100, seed=4), bootstrap_ci(real, b, mmd, 100, seed=5)
    assert paired.ci95[1] < 0 and paired.verdict == "better"
    assert alone_a[0] < alone_b[1]  # unpaired intervals overlap

    values_a = _randn(30, seed=23)
    values_b = values_a - 0.1 + 0.02 * _randn(30, seed=24)
    per_volume = paired_per_volume(values_a, values_b, lower_is_better=True, seed=1)
    assert per_volume.ci95[1] < 0 and per_volume.verdict == "better"
    assert per_volume.difference == pytest.approx(float((values_b - values_a).mean()))
    interval_a, interval_b = bootstrap_mean_ci(values_a.numpy()), bootstrap_mean_ci(values_b.numpy())
    assert interval_a[0] < interval_b[1]


def test_paired_comparisons_are_deterministic_under_a_seed() -> None:
    real, a, b = _randn(20, 4, seed=25), _randn(12, 4, seed=26) + 0.3, _randn(12, 4, seed=27)
    first = paired_bootstrap(real, a, b, fid_from_samples, num_resamples=40, seed=7)
    assert paired_bootstrap(real, a, b, fid_from_samples, num_resamples=40, seed=7) == first
    assert paired_bootstrap(real, a, b, fid_from_samples, num_resamples=40, seed=8).ci95 != first.ci95
    values_a, values_b = a[:, 0], b[:, 0]
    assert paired_per_volume(values_a, values_b, lower_is_better=True, seed=2) == \
        paired_per_volume(values_a, values_b, lower_is_better=True, seed=2)


def test_paired_seeds_uses_a_paired_t_interval() -> None:
    a, b = [0.70, 0.74, 0.66], [0.78, 0.83, 0.75]  # utility over three classifier seeds, higher is better
    result = paired_seeds(a, b, lower_is_better=False)
    differences = np.subtract(b, a)
    expected = scipy.stats.t.interval(0.95, 2, loc=differences.mean(), scale=differences.std(ddof=1) / np.sqrt(3))
    assert result.difference == pytest.approx(differences.mean()) and result.ci95 == pytest.approx(expected)
    assert result.verdict == "better"  # the unpaired t intervals of a and b overlap
    assert mean_t_ci(a).ci95[1] > mean_t_ci(b).ci95[0]
    assert paired_seeds([0.7], [0.8], lower_is_better=False).verdict == "no difference"


def test_paired_inputs_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(_randn(10, 3, seed=0), _randn(8, 3, seed=1), _randn(9, 3, seed=2), mmd)
    with pytest.raises(ValueError, match="same length"):
        paired_per_volume([1.0, 2.0], [1.0, 2.0, 3.0], lower_is_better=True)


# --- memorisation --------------------------------------------------------------------------------------------------

def _volumes(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_copies_of_training_volumes_are_flagged() -> None:
    train, heldout = _volumes(40, 0), _volumes(40, 1)
    copies = train[:30] + 0.001 * _volumes(30, 2)
    distances = nearest_distances(copies, train, heldout, chunk_size=7)
    summary = memorisation_summary(distances)
    assert summary["share_closer_than_heldout"] == 1.0
    assert torch.equal(distances["nearest_train_index"], torch.arange(30))
    assert summary["median_ratio_train_to_heldout"] < 0.01
    assert summary["num_generated"] == 30 and summary["num_heldout"] == 40


def test_new_volumes_from_the_same_distribution_are_not_flagged() -> None:
    train, heldout, fresh = _volumes(40, 3), _volumes(40, 4), _volumes(60, 5)
    distances = nearest_distances(fresh, train, heldout)
    summary = memorisation_summary(distances, quantile=0.05)
    assert summary["share_closer_than_heldout"] <= 0.3
    assert summary["threshold"] == pytest.approx(float(torch.quantile(distances["heldout_to_train"].double(), 0.05)))


def test_chunked_distances_equal_the_full_matrix() -> None:
    generated, train, heldout = _randn(9, 50, seed=6), _randn(11, 50, seed=7), _randn(5, 50, seed=8)
    distances = nearest_distances(generated, train, heldout, chunk_size=2)
    assert torch.allclose(distances["generated_to_train"], torch.cdist(generated, train).min(1).values)
    assert torch.allclose(distances["generated_to_heldout"], torch.cdist(generated, heldout).min(1).values)
    assert torch.allclose(distances["heldout_to_train"], torch.cdist(heldout, train).min(1).values)


def test_memorisation_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same per-sample shape"):
        nearest_distances(_volumes(4, 0), _volumes(4, 1)[..., :8], _volumes(4, 2))
    with pytest.raises(ValueError, match="heldout_to_train"):
        memorisation_summary({"generated_to_train": torch.ones(3), "generated_to_heldout": torch.ones(3)})
