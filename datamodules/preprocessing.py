"""Preprocessing shared by every data set (docs/design.md §1).

Canonical orientation → crop to the brain's bounding box → pad to a cube → resize to the cubic
target → per-channel intensity to [-1, 1] by robust percentiles (0.5–99.5) inside the brain.
Everything is a TorchIO transform so that a `tio.Subject` built from any release goes through the
same steps; channels are separate `ScalarImage`s so each is normalised on its own.
"""

from __future__ import annotations

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


def preprocess_subject(
    subject: tio.Subject,
    channels: list[str],
    spatial_size: int,
    mask_key: str | None = "brain",
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the shared preprocessing and stack the channels.

    Args:
        subject: a TorchIO subject holding one `ScalarImage` per channel and, optionally, a
            `LabelMap` brain mask under `mask_key` (without one, voxels > 0 of the first channel).
        channels: names of the subject's images, in channel order.
        spatial_size: side of the cubic output.
        mask_key: name of the brain mask in the subject, or None.
        percentiles: intensity percentiles inside the brain mapped to -1 and 1.

    Returns:
        image: float32 [C, S, S, S] in [-1, 1], background -1.
        mask: bool [1, S, S, S] brain mask.
    """
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
    rescale = tio.RescaleIntensity(out_min_max=(-1.0, 1.0), percentiles=percentiles, masking_method=mask_key,
                                   include=list(channels))
    subject = rescale(subject)
    brain = subject[mask_key].data[:1] > 0
    image = torch.cat([subject[name].data.float() for name in channels], dim=0)
    image = torch.where(brain, image, torch.full_like(image, BACKGROUND)).clamp(-1.0, 1.0)
    return image.contiguous(), brain


def foreground_histogram(volume: torch.Tensor, bins: int, background: float) -> torch.Tensor:
    """Normalised histogram [bins] over [-1, 1] of the voxels above `background`."""
    values = volume.float().flatten()
    values = values[values > background]
    if values.numel() == 0:
        return torch.zeros(bins, device=volume.device)
    histogram = torch.histc(values, bins=bins, min=-1.0, max=1.0)
    return histogram / histogram.sum()
