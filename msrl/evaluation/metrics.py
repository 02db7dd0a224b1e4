"""Distribution metrics on features (FID, KID, MMD), MS-SSIM diversity, and intervals that resample volumes.

FID is MONAI's `FIDMetric` on feature matrices; MMD is the unbiased linear-kernel MMD² that MONAI's
`MMDMetric` computes, generalised to sets of different sizes; KID (Bińkowski et al. 2018,
"Demystifying MMD GANs") is the unbiased MMD² with the cubic polynomial kernel, averaged over
subsets. A 2D view gives `per_volume` consecutive feature rows per volume (its slices); slices of
one volume are not independent, so every bootstrap here draws volumes and takes all their rows.
Every function returns plain floats so that the numbers go straight into metrics.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from monai.metrics import FIDMetric, MultiScaleSSIMMetric

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales


@dataclass
class Estimate:
    """A metric value with its 95 % interval and, where one is meaningful, a std (its meaning is per metric)."""

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


def linear_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = x·y, the kernel of MONAI's `MMDMetric`."""
    return x @ y.T


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor, kernel: Callable = polynomial_kernel, x_per_volume: int = 1,
                  y_per_volume: int = 1) -> float:
    """Unbiased MMD² estimate (Gretton et al. 2012, Eq. 3) of sets [m, F] and [n, F]: diagonal terms left out.

    With `*_per_volume` > 1 (the slices of a 2D view), pairs of rows of the same volume are left out
    of the within-set terms as the diagonal is: they are not independent draws, and keeping them
    biases the estimate. With 1 (the default) this is exactly Eq. 3.
    """
    m, n = volume_count(x, x_per_volume, "x"), volume_count(y, y_per_volume, "y")
    kxx = _volume_sums(kernel(x, x), x_per_volume, x_per_volume)
    kyy = _volume_sums(kernel(y, y), y_per_volume, y_per_volume)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1) * x_per_volume ** 2)
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1) * y_per_volume ** 2) - 2 * kernel(x, y).mean())


def mmd(real: torch.Tensor, generated: torch.Tensor, real_per_volume: int = 1, generated_per_volume: int = 1) -> float:
    """Unbiased linear-kernel MMD² over ALL rows of both sets (sizes may differ).

    The same Gretton et al. Eq. 3 estimate MONAI's `MMDMetric` computes for equal sizes, in closed
    form: Σ_{i≠j} xᵢ·xⱼ = |Σᵢ xᵢ|² − Σᵢ |xᵢ|², so no N×N Gram matrix is built. `*_per_volume` as in
    `unbiased_mmd2`: with more than one row per volume, the pairs within a volume are left out too.
    """
    _check_features(real, generated, minimum=2)

    def within(z: torch.Tensor, per_volume: int, name: str) -> torch.Tensor:
        count = volume_count(z, per_volume, name)
        volumes = z.reshape(count, per_volume, -1).sum(1)  # each volume's rows summed
        return (z.sum(0).square().sum() - volumes.square().sum()) / (count * (count - 1) * per_volume ** 2)

    x, y = real.double(), generated.double()
    return float(within(x, real_per_volume, "real") + within(y, generated_per_volume, "generated")
                 - 2 * x.mean(0) @ y.mean(0))


def kid(real: torch.Tensor, generated: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, num_resamples: int = 50, real_per_volume: int = 1, generated_per_volume: int = 1) -> Estimate:
    """KID with a bootstrap interval over volumes.

    value: mean over `num_subsets` random equal-size subsets of volumes (at most `subset_size` and
    half the smaller set; with tens of volumes full-size subsets would all be equal) of the unbiased
    polynomial-kernel MMD² of their rows. std: the spread (std) of those subset values, as
    torchmetrics' `kid_std`; it is not the uncertainty of the value. ci95: the bias-corrected
    bootstrap interval (`bias_corrected_interval`) of the value, each of `num_resamples` resamples
    drawing volumes with replacement from both sets and recomputing the subset mean.

    The kernel is evaluated once: its sums over each pair of volumes' rows make every subset and
    resample a weighted sum of volume counts, so the interval costs little more than the value.
    Pairs of rows from the same draw of a volume are left out as the diagonal is (for per_volume 1
    this is exactly Eq. 3 on the subset).
    """
    _check_features(real, generated, minimum=2)
    n_x, n_y = volume_count(real, real_per_volume, "real"), volume_count(generated, generated_per_volume, "generated")
    if min(n_x, n_y) < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated volumes, got {n_x} and {n_y}")
    size = min(subset_size, max(2, min(n_x, n_y) // 2))
    x, y = real.double(), generated.double()
    blocks_xx = _volume_sums(polynomial_kernel(x, x), real_per_volume, real_per_volume)
    blocks_yy = _volume_sums(polynomial_kernel(y, y), generated_per_volume, generated_per_volume)
    blocks_xy = _volume_sums(polynomial_kernel(x, y), real_per_volume, generated_per_volume)
    generator = torch.Generator().manual_seed(seed)
    # draw 0 is the data itself (the value); draws 1… are bootstrap resamples of the volumes
    draws_x = torch.cat([torch.arange(n_x)[None], torch.randint(0, n_x, (num_resamples, n_x), generator=generator)])
    draws_y = torch.cat([torch.arange(n_y)[None], torch.randint(0, n_y, (num_resamples, n_y), generator=generator)])
    counts_x = _subset_counts(draws_x, n_x, num_subsets, size, generator)
    counts_y = _subset_counts(draws_y, n_y, num_subsets, size, generator)
    values = (_within(counts_x, blocks_xx, size * (size - 1) * real_per_volume ** 2)
              + _within(counts_y, blocks_yy, size * (size - 1) * generated_per_volume ** 2)
              - 2 * ((counts_x @ blocks_xy) * counts_y).sum(-1) / (size ** 2 * real_per_volume * generated_per_volume))
    subsets = values[0].numpy()
    estimate = float(subsets.mean())
    return Estimate(estimate, bias_corrected_interval(values[1:].mean(1).numpy(), estimate),
                    float(subsets.std(ddof=1)) if num_subsets > 1 else 0.0)


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


def volume_count(features: torch.Tensor, per_volume: int, name: str = "features") -> int:
    """Number of volumes in `features` [N·per_volume, F], whose volumes own `per_volume` consecutive rows each."""
    if per_volume < 1 or len(features) % per_volume:
        raise ValueError(f"{name}: {len(features)} feature rows are not a whole number of volumes of "
                         f"per_volume={per_volume} rows")
    return len(features) // per_volume


def volume_rows(volumes: torch.Tensor, per_volume: int) -> torch.Tensor:
    """Row indices [K·per_volume] of the volume indices `volumes` [K], each volume's rows together and in order."""
    return (volumes[:, None] * per_volume + torch.arange(per_volume)).flatten()


def resample_volumes(features: torch.Tensor, per_volume: int, generator: torch.Generator) -> torch.Tensor:
    """A bootstrap resample of `features`: as many volumes as there are, drawn with replacement, all their rows."""
    count = volume_count(features, per_volume)
    return features[volume_rows(torch.randint(0, count, (count,), generator=generator), per_volume)]


def bootstrap_ci(real: torch.Tensor, generated: torch.Tensor, statistic: Callable[[torch.Tensor, torch.Tensor], float],
                 num_resamples: int = 50, seed: int = 0, real_per_volume: int = 1,
                 generated_per_volume: int = 1) -> tuple[float, float]:
    """95 % bias-corrected bootstrap interval of statistic(real, generated), resampling the volumes of both sets.

    Each resample draws volumes with replacement and takes all their `*_per_volume` rows (the slices
    of a 2D view are not independent: resampling rows would shrink the interval by up to √per_volume).
    The interval is `bias_corrected_interval` of the resampled values.
    """
    volume_count(real, real_per_volume, "real")
    volume_count(generated, generated_per_volume, "generated")
    estimate = statistic(real, generated)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_resamples):
        x = resample_volumes(real, real_per_volume, generator)
        y = resample_volumes(generated, generated_per_volume, generator)
        values.append(statistic(x, y))
    return bias_corrected_interval(np.asarray(values), estimate)


def bias_corrected_interval(values: np.ndarray, estimate: float) -> tuple[float, float]:
    """The 2.5–97.5 percentile interval of bootstrap `values`, shifted by their bias (mean − estimate).

    Resampling with replacement repeats volumes, which inflates FID (by more than its spread with
    4–16 samples, so the plain percentile interval missed the estimate); shifting by the bias
    centres the interval on the estimate's scale. Non-finite values are ignored.
    """
    finite = values[np.isfinite(values)]
    bias = float(finite.mean()) - estimate if len(finite) else 0.0
    low, high = _percentiles(values)
    return low - bias, high - bias


def bootstrap_mean_ci(values: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values`."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(num_resamples, len(values)), replace=True).mean(1)
    return _percentiles(means)


def bootstrap_mean_estimate(values: np.ndarray, seed: int = 0) -> Estimate:
    """Mean of per-volume values with its bootstrap interval and std (NaN interval, no std for one value)."""
    if len(values) < 2:
        return Estimate(float(values.mean()), (float("nan"), float("nan")), None)
    return Estimate(float(values.mean()), bootstrap_mean_ci(values, seed=seed), float(np.std(values, ddof=1)))


def mean_t_ci(values: Sequence[float] | np.ndarray) -> Estimate:
    """Mean, std (ddof 1) and the t interval mean ± t₀.₉₇₅,ₙ₋₁ · std / √n, for a few seeds or draws.

    With 2–5 values the normal quantile 1.96 is far too narrow (t₀.₉₇₅ is 12.7 for n = 2, 2.78 for
    n = 5). A single value has no spread to measure: its std and interval are NaN.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"mean_t_ci needs a non-empty list of numbers, got shape {array.shape}")
    mean = float(array.mean())
    if len(array) == 1:
        return Estimate(mean, (float("nan"), float("nan")), float("nan"))
    std = float(array.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, len(array) - 1)) * std / np.sqrt(len(array))
    return Estimate(mean, (mean - half, mean + half), std)


mean_std_ci = mean_t_ci  # the former name (normal interval), kept so that callers get the t interval


def _volume_sums(kernel: torch.Tensor, rows_x: int, rows_y: int) -> torch.Tensor:
    """Kernel matrix [n·rows_x, m·rows_y] summed over each pair of volumes' rows: [n, m]."""
    n, m = kernel.shape[0] // rows_x, kernel.shape[1] // rows_y
    return kernel.reshape(n, rows_x, m, rows_y).sum((1, 3))


def _subset_counts(draws: torch.Tensor, count: int, num_subsets: int, size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """How often each volume is in each subset [R, S, count]: `size` draws of each resample `draws` [R, n]."""
    positions = torch.rand(len(draws), num_subsets, draws.shape[1], generator=generator).argsort(-1)[..., :size]
    picked = draws[:, None, :].expand(-1, num_subsets, -1).gather(2, positions)
    counts = torch.zeros(len(draws), num_subsets, count, dtype=torch.float64)
    return counts.scatter_add_(2, picked, torch.ones_like(picked, dtype=torch.float64))


def _within(counts: torch.Tensor, blocks: torch.Tensor, pairs: int) -> torch.Tensor:
    """Mean kernel over pairs of distinct draws: (cᵀBc − Σ_v c_v·B_vv) / pairs, for counts c [..., n]."""
    return (((counts @ blocks) * counts).sum(-1) - counts @ blocks.diagonal()) / pairs


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
