"""Bad numbers and bad files: non-finite losses are skipped and counted, crafted pickles refused."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import TemplateCohortDataModule
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.cli import main
from rewards import InterSliceContinuityReward, SliceCriticReward
from tests.conftest import REPO, TINY_MODEL, cli_data_args

BRATS_PRETRAIN = ["-c", str(REPO / "configs/pretrain/base.yaml"), "-c", str(REPO / "configs/pretrain/brats2019.yaml")]


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_are_refused_and_run_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": _Payload(marker), "msrl_diffusion": {}}, evil)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--checkpoint", str(evil), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1 and "evil.ckpt was refused" in capsys.readouterr().err
    with pytest.raises(ValueError, match="was refused"):
        PPOFinetuneModule(str(evil), InterSliceContinuityReward())
    with pytest.raises(ValueError, match="was refused"):
        SliceCriticReward(checkpoint=str(evil))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_crafted_weight_files_of_evaluation_and_latent_models_are_refused(
        tmp_path: Path, cohort_cache: Path, capsys: pytest.CaptureFixture) -> None:
    """Feature extractors, the first stage, the perceptual loss and `msrl evaluate`: each path loads weights-only."""
    from lightning_modules.first_stage.losses import MedicalNetPerceptualLoss
    from lightning_modules.first_stage.vqgan import AutoencoderModule
    from msrl.evaluation.extractors import ClassifierFeatureExtractor, MedicalNetExtractor, SliceExtractor

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload(marker)}, evil)
    for build in (lambda: MedicalNetExtractor(weights_path=str(evil)), lambda: SliceExtractor(weights_path=str(evil)),
                  lambda: ClassifierFeatureExtractor(str(evil)), lambda: AutoencoderModule.from_msrl_checkpoint(evil),
                  lambda: MedicalNetPerceptualLoss(evil)):
        with pytest.raises(ValueError, match="evil.pth was refused"):
            build()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(evil), "--skip-utility", "true", "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 1 and "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(evil), "--skip-utility", "true", "--out", str(tmp_path / "eval"),
              "--data-config", str(REPO / "configs/data/template.yaml"), *cli_data_args(cohort_cache)])
    assert exit_info.value.code == 1 and "evil.pth was refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "eval").exists()


class _SometimesNaN(DiffusionModule):
    """Returns NaN losses on the steps listed in `nan_steps`."""

    nan_steps: set[int] = set()

    def diffusion_loss(self, *args, **kwargs) -> torch.Tensor:
        loss = super().diffusion_loss(*args, **kwargs)
        if self.training and self.global_step in self.nan_steps:
            return loss * float("nan")
        return loss


def _fit(model: DiffusionModule, cache: Path, steps: int) -> L.Trainer:
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, batch_size=2)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, data)
    return trainer


def test_a_non_finite_loss_skips_its_step_and_is_counted(cohort_cache: Path) -> None:
    model = _SometimesNaN(in_channels=1, spatial_size=16, preview_every_n_epochs=0, **TINY_MODEL)
    model.nan_steps = {1}
    before = [p.detach().clone() for p in model.unet.parameters()]
    trainer = _fit(model, cohort_cache, steps=3)
    assert int(model.skipped_steps) >= 1 and trainer.logged_metrics["train/skipped_steps"] >= 1
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())  # NaN never reached the weights
    assert any(not torch.equal(a, b) for a, b in zip(before, model.unet.parameters(), strict=True))


def test_non_finite_losses_in_a_row_stop_with_the_likely_causes(cohort_cache: Path) -> None:
    model = _SometimesNaN(in_channels=1, spatial_size=16, preview_every_n_epochs=0, max_nonfinite_steps=3,
                          **TINY_MODEL)
    model.nan_steps = set(range(100))  # every step
    with pytest.raises(FloatingPointError, match="non-finite in 3 steps in a row.*learning rate"):
        _fit(model, cohort_cache, steps=10)


def test_config_errors_stop_before_any_compute(pretrained_checkpoint: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import REPO

    finetune = ["finetune", "-c", str(REPO / "configs/finetune/template.yaml"), "--model.init_checkpoint",
                str(pretrained_checkpoint), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    for extra, named in ((["--model.reward", "rewards.NoSuchReward"], "NoSuchReward"),
                         (["--model.lr", "fast"], "lr"), (["--model.clip_rnage", "0.1"], "clip_rnage")):
        with pytest.raises(SystemExit) as exit_info:
            main([*finetune, *extra])
        assert exit_info.value.code != 0 and named in capsys.readouterr().err
    monkeypatch.delenv("MSRL_BRATS2019_ROOT", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", *BRATS_PRETRAIN, "--trainer", str(REPO / "configs/trainer/cpu.yaml"),
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code == 1 and "autoencoder_brats2019" in capsys.readouterr().err  # the latent default
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", *BRATS_PRETRAIN, "--model.autoencoder_checkpoint", "null",
              "--trainer", str(REPO / "configs/trainer/cpu.yaml"), "--trainer.logger.init_args.save_dir",
              str(tmp_path)])
    assert exit_info.value.code == 1 and "MSRL_BRATS2019_ROOT" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


class _NaNPPO(PPOFinetuneModule):
    """PPO whose loss turns NaN: every optimiser step would see non-finite gradients."""

    def _step_loss(self, *args, **kwargs):
        loss, stats = super()._step_loss(*args, **kwargs)
        return loss * float("nan"), stats


def test_ppo_skips_non_finite_updates_then_stops(pretrained_checkpoint: Path) -> None:
    module = _NaNPPO(str(pretrained_checkpoint), InterSliceContinuityReward(), num_steps=4, micro_batch_size=2,
                     samples_per_iteration=4, max_nonfinite_steps=3, iterations_per_epoch=3)
    before = {n: p.detach().clone() for n, p in module.policy.unet.named_parameters()}
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match="non-finite in 3 optimiser steps in a row"):
        trainer.fit(module)
    assert int(module.skipped_steps) == 3
    for name, parameter in module.policy.unet.named_parameters():
        assert torch.equal(parameter, before[name]), name  # nothing non-finite was applied


def test_a_non_finite_reward_names_the_component_and_the_samples() -> None:
    from rewards import score_components

    class Half(torch.nn.Module):
        name = "half"

        def forward(self, volumes, labels=None):
            return torch.tensor([0.0, float("nan"), 1.0, float("inf")])

    with pytest.raises(FloatingPointError, match=r"half returned non-finite values for samples \[1, 3\]"):
        score_components(Half(), torch.zeros(4, 1, 4, 4, 4), None)
