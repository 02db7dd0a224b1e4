"""The self-supervised encoder: NT-Xent, the augmented views, label-free training steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_modules.extractor import (
    SelfSupervisedEncoderModule,
    ViewAugmentation,
    VolumeEncoder,
    nt_xent,
    random_affine,
    two_views,
)


def test_nt_xent_matches_its_closed_form() -> None:
    # one-hot projections: a view's positive has cosine 1, its 2B-2 negatives cosine 0
    batch, temperature = 3, 0.5
    first = torch.eye(4)[:batch]
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2 * batch - 2))
    assert nt_xent(first, first.clone(), temperature).item() == pytest.approx(expected, rel=1e-6)
    # pairing view i with another volume's view costs more than the right pairing
    assert nt_xent(first, first.roll(1, 0), temperature) > nt_xent(first, first, temperature) + 1


def test_views_keep_shape_and_background_and_replay_with_the_seed() -> None:
    volumes = -torch.ones(2, 1, 16, 16, 16)
    volumes[:, :, 4:12, 3:13, 5:11] = torch.linspace(-0.8, 1.0, 8).view(1, 1, 8, 1, 1)
    augmentation = ViewAugmentation()
    torch.manual_seed(0)
    first, second = two_views(volumes, augmentation)
    torch.manual_seed(0)
    again, _ = two_views(volumes, augmentation)
    assert first.shape == volumes.shape and torch.equal(first, again)
    assert not torch.allclose(first, second)
    assert first[..., 0, 0, 0].eq(-1).all() and first.min() >= -1 - 1e-5 and first.max() <= 1 + 1e-5


def test_views_without_randomness_are_the_volume_or_its_left_right_mirror() -> None:
    volumes = torch.rand(2, 1, 8, 10, 12) * 2 - 1
    still = dict(scale=0.0, degrees=0.0, translation=0.0, log_gamma=0.0)
    torch.testing.assert_close(ViewAugmentation(flip_probability=0.0, **still)(volumes), volumes, atol=1e-5, rtol=0)
    torch.testing.assert_close(ViewAugmentation(flip_probability=1.0, **still)(volumes), volumes.flip(2),
                               atol=1e-5, rtol=0)


def test_affine_shifts_by_the_drawn_fraction_of_the_side() -> None:
    torch.manual_seed(0)
    theta = random_affine(64, scale=0.0, degrees=0.0, translation=0.1)
    assert torch.equal(theta[:, :, :3], torch.eye(3).expand(64, 3, 3))
    assert theta[:, :, 3].abs().max() <= 0.2 and theta[:, :, 3].abs().max() > 0.15  # ±10 % = ±0.2 of [-1, 1]


def test_contrast_fixes_the_ends_of_the_range_and_keeps_the_order() -> None:
    ramp = torch.linspace(-1, 1, 11).view(1, 1, 1, 1, 11).expand(1, 1, 2, 2, 11).contiguous()
    torch.manual_seed(1)
    still = dict(scale=0.0, degrees=0.0, translation=0.0, flip_probability=0.0)
    out = ViewAugmentation(log_gamma=0.5, **still)(ramp)
    assert out[..., 0].sub(-1).abs().max() < 1e-5 and out[..., -1].sub(1).abs().max() < 1e-5
    assert (out.diff(dim=-1) > 0).all() and not torch.allclose(out, ramp)


@pytest.mark.parametrize("kwargs", [{"scale": -0.1}, {"scale": 1.0}, {"flip_probability": 2.0}])
def test_bad_augmentation_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="augmentation"):
        ViewAugmentation(**kwargs)


def test_encoder_checks_its_widths_and_pools_to_the_last_one() -> None:
    with pytest.raises(ValueError, match="channels"):
        VolumeEncoder(1, [8])
    assert VolumeEncoder(1, [8, 12]).eval()(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 12)


def test_training_step_does_not_read_labels() -> None:
    torch.manual_seed(0)
    module = SelfSupervisedEncoderModule(spatial_size=16, channels=(8, 8))
    module.log = lambda *_, **__: None  # type: ignore[method-assign]
    image = torch.rand(4, 1, 16, 16, 16) * 2 - 1
    losses = []
    for label in (torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 1, 1])):
        torch.manual_seed(3)
        losses.append(module.training_step({"image": image, "label": label}, 0))
    torch.manual_seed(3)
    unlabelled = module.training_step({"image": image}, 0)
    assert losses[0].item() == losses[1].item() == unlabelled.item() and losses[0].item() > 0


def test_validation_views_are_fixed() -> None:
    module = SelfSupervisedEncoderModule(spatial_size=16, channels=(8, 8)).eval()
    image = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    logged = []
    module.log = lambda name, value, **_: logged.append(value.item())  # type: ignore[method-assign]
    module.validation_step({"image": image}, 0)
    torch.manual_seed(123)  # the global generator does not decide the validation views
    module.validation_step({"image": image}, 0)
    module.validation_step({"image": image}, 1)
    assert logged[0] == logged[1] != logged[2]


def test_features_refuse_a_volume_of_another_size() -> None:
    module = SelfSupervisedEncoderModule(spatial_size=16, channels=(8, 8)).eval()
    assert module.features(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 8)
    with pytest.raises(ValueError, match=r"trained on volumes \[B, 1, 16, 16, 16\].*spatial_size"):
        module.features(torch.zeros(1, 1, 32, 32, 32))


def test_a_module_built_in_python_saves_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SelfSupervisedEncoderModule(spatial_size=16, channels=(8, 8), augmentation=ViewAugmentation(scale=0.1))
    module.log = lambda *_, **__: None  # type: ignore[method-assign]
    module.training_step({"image": torch.rand(1, 1, 16, 16, 16) * 2 - 1}, 0)  # a lone volume: 2 rows for BatchNorm
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "encoder.ckpt")
    loaded = SelfSupervisedEncoderModule.load_for_extraction(tmp_path / "encoder.ckpt")
    assert loaded.augmentation == ViewAugmentation(scale=0.1) and not loaded.training
    volumes = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.features(volumes), module.eval().features(volumes))
