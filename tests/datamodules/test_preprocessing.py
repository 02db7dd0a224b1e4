"""Tests of the shared preprocessing (docs/design.md §1)."""

import numpy as np
import pytest
import torch
import torchio as tio

from datamodules.preprocessing import brain_bounding_box, preprocess_volume


def _anisotropic_subject() -> tio.Subject:
    """A 40×24×20 box with a bright ellipsoidal 'brain' off-centre, in LPS orientation."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 24, 20)], indexing="ij"), -1).astype(float)
    brain = (((grid - [25, 12, 10]) / [10, 6, 5]) ** 2).sum(-1) <= 1
    rng = np.random.default_rng(0)
    image = np.where(brain, 100 + 50 * rng.random(brain.shape), 0.0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS: ToCanonical must flip it
    return tio.Subject(t1=tio.ScalarImage(tensor=torch.tensor(image[None], dtype=torch.float32), affine=affine),
                       t2=tio.ScalarImage(tensor=torch.tensor(2 * image[None] + 7, dtype=torch.float32), affine=affine),
                       brain=tio.LabelMap(tensor=torch.tensor(brain[None], dtype=torch.uint8), affine=affine))


def test_output_is_cubic_in_range_with_background_minus_one() -> None:
    image, mask, _ = preprocess_volume(_anisotropic_subject(), ["t1", "t2"], spatial_size=16)
    assert image.shape == (2, 16, 16, 16) and image.dtype == torch.float32
    assert mask.shape == (1, 16, 16, 16) and mask.dtype == torch.bool
    assert image.min() >= -1 and image.max() <= 1
    assert torch.all(image[:, ~mask[0]] == -1)
    inside = image[0][mask[0]]
    assert inside.max() == 1.0  # the 99.5th percentile maps to 1 and above is clipped
    assert (inside > -0.9).float().mean() > 0.9  # the brain spans the range, not the background
    # The longest side of the brain (x: 21 of a 25-voxel crop) nearly fills the cube, and the
    # aspect ratio survives (z: 11 voxels, about half): resizing is isotropic, padding makes the cube.
    extent = [int(mask[0].any(dim=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]
    assert extent[0] >= 12 and extent[0] >= 1.7 * extent[2]


def test_channels_are_normalised_separately() -> None:
    image, _, _ = preprocess_volume(_anisotropic_subject(), ["t1", "t2"], spatial_size=16)
    # t2 = 2·t1 + 7 inside the brain: after per-channel percentile scaling both are the same.
    torch.testing.assert_close(image[0], image[1], atol=1e-4, rtol=0)


def test_empty_mask_is_an_error() -> None:
    with pytest.raises(ValueError, match="brain mask is empty"):
        brain_bounding_box(np.zeros((4, 4, 4), dtype=bool))
