"""Tests of `ControlNetModule` and its masks: the copy of the base, zero residuals at initialisation, label
channels, exact resume through `msrl train-controlnet`, and the base's provenance (path and SHA-256)."""

import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.digest import sha256_of
from lightning_modules.controlnet import ControlNetModule, label_channels, mask_channels, pool_to
from lightning_modules.controlnet.module import CONTROLNET_KEY, copy_base_weights
from lightning_modules.diffusion.module import DiffusionModule
from msrl.cli import main
from tests.conftest import MSRL, REPO, cli_data_args, subprocess_env

CONFIG = str(REPO / "configs/controlnet/template.yaml")


def _seg(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random label maps [B, 1, S, S, S] holding 0 and every BraTS code."""
    codes = torch.tensor([0, 1, 2, 4], dtype=torch.uint8)
    return codes[torch.randint(0, 4, (batch, 1, size, size, size), generator=torch.Generator().manual_seed(seed))]


def _module(base: Path, **settings: object) -> ControlNetModule:
    return ControlNetModule(str(base), in_channels=1, spatial_size=16, num_classes=2, **settings)


def test_the_encoder_is_the_base_unet_and_the_controlnet_layers_start_at_zero(latent_checkpoint: Path) -> None:
    module = _module(latent_checkpoint)
    base = DiffusionModule.from_msrl_checkpoint(latent_checkpoint).ema.module.state_dict()
    state = module.controlnet.state_dict()
    shared = [key for key in state if not key.startswith("controlnet_")]
    assert len(shared) > 30 and all(torch.equal(state[key], base[key]) for key in shared)
    assert any(not torch.equal(state[key], torch.zeros_like(state[key])) for key in shared)
    own = [key for key in state if key.startswith("controlnet_")]
    zeroed = [key for key in own if not key.startswith("controlnet_cond_embedding.conv_in")
              and not key.startswith("controlnet_cond_embedding.blocks")]
    assert zeroed and all(not state[key].any() for key in zeroed)
    # one residual per UNet skip: MONAI adds residuals with zip, which would silently drop any missing one
    unet = module.base.ema.module
    skips = 1 + sum(len(block.resnets) + (block.downsampler is not None) for block in unet.down_blocks)
    assert len(module.controlnet.controlnet_down_blocks) == skips
    # a ControlNet whose shapes differ from the UNet's is refused rather than half copied
    from monai.networks.nets import ControlNet

    other = ControlNet(spatial_dims=3, in_channels=4, channels=(8, 16), attention_levels=(False, True),
                       num_res_blocks=1, num_head_channels=8, norm_num_groups=8, num_class_embeds=3)
    with pytest.raises(ValueError, match=r"could not copy \d+ weights of the UNet in base.ckpt"):
        copy_base_weights(other, unet, "base.ckpt")


@pytest.mark.parametrize("conditioning", ["pool", "embed"])
def test_a_new_controlnet_leaves_predictions_and_samples_unchanged(latent_checkpoint: Path, conditioning: str) -> None:
    module = _module(latent_checkpoint, conditioning=conditioning)
    base = module.base
    seg = _seg()
    condition = module.condition(seg)
    assert condition.shape == ((2, 3, 4, 4, 4) if conditioning == "pool" else (2, 3, 16, 16, 16))
    x, t, labels = torch.randn(2, 4, 4, 4, 4), torch.tensor([10, 900]), torch.tensor([0, 1])
    residuals = module.residuals(x, t, labels, condition)
    assert len(residuals["down_residuals"]) == 4 and not residuals["mid_residual"].any()
    assert all(not r.any() for r in residuals["down_residuals"])
    with torch.no_grad():
        assert torch.equal(module(x, t, labels, condition), base.ema_forward(x, t, labels))
    for guidance in (1.0, 3.0):
        controlled = module.generate(seg, torch.tensor([0, 1]), num_steps=3, guidance_scale=guidance, seed=5)
        plain = base.generate(2, torch.tensor([0, 1]), num_steps=3, guidance_scale=guidance, seed=5)
        assert torch.equal(controlled, plain), guidance
    with torch.no_grad():  # the check can fail: a non-zero ControlNet output changes the prediction
        module.controlnet.controlnet_mid_block.conv.bias.fill_(0.1)
        assert not torch.equal(module(x, t, labels, condition), base.ema_forward(x, t, labels))


def test_label_channels_and_unknown_labels_are_refused() -> None:
    seg = torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)
    seg[0, 0, 0, 0, :] = torch.tensor([1, 2, 4, 0], dtype=torch.uint8)
    channels = mask_channels(seg)
    assert channels.shape == (1, 3, 4, 4, 4) and channels.dtype == torch.float32
    assert channels[0, :, 0, 0, :].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
    assert channels.sum() == 3
    no_oedema = torch.where(seg == 2, torch.zeros_like(seg), seg)
    assert mask_channels(no_oedema, (4, 1))[0, :, 0, 0, :].tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    assert [c["meaning"] for c in label_channels((1, 2, 4))] == ["necrotic core", "oedema", "enhancing tumour"]
    seg[0, 0, 1, 1, 1], seg[0, 0, 2, 2, 2], seg[0, 0, 3, 3, 3] = 3, 255, 255
    with pytest.raises(ValueError, match=r"seg holds labels \[3, 255\] \(voxels per label: \{3: 1, 255: 2\}\)"):
        mask_channels(seg)
    with pytest.raises(ValueError, match=r"seg holds labels \[4\]"):
        mask_channels(torch.full((1, 1, 2, 2, 2), 4, dtype=torch.uint8), (1, 2))
    with pytest.raises(ValueError, match=r"not allowed: \[3\]"):
        label_channels((1, 3))
    pooled = pool_to(mask_channels(_seg(1)), 4)
    assert pooled.shape == (1, 3, 4, 4, 4) and pooled.min() >= 0 and pooled.sum(1).max() <= 1
    torch.testing.assert_close(pooled.mean(), mask_channels(_seg(1)).mean())  # fractions keep the label volume


def test_wrong_data_and_embedding_are_refused(latent_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"was trained on 1-channel 16³ volumes with 2 classes, the data has "
                                         r"1-channel 32³"):
        ControlNetModule(str(latent_checkpoint), spatial_size=32)
    with pytest.raises(ValueError, match=r"embedding_channels \[8, 16\] must have 3 entries"):
        _module(latent_checkpoint, conditioning="embed", embedding_channels=(8, 16))
    assert _module(latent_checkpoint, conditioning="embed").embedding_channels == (8, 16, 32)
    with pytest.raises(FileNotFoundError, match=r"base_checkpoint .*missing.ckpt does not exist"):
        _module(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="masks must be 16³"):
        _module(latent_checkpoint).condition(_seg(size=8))


def _save(module: ControlNetModule, path: Path) -> Path:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def test_the_checkpoint_records_its_base_and_a_changed_or_missing_base_is_refused(latent_checkpoint: Path,
                                                                                 tmp_path: Path) -> None:
    base = Path(shutil.copy(latent_checkpoint, tmp_path / "base.ckpt"))
    module = _module(base)
    with torch.no_grad():
        module.controlnet.controlnet_mid_block.conv.bias.fill_(0.25)
    path = _save(module, tmp_path / "controlnet.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    record = checkpoint[CONTROLNET_KEY]
    assert record["base_checkpoint"] == str(base.resolve()) and record["base_sha256"] == sha256_of(base)
    assert [c["label"] for c in record["label_channels"]] == [1, 2, 4] and record["conditioning"] == "pool"
    assert {key.split(".")[0] for key in checkpoint["state_dict"]} == {"controlnet", "ema", "skipped_steps"}
    loaded = ControlNetModule.from_msrl_checkpoint(path)
    assert torch.equal(loaded.controlnet.controlnet_mid_block.conv.bias, torch.full((8,), 0.25))
    with pytest.raises(ValueError, match="was not written by msrl train-controlnet"):
        ControlNetModule.from_msrl_checkpoint(base)
    with pytest.raises(ValueError, match="no msrl_diffusion"):
        DiffusionModule.from_msrl_checkpoint(path)
    changed = torch.load(base, weights_only=True)  # the same model, one weight changed
    changed["state_dict"]["ema.module.conv_in.conv.bias"] += 1
    torch.save(changed, base)
    where = re.escape(str(base.resolve()))
    with pytest.raises(ValueError, match=rf"base checkpoint {where} is not the one ControlNet checkpoint .*controlnet"):
        ControlNetModule.from_msrl_checkpoint(path)
    with pytest.raises(ValueError, match=rf"base checkpoint {where} is not the one this ControlNet"):
        _module(base).on_load_checkpoint(checkpoint)  # resuming with --ckpt_path over a changed base
    base.unlink()
    missing = rf"base checkpoint {where} does not exist \(ControlNet checkpoint .*controlnet.ckpt records it"
    with pytest.raises(FileNotFoundError, match=missing):
        ControlNetModule.from_msrl_checkpoint(path)


class _NaNLoss(ControlNetModule):
    """A ControlNet whose training loss is NaN on every step."""

    def loss(self, *args: object, **kwargs: object) -> torch.Tensor:
        return super().loss(*args, **kwargs) * float("nan")


def test_non_finite_losses_skip_their_steps_then_stop(cohort_cache: Path, latent_checkpoint: Path) -> None:
    from datamodules import TemplateCohortDataModule

    module = _NaNLoss(str(latent_checkpoint), spatial_size=16, max_nonfinite_steps=2)
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, batch_size=2)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match="non-finite in 2 steps in a row"):
        trainer.fit(module, data)
    assert int(module.skipped_steps) == 2 and not module.controlnet.controlnet_mid_block.conv.weight.any()


def _train(cache: Path, base: Path, runs: Path, *extra: str) -> Path:
    main(["train-controlnet", "-c", CONFIG, "--model.base_checkpoint", str(base), *cli_data_args(cache),
          "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs), *extra])
    return runs / "controlnet" / "version_0" / "checkpoints" / "last.ckpt"


def test_the_cli_trains_it_and_resume_is_exact(cohort_cache: Path, latent_checkpoint: Path, tmp_path: Path) -> None:
    whole = _train(cohort_cache, latent_checkpoint, tmp_path / "whole", "--trainer.max_epochs", "2")
    half = _train(cohort_cache, latent_checkpoint, tmp_path / "half", "--trainer.max_epochs", "1")
    resumed = _train(cohort_cache, latent_checkpoint, tmp_path / "resumed", "--trainer.max_epochs", "2",
                     "--ckpt_path", str(half))
    a, b = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["global_step"] == b["global_step"] == 6  # 6 training subjects, batch 2, 2 epochs
    assert a[CONTROLNET_KEY]["base_sha256"] == sha256_of(latent_checkpoint)
    start = torch.load(half, weights_only=True)["state_dict"]
    assert not torch.equal(a["state_dict"]["controlnet.controlnet_mid_block.conv.weight"],
                           start["controlnet.controlnet_mid_block.conv.weight"])  # the second epoch trained
    assert a["state_dict"]["controlnet.controlnet_mid_block.conv.weight"].any()  # away from the zero init
    assert set(a["state_dict"]) == set(b["state_dict"])
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert (whole.parents[1] / "config.yaml").is_file()


def test_print_config_shows_the_settings_and_no_noise_schedule(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train-controlnet", "-c", CONFIG, "--print_config"])
    printed = capsys.readouterr().out
    assert "base_checkpoint: runs/pretrain/version_0/checkpoints/last.ckpt" in printed
    assert "conditioning: pool" in printed and "TemplateCohortDataModule" in printed
    assert "noise_scheduler" not in printed  # the base's schedule is the one used


@pytest.mark.slow  # 13–20 s: make test-full (make test stays under 10 minutes)
def test_two_process_ddp_trains_every_controlnet_weight(cohort_cache: Path, latent_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    """DDP without find_unused_parameters fails at the second step if any trainable weight misses the loss."""
    command = [MSRL, "train-controlnet", "-c", CONFIG, "--model.base_checkpoint", str(latent_checkpoint),
               *cli_data_args(cohort_cache), "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "controlnet/version_0/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # 6 training subjects, batch 2, 2 ranks: 2 steps
    assert checkpoint["state_dict"]["controlnet.controlnet_mid_block.conv.weight"].any()
