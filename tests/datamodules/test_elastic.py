"""The one-field elastic deformation gives TorchIO's RandomElasticDeformation's output bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

import datamodules.template as template
from datamodules.elastic import RandomFieldElasticDeformation
from datamodules.template import synthesise_subject


def _subject(seed: int) -> tio.Subject:
    """A 2 mm grid off the origin (as the templates), a smooth image, a label map and a two-channel image."""
    generator = torch.Generator().manual_seed(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-31.0, -45.0, -29.0]
    smooth = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 28, 20, generator=generator), 5, 1, 2)[0]
    labels = (smooth > smooth.median()).to(torch.uint8) * 2
    return tio.Subject(image=tio.ScalarImage(tensor=smooth, affine=affine),
                       seg=tio.LabelMap(tensor=labels, affine=affine),
                       pair=tio.ScalarImage(tensor=torch.cat([smooth, 1 - smooth]), affine=affine))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_field_deformation_equals_torchio_bit_for_bit(seed: int) -> None:
    arguments = dict(num_control_points=6, max_displacement=6.0, locked_borders=2)
    outputs = []
    for transform in (tio.RandomElasticDeformation(**arguments), RandomFieldElasticDeformation(**arguments)):
        torch.manual_seed(100 + seed)  # both draw their control points from torch's generator
        outputs.append(transform(_subject(seed)))
    torchio, field = outputs
    for name in ("image", "seg", "pair"):
        assert not torch.equal(torchio[name].data, _subject(seed)[name].data)  # it deformed something
        assert torch.equal(torchio[name].data, field[name].data), name


def test_a_cohort_subject_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    # the embedded cohort's lesion subject (four images) through both deformations: the cohort stays the same
    field_subject = synthesise_subject(1, 1, 0, 2)
    monkeypatch.setattr(template, "RandomFieldElasticDeformation", tio.RandomElasticDeformation)
    torchio_subject = synthesise_subject(1, 1, 0, 2)
    for name in ("image", "brain", "seg"):
        assert torch.equal(torchio_subject[name].data, field_subject[name].data), name
