"""Tests of PPO fine-tuning: reward goes up, checkpoints sample and resume, the pieces are right."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_modules.ppo.advantages import ClassAdvantageNormaliser, clipped_surrogate
from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.cli import main
from rewards import InterSliceContinuityReward
from tests.conftest import REPO

TEMPLATE = str(REPO / "configs/finetune/template.yaml")


class BrightnessReward(torch.nn.Module):
    """A user's own reward, plugged in by class_path with no change to msrl: brighter is better."""

    name = "brightness"

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return volumes.float().mean(dim=(1, 2, 3, 4))


def _finetune(checkpoint: Path, runs: Path, *extra: str) -> Path:
    main(["finetune", "-c", TEMPLATE, "--model.init_checkpoint", str(checkpoint),
          "--model.reward", "tests.lightning_modules.test_ppo.BrightnessReward", "--model.num_steps", "10",
          "--model.lr", "0.001",
          # pinned here, whatever the demo config says: the settings this test's margin was measured with
          "--model.samples_per_iteration", "4", "--model.micro_batch_size", "2", "--model.advantage_mode", "batch",
          "--model.timestep_fraction", "1.0",
          "--trainer.callbacks", "[]",  # the config's held-out FID guard reads 32³ data (msrl/test_heldout_guard.py)
          "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs), *extra])
    return runs / "finetune" / "version_0"


def _scalars(run: Path, tag: str) -> list[float]:
    return [event.value for event in EventAccumulator(str(run)).Reload().Scalars(tag)]


@pytest.fixture(scope="module")
def finetuned(pretrained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 PPO iterations on the tiny 16³ model against the brightness reward."""
    return _finetune(pretrained_checkpoint, tmp_path_factory.mktemp("ppo"), "--trainer.max_epochs", "3")


def test_reward_rises_over_the_iterations(finetuned: Path) -> None:
    rewards = _scalars(finetuned, "ppo/reward/mean")
    assert len(rewards) == 15
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last - first > 0.02, rewards  # seen: about 0.05, with iteration noise of about 0.01
    tags = EventAccumulator(str(finetuned)).Reload().Tags()
    for tag in ("ppo/reward/brightness", "ppo/reward/class_0", "ppo/reward/class_1", "ppo/approx_kl", "ppo/clipfrac",
                "ppo/ratio_mean", "ppo/loss", "ppo/grad_norm", "ppo/advantage/abs_mean", "ppo/time/rollout",
                "ppo/time/reward", "ppo/time/update", "ppo/reward/std", "ppo/first_ratio/max_abs_dev",
                "ppo/first_ratio/clipfrac"):
        assert tag in tags["scalars"], tag
    assert "ppo/samples" in tags["images"]


def test_finetuned_checkpoint_samples_like_a_pretrained_one(finetuned: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    main(["sample", "--checkpoint", str(finetuned / "checkpoints/last.ckpt"), "--num-samples", "2", "--steps", "3",
          "--out", str(out)])
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_resume_continues_the_same_run(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    short = ["--model.iterations_per_epoch", "2"]
    whole = _finetune(pretrained_checkpoint, tmp_path / "whole", *short, "--trainer.max_epochs", "2")
    half = _finetune(pretrained_checkpoint, tmp_path / "half", *short, "--trainer.max_epochs", "1")
    resumed = _finetune(pretrained_checkpoint, tmp_path / "resumed", *short, "--trainer.max_epochs", "2",
                        "--ckpt_path", str(half / "checkpoints/last.ckpt"))
    assert _scalars(half, "ppo/reward/mean") + _scalars(resumed, "ppo/reward/mean") == pytest.approx(
        _scalars(whole, "ppo/reward/mean"), abs=1e-6)
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)
    assert int(b["state_dict"]["iteration"]) == 4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)


def test_trainable_blocks_and_kl_to_the_pretrained_model(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    module = PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), trainable_blocks=["out"],
                               kl_coef=0.1, num_steps=5, iterations_per_epoch=1)
    trainable = {n for n, p in module.policy.unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("out") for n in trainable)
    before = {n: p.detach().clone() for n, p in module.policy.unet.named_parameters()}
    import lightning as L

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    changed = {n for n, p in module.policy.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert trainer.logged_metrics["ppo/kl_to_pretrained"] > 0


@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=pytest.mark.slow)])
def test_ratio_is_one_before_the_first_optimiser_step(pretrained_checkpoint: Path, precision: str) -> None:
    """Rollout and update must compute the same log-density: before any step r = 1 (logged every iteration)."""
    import lightning as L

    module = PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), num_steps=4, samples_per_iteration=4,
                               micro_batch_size=2, iterations_per_epoch=1, lr=1e-3)
    dtypes = set()
    module.policy.unet.register_forward_hook(lambda unet, inputs, output: dtypes.add(output.dtype))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, precision=precision,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    metrics = trainer.logged_metrics
    deviation, clipfrac = float(metrics["ppo/first_ratio/max_abs_dev"]), float(metrics["ppo/first_ratio/clipfrac"])
    assert clipfrac == 0.0
    if precision == "32-true":
        assert deviation < 1e-6 and dtypes == {torch.float32}
    else:  # the UNet ran in bf16 in rollout and update; log-probs and the ratio are fp32 (sampling.py)
        assert deviation < module.hparams.clip_range and torch.bfloat16 in dtypes
    assert trainer.logged_metrics["ppo/approx_kl"] > 0  # the second micro-batch followed an optimiser step


@pytest.mark.parametrize("bad, match", [
    (dict(eta=0.0), "eta must be > 0"), (dict(trainable_blocks=["nope"]), "match no UNet parameter"),
    (dict(class_probs=[1.0]), "class_probs"), (dict(timestep_fraction=0.0), "timestep_fraction"),
    (dict(samples_per_iteration=5), "samples_per_iteration must be a positive multiple of the model's 2 classes"),
    (dict(adam_betas=(0.9, 1.0)), "adam_betas"),
])
def test_bad_settings_are_explained(pretrained_checkpoint: Path, bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), **bad)


def test_adam_betas_reach_the_optimiser(pretrained_checkpoint: Path) -> None:
    module = PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), adam_betas=(0.9, 0.9))
    assert module.configure_optimizers().param_groups[0]["betas"] == (0.9, 0.9)


def test_missing_checkpoint_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        PPOFinetuneModule(str(tmp_path / "missing.ckpt"), InterSliceContinuityReward())


def test_advantages_are_normalised_per_class_and_clipped() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 0.0, 1000.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    advantages = ClassAdvantageNormaliser(2, clip=2.0)(rewards, labels)
    for k in (0, 1):
        group = rewards[labels == k]
        expected = ((group - group.mean()) / group.std(unbiased=False)).clamp(-2, 2)
        torch.testing.assert_close(advantages[labels == k], expected, atol=1e-5, rtol=0)
    running = ClassAdvantageNormaliser(2, mode="running", momentum=0.5)
    running(rewards, labels)
    running(rewards + 4.0, labels)
    assert running.running.count.tolist() == [2, 2]
    torch.testing.assert_close(running.running.mean[0], torch.tensor(rewards[labels == 0].mean().item() + 2.0,
                                                                     dtype=torch.float64))


def test_advantages_are_per_class_over_every_rank() -> None:
    """Two simulated ranks with balanced labels: each rank's share is normalised by both ranks' class statistics."""
    from types import SimpleNamespace

    rewards = [torch.tensor([1.0, 10.0, 2.0, 20.0]), torch.tensor([5.0, 50.0, 6.0, 80.0])]
    labels = [torch.tensor([0, 1, 0, 1])] * 2  # what rollout_labels gives every rank

    def on_rank(rank: int) -> torch.Tensor:
        gather = lambda t: torch.stack(labels if t.dtype == torch.long else rewards)  # noqa: E731 — [world, B]
        fake = SimpleNamespace(all_gather=gather, global_rank=rank, advantages=ClassAdvantageNormaliser(2))
        return PPOFinetuneModule.compute_advantages(fake, rewards[rank], labels[rank])

    shares = torch.cat([on_rank(0), on_rank(1)])
    class_0, class_1 = torch.tensor([1.0, 2.0, 5.0, 6.0]), torch.tensor([10.0, 20.0, 50.0, 80.0])
    expected = torch.empty(8)
    expected[0::2] = (class_0 - 3.5) / class_0.std(unbiased=False)
    expected[1::2] = (class_1 - 40.0) / class_1.std(unbiased=False)
    torch.testing.assert_close(shares, expected, atol=1e-5, rtol=0)
    assert (shares[:4] < 0).all() and (shares[4:] > 0).all()  # one rank's own statistics would give ±1 instead


def test_clipped_surrogate_matches_the_formula() -> None:
    old = torch.zeros(4)
    new = torch.tensor([0.0, 0.3, -0.3, 0.05])
    advantages = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, stats = clipped_surrogate(new, old, advantages, clip_range=0.1)
    ratio = new.exp()
    expected = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.9, 1.1)).mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clipfrac"] == 0.5 and stats["approx_kl"] == pytest.approx(0.5 * (0.09 * 2 + 0.0025) / 4)
