"""Tests of mask-conditioned fine-tuning (lightning_modules/finetune/masks.py): masks drawn from the training split
within each class, seeded so that ranks and resumed runs draw the same; the frozen ControlNet's residuals in rollouts
and updates; one PPO and one reward-backpropagation run with the mask reward; records and refusals."""

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import TemplateCohortDataModule
from datamodules.digest import sha256_of
from lightning_modules.backprop.module import RewardBackpropModule
from lightning_modules.controlnet import ControlNetModule
from lightning_modules.finetune.masks import MASKS_KEY
from lightning_modules.ppo.module import PPOFinetuneModule
from rewards import InterSliceContinuityReward, MaskFidelityReward
from tests.rewards.test_mask_reward import segmenter_checkpoint  # noqa: F401  (a fixture)

SMALL = dict(num_steps=3, samples_per_iteration=2, iterations_per_epoch=1, image_every_n_iterations=0)


def _controlnet(base: Path, path: Path) -> Path:
    """A ControlNet checkpoint of `base` whose residuals are not zero (its EMA's mid-block bias set)."""
    module = ControlNetModule(str(base), in_channels=1, spatial_size=16, num_classes=2)
    with torch.no_grad():
        for network in (module.controlnet, module.ema.module):
            network.controlnet_mid_block.conv.bias.fill_(0.5)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def controlnet_checkpoint(latent_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _controlnet(latent_checkpoint, tmp_path_factory.mktemp("controlnet") / "controlnet.ckpt")


def _data(cache: Path) -> TemplateCohortDataModule:
    return TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, batch_size=2, val_fraction=0.25,
                                    test_fraction=0.0)


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


class _Recording(PPOFinetuneModule):
    """PPO that keeps the masks it drew at each iteration."""

    def rollout_masks(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        masks = super().rollout_masks(labels)
        self.__dict__.setdefault("drawn", {}).setdefault(int(self.iteration), masks.clone())
        return masks


def test_masks_are_drawn_within_each_class_the_same_on_any_rank(
        latent_checkpoint: Path, controlnet_checkpoint: Path, cohort_cache: Path, segmenter_checkpoint: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    reward = MaskFidelityReward(str(segmenter_checkpoint))
    module = PPOFinetuneModule(str(latent_checkpoint), reward, controlnet_checkpoint=str(controlnet_checkpoint),
                               mask_data=_data(cohort_cache), **{**SMALL, "samples_per_iteration": 4})
    labels = module.rollout_labels()
    pool = module._masks
    lesions = {bytes(mask.numpy().tobytes()) for mask in pool if mask.any()}
    assert labels.tolist() == [0, 1, 0, 1] and len(lesions) >= 2
    drawn = []
    for iteration in range(6):
        module.iteration.fill_(iteration)
        masks = module.rollout_masks(labels)
        assert masks.shape == (4, 1, 16, 16, 16) and masks.dtype == torch.uint8
        assert not masks[labels == 0].any()  # the healthy class draws the healthy masks
        assert all(bytes(mask.numpy().tobytes()) in lesions for mask in masks[labels == 1])
        assert torch.equal(module.rollout_masks(labels), masks)  # a function of (seed, iteration, sample index)
        drawn.append(masks)
    assert any(not torch.equal(drawn[0], later) for later in drawn[1:])
    half = PPOFinetuneModule(str(latent_checkpoint), reward, controlnet_checkpoint=str(controlnet_checkpoint),
                             mask_data=_data(cohort_cache), **SMALL)
    half.iteration.fill_(5)
    monkeypatch.setattr(PPOFinetuneModule, "global_rank", property(lambda self: 1))
    assert torch.equal(half.rollout_masks(half.rollout_labels()), drawn[5][2:])  # rank 1 of 2 draws samples 2 and 3
    # the ControlNet's residuals change the policy's prediction, and rollout and update predict alike
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([500, 500])
    condition = half.rollout_condition(drawn[5][2:])
    with torch.no_grad():
        plain = half.policy_forward(x, t, half.rollout_labels())
        controlled = half.policy_forward(x, t, half.rollout_labels(), condition)
        assert not torch.allclose(plain, controlled)
        torch.testing.assert_close(half.predict(half.policy.unet, x, t, half.rollout_labels(), condition), controlled)


def test_one_ppo_iteration_with_the_mask_reward_records_it_and_a_resumed_run_draws_the_same_masks(
        latent_checkpoint: Path, controlnet_checkpoint: Path, cohort_cache: Path, segmenter_checkpoint: Path,  # noqa: F811
        tmp_path: Path) -> None:
    def build() -> _Recording:
        torch.manual_seed(0)  # the LoRA adapters' initialisation, as seed_everything gives a CLI run
        return _Recording(str(latent_checkpoint), MaskFidelityReward(str(segmenter_checkpoint)), kl_coef=0.1,
                          lora_rank=2, controlnet_checkpoint=str(controlnet_checkpoint), mask_data=_data(cohort_cache),
                          **SMALL)

    whole, trainer = build(), _trainer(2)
    trainer.fit(whole)
    metrics = trainer.logged_metrics
    assert "ppo/reward/mask_fidelity" in metrics and 0 <= float(metrics["ppo/reward_raw/total"]) <= 1
    assert float(metrics["ppo/first_ratio/max_abs_dev"]) < 1e-4  # the update predicts with the rollout's masks
    assert float(metrics["ppo/kl_to_pretrained"]) >= 0
    trainer.save_checkpoint(tmp_path / "whole.ckpt")
    checkpoint = torch.load(tmp_path / "whole.ckpt", weights_only=True)
    assert checkpoint["msrl_reward"]["networks"] == [{"component": "mask_fidelity", "path": str(segmenter_checkpoint),
                                                      "sha256": sha256_of(segmenter_checkpoint)}]
    record = checkpoint[MASKS_KEY]
    assert record["controlnet_sha256"] == sha256_of(controlnet_checkpoint) and record["pool_size"] == 6
    assert record["controlnet"]["base_sha256"] == sha256_of(latent_checkpoint)
    assert checkpoint["msrl_finetune"]["settings"]["controlnet_checkpoint"] == str(controlnet_checkpoint)
    assert not any("controlnet" in key for key in checkpoint["state_dict"])  # frozen, outside the state dict
    half, trainer = build(), _trainer(1)
    trainer.fit(half)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = build()
    _trainer(2).fit(resumed, ckpt_path=tmp_path / "half.ckpt")
    assert set(resumed.drawn) == {1} and torch.equal(resumed.drawn[1], whole.drawn[1])
    assert torch.equal(half.drawn[0], whole.drawn[0])
    final, again = whole.state_dict(), resumed.state_dict()
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    other = dict(checkpoint, **{MASKS_KEY: dict(record, pool_sha256="0" * 64)})
    with pytest.raises(ValueError, match="written with another mask pool"):
        resumed.on_load_checkpoint(other)
    with pytest.raises(ValueError, match="written without a ControlNet conditioner, this run is configured with"):
        resumed.on_load_checkpoint({key: value for key, value in checkpoint.items() if key != MASKS_KEY})


def test_one_backprop_iteration_ascends_the_mask_reward_through_the_controlnet(
        latent_checkpoint: Path, controlnet_checkpoint: Path, cohort_cache: Path,
        segmenter_checkpoint: Path) -> None:  # noqa: F811
    module = RewardBackpropModule(str(latent_checkpoint), MaskFidelityReward(str(segmenter_checkpoint)),
                                  backprop_steps=2, base_penalty=0.5, lora_rank=2,
                                  controlnet_checkpoint=str(controlnet_checkpoint), mask_data=_data(cohort_cache),
                                  **SMALL)
    before = {n: p.detach().clone() for n, p in module.policy.unet.named_parameters() if p.requires_grad}
    trainer = _trainer(1)
    trainer.fit(module)
    metrics = trainer.logged_metrics
    assert "backprop/reward/mask_fidelity" in metrics and float(metrics["backprop/grad_norm"]) > 0
    after = dict(module.policy.unet.named_parameters())
    assert any(not torch.equal(after[name], value) for name, value in before.items())


def test_masks_without_their_controlnet_and_a_controlnet_of_another_base_are_refused(
        latent_checkpoint: Path, controlnet_checkpoint: Path, cohort_cache: Path, segmenter_checkpoint: Path,  # noqa: F811
        tmp_path: Path) -> None:
    reward = MaskFidelityReward(str(segmenter_checkpoint))
    with pytest.raises(ValueError, match=r"mask_fidelity \(MaskFidelityReward\) score volumes .*: set "
                                         r"controlnet_checkpoint"):
        PPOFinetuneModule(str(latent_checkpoint), reward, **SMALL)
    with pytest.raises(ValueError, match="needs mask_data"):
        PPOFinetuneModule(str(latent_checkpoint), reward, controlnet_checkpoint=str(controlnet_checkpoint), **SMALL)
    other = tmp_path / "other.ckpt"
    changed = torch.load(latent_checkpoint, weights_only=True)  # the same model, one weight changed
    changed["state_dict"]["ema.module.conv_in.conv.bias"] += 1
    torch.save(changed, other)
    foreign = _controlnet(other, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=r"conditions .*other.ckpt .*not init_checkpoint"):
        RewardBackpropModule(str(latent_checkpoint), InterSliceContinuityReward(), controlnet_checkpoint=str(foreign),
                             mask_data=_data(cohort_cache), **SMALL)


def test_msrl_finetune_runs_the_mask_config(latent_checkpoint: Path, controlnet_checkpoint: Path, cohort_cache: Path,
                                            segmenter_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    import json

    from msrl.cli import main
    from tests.conftest import REPO

    reward = {"class_path": "rewards.MaskFidelityReward", "init_args": {"checkpoint": str(segmenter_checkpoint)}}
    main(["finetune", "-c", str(REPO / "configs/finetune/template_mask.yaml"),
          "--model.init_args.init_checkpoint", str(latent_checkpoint),
          "--model.init_args.controlnet_checkpoint", str(controlnet_checkpoint),
          "--model.init_args.reward", json.dumps(reward),
          *[f"--model.init_args.mask_data.init_args.{key}={value}" for key, value in
            {"num_subjects": 8, "spatial_size": 16, "cache_dir": cohort_cache, "val_fraction": 0.25,
             "test_fraction": 0.0}.items()],
          "--model.init_args.num_steps", "3", "--model.init_args.samples_per_iteration", "2",
          "--model.init_args.micro_batch_size", "2", "--model.init_args.lora_rank", "2",
          "--model.init_args.iterations_per_epoch", "1", "--model.init_args.guidance_scale", "1.0",
          "--trainer.max_epochs", "1", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    checkpoint = torch.load(tmp_path / "finetune_mask/version_0/checkpoints/last.ckpt", weights_only=True)
    record = checkpoint[MASKS_KEY]
    assert record["mask_data"]["class_path"] == "datamodules.TemplateCohortDataModule"
    assert record["mask_data"]["init_args"]["num_subjects"] == 8 and record["pool_size"] == 6
    config = checkpoint["msrl_reward"]["config"]  # jsonargparse keeps the config file's `name: multiscale`
    assert config["class_path"] == reward["class_path"]
    assert config["init_args"]["checkpoint"] == str(segmenter_checkpoint)
    assert checkpoint["msrl_reward"]["networks"][0]["sha256"] == sha256_of(segmenter_checkpoint)
