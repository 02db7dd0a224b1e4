"""Preprocessing shared by every data set (docs/design.md §1).

Canonical orientation → crop to the brain's bounding box → pad to a cube → resize to the cubic
target → per-channel intensity by robust percentiles (0.5–99.5) of the *healthy* brain: the brain
minus the lesion labels where a data set has them (BraTS `seg`, the embedded cohort's lesion). The
lower percentile maps to -1 and the upper one to `healthy_upper` (1 by default; below 1 leaves room
for a lesion brighter than any healthy tissue, such as an enhancing tumour in T1ce).

Why the lesion is left out: a large bright lesion sets a whole-brain upper percentile, so the same
healthy tissue would come out darker in a volume with a lesion than without one, and a classifier
or a generator could read the class from the brightness of the whole brain instead of the lesion.
Geometry goes through TorchIO transforms so a `tio.Subject` built from any release takes the same
steps; channels are separate `ScalarImage`s so each is normalised on its own.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torchio as tio

BACKGROUND = -1.0  # value of every voxel outside the brain after preprocessing
# A voxel above this is brain: a margin above BACKGROUND absorbs resampling and the noise of generated
# volumes. Slice sampling, the rule rewards, histograms and the report all use this one value.
FOREGROUND_THRESHOLD = -0.95


def brain_bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[int, int, int, int, int, int]:
    """TorchIO crop bounds (ini_0, fin_0, ini_1, fin_1, ini_2, fin_2) around the non-zero mask.

    Args:
        mask: [D, H, W] array, non-zero inside the brain.
        margin: voxels kept around the brain on every side.
    """
    if not mask.any():
        raise ValueError("the brain mask is empty: nothing to crop to")
    bounds: list[int] = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        low = max(int(present[0]) - margin, 0)
        high = max(mask.shape[axis] - 1 - int(present[-1]) - margin, 0)
        bounds += [low, high]
    return tuple(bounds)  # type: ignore[return-value]


def _pad_to_cube(subject: tio.Subject) -> tio.Subject:
    """Pad symmetrically so that every side equals the longest one (keeps the aspect ratio)."""
    shape = subject.spatial_shape
    side = max(shape)
    padding: list[int] = []
    for size in shape:
        total = side - size
        padding += [total // 2, total - total // 2]
    return tio.Pad(padding, padding_mode=0)(subject)


def healthy_percentiles(image: torch.Tensor, reference: torch.Tensor,
                        percentiles: tuple[float, float]) -> tuple[float, float]:
    """The `percentiles` of `image` [D, H, W] over the voxels where `reference` [D, H, W] is true."""
    values = image[reference].double()
    if values.numel() == 0:
        raise ValueError("no healthy brain voxel left to normalise by (the lesion labels cover the whole brain)")
    low, high = torch.quantile(values, torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float64)).tolist()
    return low, high


class Preprocessed(NamedTuple):
    """A preprocessed subject: image [C, S, S, S] in [-1, 1], brain mask and lesion labels [1, S, S, S]."""

    image: torch.Tensor
    mask: torch.Tensor
    lesion: torch.Tensor | None  # uint8 labels of the data set's lesion map (None: it has none)


def preprocess_volume(
    subject: tio.Subject,
    channels: list[str],
    spatial_size: int,
    mask_key: str | None = "brain",
    percentiles: tuple[float, float] = (0.5, 99.5),
    lesion_key: str | None = None,
    healthy_upper: float = 1.0,
    window: tuple[float, float] | None = None,
) -> Preprocessed:
    """Apply the shared preprocessing and stack the channels.

    Args:
        subject: a TorchIO subject holding one `ScalarImage` per channel and, optionally, a
            `LabelMap` brain mask under `mask_key` (without one, voxels > 0 of the first channel).
        channels: names of the subject's images, in channel order.
        spatial_size: side of the cubic output.
        mask_key: name of the brain mask in the subject, or None.
        percentiles: intensity percentiles of the healthy brain mapped to -1 and `healthy_upper`.
        lesion_key: name of a `LabelMap` whose non-zero voxels are lesion (left out of the
            percentiles), or None when the data set has none.
        healthy_upper: where the upper percentile lands, in (-1, 1]; voxels above 1 are clamped.
        window: source intensities mapped to -1 and `healthy_upper` for a data set whose volumes
            come on a known scale (the embedded cohort); None estimates them per volume and channel
            from the percentiles.

    Returns:
        image: float32 [C, S, S, S] in [-1, 1], background -1.
        mask: bool [1, S, S, S] brain mask.
        lesion: uint8 [1, S, S, S] labels under `lesion_key` (nearest-neighbour resampled), or None.
    """
    if not -1.0 < healthy_upper <= 1.0:
        raise ValueError(f"healthy_upper must be in (-1, 1], got {healthy_upper}")
    subject = tio.ToCanonical()(subject)
    if mask_key is None:
        first = subject[channels[0]].data
        subject.add_image(tio.LabelMap(tensor=(first[:1] > 0).to(torch.uint8), affine=subject[channels[0]].affine),
                          "brain")
        mask_key = "brain"
    mask = subject[mask_key].data[0].numpy() > 0
    subject = tio.Crop(brain_bounding_box(mask))(subject)
    subject = _pad_to_cube(subject)
    subject = tio.Resize(spatial_size)(subject)
    brain = subject[mask_key].data[:1] > 0
    healthy = brain[0] if lesion_key is None else brain[0] & (subject[lesion_key].data[0] == 0)
    scaled = []
    for name in channels:
        data = subject[name].data[0].float()
        low, high = window if window is not None else healthy_percentiles(data, healthy, percentiles)
        span = max(high - low, 1e-8)
        scaled.append(-1.0 + (healthy_upper + 1.0) * (data - low) / span)
    image = torch.stack(scaled)
    image = torch.where(brain, image, torch.full_like(image, BACKGROUND)).clamp(-1.0, 1.0)
    lesion = None if lesion_key is None else subject[lesion_key].data[:1].to(torch.uint8).contiguous()
    return Preprocessed(image.contiguous(), brain, lesion)


def foreground_histogram(volume: torch.Tensor, bins: int, background: float) -> torch.Tensor:
    """Normalised histogram [bins] over [-1, 1] of the voxels above `background`."""
    values = volume.float().flatten()
    values = values[values > background]
    if values.numel() == 0:
        return torch.zeros(bins, device=volume.device)
    histogram = torch.histc(values, bins=bins, min=-1.0, max=1.0)
    return histogram / histogram.sum()
