"""FID, KID, MMD and MS-SSIM (evaluation/metrics.py) against independent NumPy/SciPy computations."""

import numpy as np
import pytest
import scipy.linalg
import torch

from msrl.evaluation.metrics import (
    bootstrap_ci,
    fid,
    fid_from_samples,
    kid,
    mmd,
    ms_ssim_diversity,
    ms_ssim_settings,
    unbiased_mmd2,
)


def _frechet_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Heusel et al. 2017 Eq. (6), written independently with SciPy's sqrtm."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(fid(features, features)) < 1e-6
    shifted = features + 0.5
    assert fid(features, shifted) == pytest.approx(8 * 0.25, rel=1e-6)  # mean shift only: |Δμ|²
    assert fid(features, features * 2) > 1.0


def test_fid_matches_numpy_scipy() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(120, 6, generator=generator)
    y = torch.randn(90, 6, generator=generator) @ torch.randn(6, 6, generator=generator) * 0.5 + 0.3
    assert fid(x, y) == pytest.approx(_frechet_numpy(x.numpy().astype(np.float64), y.numpy().astype(np.float64)),
                                      rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("n, m, features", [(40, 30, 6), (20, 12, 64)])
def test_sample_space_fid_equals_monai_fid(n: int, m: int, features: int) -> None:
    generator = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, features, generator=generator), torch.randn(m, features, generator=generator) * 1.3 + 0.2
    assert fid_from_samples(x, y) == pytest.approx(fid(x, y), rel=1e-5)


def test_kid_is_unbiased_on_equal_distributions_and_positive_on_different_ones() -> None:
    generator = torch.Generator().manual_seed(2)
    same = kid(torch.randn(300, 16, generator=generator), torch.randn(300, 16, generator=generator),
               num_subsets=50, subset_size=100)
    different = kid(torch.randn(300, 16, generator=generator), torch.randn(300, 16, generator=generator) + 0.5,
                    num_subsets=50, subset_size=100)
    assert abs(same.value) < 3 * same.std / np.sqrt(50) + 1e-3  # centred on zero (the biased estimate is not)
    assert different.value > 10 * abs(same.value) and different.ci95[0] > 0


def test_unbiased_mmd2_matches_an_explicit_double_sum() -> None:
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 3, generator=generator).double(), torch.randn(5, 3, generator=generator).double()

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a @ b / 3 + 1) ** 3)

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert unbiased_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_mmd_and_bootstrap_interval() -> None:
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 4, generator=generator), torch.randn(64, 4, generator=generator) + 1.0
    assert mmd(x, y) > mmd(x, torch.randn(64, 4, generator=generator)) + 0.5
    low, high = bootstrap_ci(x, y, fid, num_resamples=30)
    assert low < fid(x, y) < high


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_ms_ssim_settings_are_valid_for_every_demo_and_gpu_size(size: int) -> None:
    kernel, weights = ms_ssim_settings(size)
    assert abs(sum(weights) - 1) < 1e-3 and size // max(1, len(weights) - 1) ** 2 > kernel - 1


def test_ms_ssim_is_one_for_copies_and_lower_for_different_volumes() -> None:
    base = torch.rand(1, 1, 32, 32, 32) * 2 - 1
    copies = ms_ssim_diversity(base.repeat(4, 1, 1, 1, 1), num_pairs=6)
    varied = ms_ssim_diversity(torch.rand(4, 1, 32, 32, 32) * 2 - 1, num_pairs=6)
    assert copies.value == pytest.approx(1.0, abs=1e-4)
    assert varied.value < 0.5


def test_features_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="same F"):
        fid(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        kid(torch.randn(1, 3), torch.randn(10, 3))
