"""Tests of `DiffusionModule`: loss targets, EMA, activation checkpointing, checkpoint round trip."""

from pathlib import Path

import lightning as L
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from lightning_modules.diffusion.module import DiffusionModule
from tests.conftest import TINY_MODEL


def _model(**kwargs) -> DiffusionModule:
    settings = dict(in_channels=1, spatial_size=16, num_classes=2, **TINY_MODEL)
    settings.update(kwargs)
    torch.manual_seed(0)
    return DiffusionModule(**settings)


def test_v_prediction_regresses_the_velocity() -> None:
    model = _model(noise_scheduler=DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"))
    images = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    generator = torch.Generator().manual_seed(1)
    loss = model.diffusion_loss(images, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(1))
    # Rebuild the same draw and target by hand.
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, 100, (2,), generator=generator)
    a = model.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * images + (1 - a).sqrt() * noise
    velocity = a.sqrt() * noise - (1 - a).sqrt() * images
    expected = torch.nn.functional.mse_loss(model(noisy, timesteps, torch.tensor([0, 1])), velocity)
    torch.testing.assert_close(loss, expected)


def test_label_dropout_uses_the_null_class() -> None:
    model = _model()
    seen = []
    model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"].clone()),
                                         with_kwargs=True)
    torch.manual_seed(0)
    model.diffusion_loss(torch.zeros(64, 1, 16, 16, 16), torch.zeros(64, dtype=torch.long), label_dropout=0.5)
    labels = seen[0]
    assert set(labels.tolist()) == {0, 2} and 10 < int((labels == 2).sum()) < 54


def test_lesion_weights_cover_the_lesion_cells_and_weigh_the_mean() -> None:
    model = _model(lesion_loss_weight=4.0)
    seg = torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8)
    seg[1, 0, 5, 9, 2] = 4  # one voxel of volume 1: its 4³ cell on a 4³ grid
    weights = model.lesion_weights({"seg": seg}, grid=(4, 4, 4))
    assert weights.shape == (2, 1, 4, 4, 4) and weights[0].eq(1).all()
    assert weights[1, 0, 1, 2, 0] == 5 and int(weights[1].eq(5).sum()) == 1 and int(weights[1].eq(1).sum()) == 63
    assert model.lesion_weights({"seg": seg}, grid=(16, 16, 16))[1, 0, 5, 9, 2] == 5  # voxel space: no pooling
    images, labels = torch.rand(2, 1, 16, 16, 16) * 2 - 1, torch.tensor([0, 1])
    plain = model.diffusion_loss(images, labels, generator=torch.Generator().manual_seed(3))
    ones = model.diffusion_loss(images, labels, generator=torch.Generator().manual_seed(3),
                                weights=torch.ones(2, 1, 16, 16, 16))
    torch.testing.assert_close(ones, plain)  # equal weights: the plain mean
    lesion = torch.zeros(2, 1, 16, 16, 16)
    lesion[1, :, :4] = 1.0
    weighted = model.diffusion_loss(images, labels, generator=torch.Generator().manual_seed(3), weights=1 + 9 * lesion)
    assert not torch.isclose(weighted, plain)
    with pytest.raises(ValueError, match="'seg'"):
        model.lesion_weights({"image": images}, grid=(16, 16, 16))
    assert _model().lesion_weights({"image": images}, grid=(16, 16, 16)) is None  # weight 0: the plain loss


def test_ema_follows_the_weights_after_each_optimizer_step(tmp_path: Path, cohort_cache: Path) -> None:
    from datamodules import TemplateCohortDataModule

    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, batch_size=2)
    model = _model(ema_decay=0.5, preview_every_n_epochs=0)
    initial = [p.detach().clone() for p in model.unet.parameters()]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, data)
    assert int(model.ema.n_averaged) == 2
    # n=1 copies the weights after step 1; n=2 averages: ema = 0.5·ema + 0.5·w2. So ema ≠ w2, ≠ w0.
    for ema_p, p, p0 in zip(model.ema.module.parameters(), model.unet.parameters(), initial, strict=True):
        if not torch.equal(p, p0):
            assert not torch.equal(ema_p, p) and not torch.equal(ema_p, p0)
            break
    else:
        pytest.fail("no parameter changed in two optimiser steps")


def test_activation_checkpointing_changes_memory_not_results() -> None:
    plain, checkpointed = _model(), _model(activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())  # same names: checkpointed runs load plain checkpoints
    images, labels = torch.rand(2, 1, 16, 16, 16), torch.tensor([0, 1])
    losses = []
    for model in (plain, checkpointed):
        loss = model.diffusion_loss(images, labels, generator=torch.Generator().manual_seed(3))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(plain.unet.parameters(), checkpointed.unet.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_checkpoint_restores_schedule_weights_and_ema(tmp_path: Path) -> None:
    custom = DDPMScheduler(num_train_timesteps=200, schedule="cosine", prediction_type="v_prediction")
    model = _model(noise_scheduler=custom)
    with torch.no_grad():
        model.ema.module.time_embed[0].weight.add_(1.0)  # make EMA differ from the raw weights
    trainer = L.Trainer(accelerator="cpu", logger=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = DiffusionModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert restored.noise_scheduler.prediction_type == "v_prediction"
    torch.testing.assert_close(restored.noise_scheduler.alphas_cumprod, custom.alphas_cumprod)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, msg=name)


def test_generate_is_seeded_and_in_range() -> None:
    model = _model()
    first = model.generate(2, torch.tensor([0, 1]), num_steps=3, seed=4)
    assert first.shape == (2, 1, 16, 16, 16) and first.min() >= -1 and first.max() <= 1
    torch.testing.assert_close(model.generate(2, torch.tensor([0, 1]), num_steps=3, seed=4), first)
    assert not torch.allclose(model.generate(2, torch.tensor([0, 1]), num_steps=3, seed=5), first)


@pytest.mark.parametrize("bad, match", [
    (dict(channels=(8, 8), attention_levels=(False, False, True)), "same length"),
    (dict(norm_num_groups=3), "norm_num_groups"),
    (dict(cfg_dropout=1.0), "cfg_dropout"),
    (dict(lesion_loss_weight=-1.0), "lesion_loss_weight"),
    (dict(noise_scheduler=DDPMScheduler(prediction_type="sample")), "prediction_type"),
])
def test_bad_settings_are_explained(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model(**bad)


def test_gpu_path_switches_keep_results_and_parameter_names() -> None:
    plain = _model()
    fast = _model(channels_last=True, use_flash_attention=True, compile_unet=True)
    assert list(fast.unet.state_dict()) == list(plain.unet.state_dict())  # compiled or not, checkpoints load
    fast.load_state_dict(plain.state_dict())
    images, labels = torch.rand(2, 1, 16, 16, 16), torch.tensor([0, 1])
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        expected = plain(images, timesteps, labels)
        assert fast.unet._compiled_call_impl is not None  # nn.Module.compile() took effect ...
        fast.unet._compiled_call_impl = None  # ... but run eager here: compiling a 3D UNet on 2 cores takes minutes
        torch.testing.assert_close(fast(images, timesteps, labels), expected, atol=1e-5, rtol=1e-4)
