"""Distribution metrics on features (FID, KID, MMD), MS-SSIM diversity, and bootstrap intervals.

FID and MMD are MONAI's (`FIDMetric`, `MMDMetric`) on feature matrices; KID (Bińkowski et al. 2018,
"Demystifying MMD GANs") is the unbiased MMD² with the cubic polynomial kernel, averaged over
subsets. Every function returns plain floats so that the numbers go straight into metrics.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales


@dataclass
class Estimate:
    """A metric value with its 95 % interval (and, for subset/seed averages, their std)."""

    value: float
    ci95: tuple[float, float]
    std: float | None = None


def fid(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, F] and [M, F] (MONAI)."""
    _check_features(real, generated, minimum=2)
    return float(FIDMetric()(generated.double(), real.double()))


def fid_from_samples(real: torch.Tensor, generated: torch.Tensor) -> float:
    """The same Fréchet distance computed in sample space, for bootstrap resamples.

    With centred features X [n, F] and Y [m, F], the non-zero eigenvalues of Σx·Σy are the squared
    singular values of X·Yᵀ / √((n−1)(m−1)), so tr √(Σx·Σy) is that matrix's nuclear norm: an
    n×m SVD instead of an F×F matrix square root (F = 512–2048 features, n, m = tens of volumes).
    """
    x = real.double() - real.double().mean(0)
    y = generated.double() - generated.double().mean(0)
    n, m = len(x), len(y)
    mean_term = (real.double().mean(0) - generated.double().mean(0)).square().sum()
    traces = x.square().sum() / (n - 1) + y.square().sum() / (m - 1)
    cross = torch.linalg.svdvals(x @ y.T / ((n - 1) * (m - 1)) ** 0.5).sum()
    return float(mean_term + traces - 2 * cross)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / d + 1)³, KID's kernel."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor, kernel: Callable = polynomial_kernel) -> float:
    """Unbiased MMD² estimate (Gretton et al. 2012, Eq. 3): diagonal terms left out."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean())


def kid(real: torch.Tensor, generated: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> Estimate:
    """KID: mean and std of the unbiased polynomial-kernel MMD² over random equal-size subsets (≤ half of each set)."""
    _check_features(real, generated, minimum=2)
    # subsets of at most half the smaller set: with tens of volumes, full-size subsets would all be equal
    size = min(subset_size, max(2, min(len(real), len(generated)) // 2))
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        x = real[torch.randperm(len(real), generator=generator)[:size]].double()
        y = generated[torch.randperm(len(generated), generator=generator)[:size]].double()
        values.append(unbiased_mmd2(x, y))
    array = np.asarray(values)
    return Estimate(float(array.mean()), _percentiles(array), float(array.std(ddof=1)) if len(array) > 1 else 0.0)


def mmd(real: torch.Tensor, generated: torch.Tensor) -> float:
    """MONAI's unbiased linear-kernel MMD on feature vectors (equal counts: the larger set is cut)."""
    _check_features(real, generated, minimum=2)
    count = min(len(real), len(generated))
    return float(MMDMetric()(real[:count].double(), generated[:count].double()))


def ms_ssim_settings(size: int) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights for MS-SSIM on cubic volumes of side `size` (valid from 16³ to 128³+).

    MONAI requires size // (scales − 1)² > kernel − 1: five scales with a 7-kernel need 128³; below
    that, three scales (the first three weights, renormalised) with a kernel that fits.
    """
    if size >= 128:
        return 7, MS_SSIM_WEIGHTS
    weights = np.asarray(MS_SSIM_WEIGHTS[:3])
    kernel = 7 if size >= 32 else 3
    if size // 4 <= kernel - 1:
        raise ValueError(f"MS-SSIM needs volumes of at least 16³, got {size}³")
    return kernel, tuple(float(w) for w in weights / weights.sum())


def ms_ssim_pairs(volumes: torch.Tensor, num_pairs: int = 32, seed: int = 0) -> np.ndarray:
    """MS-SSIM (MONAI, data range 2 for [-1, 1]) of random distinct pairs: lower = more diverse."""
    if len(volumes) < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 volumes, got {len(volumes)}")
    kernel, weights = ms_ssim_settings(volumes.shape[-1])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, kernel_size=kernel, weights=weights)
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(volumes), (num_pairs,), generator=generator)
    offset = torch.randint(1, len(volumes), (num_pairs,), generator=generator)
    second = (first + offset) % len(volumes)  # never the same volume twice
    values = metric(volumes[first].float(), volumes[second].float())
    return values.flatten().double().numpy()


def ms_ssim_diversity(volumes: torch.Tensor, num_pairs: int = 32, seed: int = 0) -> Estimate:
    """Mean MS-SSIM over random pairs with a bootstrap interval over the pairs."""
    values = ms_ssim_pairs(volumes, num_pairs, seed)
    return Estimate(float(values.mean()), bootstrap_mean_ci(values, seed=seed), float(values.std(ddof=1)))


def bootstrap_ci(real: torch.Tensor, generated: torch.Tensor, statistic: Callable[[torch.Tensor, torch.Tensor], float],
                 num_resamples: int = 50, seed: int = 0) -> tuple[float, float]:
    """95 % bias-corrected bootstrap interval of statistic(real, generated), resampling both sets.

    Resampling with replacement repeats volumes, which inflates FID (by more than its spread with
    4–16 samples, so the plain percentile interval missed θ̂); the interval is the percentile
    interval of the bootstrap values shifted by their bias, mean − θ̂.
    """
    estimate = statistic(real, generated)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_resamples):
        x = real[torch.randint(0, len(real), (len(real),), generator=generator)]
        y = generated[torch.randint(0, len(generated), (len(generated),), generator=generator)]
        values.append(statistic(x, y))
    array = np.asarray(values)
    bias = float(array[np.isfinite(array)].mean()) - estimate if np.isfinite(array).any() else 0.0
    low, high = _percentiles(array)
    return low - bias, high - bias


def bootstrap_mean_ci(values: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values`."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(num_resamples, len(values)), replace=True).mean(1)
    return _percentiles(means)


def mean_std_ci(values: list[float]) -> Estimate:
    """Mean ± std over seeds, with a normal-approximation 95 % interval of the mean."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    half = 1.96 * std / np.sqrt(len(array))
    return Estimate(float(array.mean()), (float(array.mean() - half), float(array.mean() + half)), std)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


def _check_features(real: torch.Tensor, generated: torch.Tensor, minimum: int) -> None:
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be [N, F] with the same F, got {tuple(real.shape)} and "
                         f"{tuple(generated.shape)}")
    if len(real) < minimum or len(generated) < minimum:
        raise ValueError(f"need at least {minimum} real and {minimum} generated feature vectors, got "
                         f"{len(real)} and {len(generated)}")
