"""Tests of reward backpropagation: the gradient through K steps is right, K = 0 trains nothing, rules refuse,
resume is exact, the checkpoints sample, and differentiable decoding passes gradients."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_modules.backprop.module import RewardBackpropModule
from lightning_modules.first_stage.vqgan import AutoencoderModule
from msrl.cli import main
from rewards import BrainMaskPlausibilityReward, IntensityHistogramReward, InterSliceContinuityReward, MultiScaleReward
from tests.conftest import REPO, TINY_AUTOENCODER, tiny_training
from tests.lightning_modules.test_ppo import BrightnessReward

SMALL = dict(num_steps=3, samples_per_iteration=2, iterations_per_epoch=1, image_every_n_iterations=0)


def _loss(module: RewardBackpropModule) -> torch.Tensor:
    """−mean reward of this iteration's samples, the graph of the last `backprop_steps` steps kept."""
    _, _, samples = module.sample_rollout(grad_steps=module.kept_steps(), denoiser=module.denoiser([]))
    rewards, _ = module.score(module.to_volumes(samples), module.rollout_labels())
    return -rewards.mean()


def test_gradient_through_all_steps_equals_finite_differences(pretrained_checkpoint: Path) -> None:
    module = RewardBackpropModule(str(pretrained_checkpoint), BrightnessReward(), backprop_steps=3, **SMALL)
    parameters = module.trainable_parameters()
    torch.manual_seed(0)
    direction = [torch.randn_like(p) for p in parameters]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    direction = [d / norm for d in direction]
    gradients = torch.autograd.grad(_loss(module), parameters)  # through checkpointed UNet calls
    analytic = sum((g * d).sum() for g, d in zip(gradients, direction, strict=True))
    epsilon, losses = 1e-3, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(parameters, direction, strict=True):
                p.add_(sign * epsilon * d)
            losses.append(float(_loss(module)))
            for p, d in zip(parameters, direction, strict=True):
                p.sub_(sign * epsilon * d)
    numeric = (losses[0] - losses[1]) / (2 * epsilon)
    assert abs(float(analytic)) > 1e-4  # the reward does depend on the weights along this direction
    assert float(analytic) == pytest.approx(numeric, rel=0.03)
    truncated = RewardBackpropModule(str(pretrained_checkpoint), BrightnessReward(), backprop_steps=1, **SMALL)
    first = torch.autograd.grad(_loss(truncated), truncated.trainable_parameters())
    assert not torch.allclose(first[0], gradients[0])  # K = 1 keeps less of the graph: another gradient


def test_zero_steps_leave_the_weights_unchanged(pretrained_checkpoint: Path) -> None:
    module = RewardBackpropModule(str(pretrained_checkpoint), BrightnessReward(), backprop_steps=0, **SMALL)
    before = {n: p.detach().clone() for n, p in module.policy.unet.named_parameters()}
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert int(module.iteration) == 1 and "backprop/reward_raw/total" in trainer.logged_metrics
    for name, parameter in module.policy.unet.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_non_differentiable_rules_are_refused_by_name(pretrained_checkpoint: Path) -> None:
    reward = MultiScaleReward([InterSliceContinuityReward(), BrainMaskPlausibilityReward(name="mask")])
    with pytest.raises(ValueError, match=r"not: mask \(BrainMaskPlausibilityReward\)"):
        RewardBackpropModule(str(pretrained_checkpoint), reward)
    assert IntensityHistogramReward.differentiable is False and InterSliceContinuityReward.differentiable


def test_random_k_is_drawn_per_iteration_and_repeats(pretrained_checkpoint: Path) -> None:
    module = RewardBackpropModule(str(pretrained_checkpoint), BrightnessReward(), backprop_steps=3,
                                  random_backprop_steps=True, **SMALL)
    drawn = []
    for iteration in (0, 1, 2, 3, 4, 5, 0):
        module.iteration.fill_(iteration)
        drawn.append(module.kept_steps())
    assert set(drawn) <= {1, 2, 3} and len(set(drawn)) > 1 and drawn[0] == drawn[-1]
    # every rank and a resumed run draw the same K: nothing may depend on the process (e.g. str hashing)
    script = ("import sys; from lightning_modules.backprop.module import RewardBackpropModule; "
              "from tests.lightning_modules.test_ppo import BrightnessReward; "
              "m = RewardBackpropModule(sys.argv[1], BrightnessReward(), backprop_steps=3, "
              f"random_backprop_steps=True, **{SMALL!r}); "
              "print([m.iteration.fill_(i) is not None and m.kept_steps() for i in range(6)])")
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", script, str(pretrained_checkpoint)], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        assert out == str(drawn[:6]), (hash_seed, out, drawn[:6])


def _finetune(checkpoint: Path, runs: Path, *extra: str) -> Path:
    main(["finetune", "-c", str(REPO / "configs/finetune/template_backprop.yaml"),
          "--model.init_args.init_checkpoint", str(checkpoint),
          "--model.init_args.reward", "tests.lightning_modules.test_ppo.BrightnessReward",
          "--model.init_args.num_steps", "3", "--model.init_args.backprop_steps", "2",
          "--model.init_args.samples_per_iteration", "2", "--model.init_args.lora_rank", "0",
          "--model.init_args.base_penalty", "0.1", "--model.init_args.iterations_per_epoch", "2",
          "--model.init_args.guidance_scale", "1.0",  # the template's 3 would double each tiny UNet call
          "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(runs), *extra])
    return runs / "finetune_backprop" / "version_0"


def test_the_cli_runs_it_and_resume_is_exact(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    whole = _finetune(pretrained_checkpoint, tmp_path / "whole", "--trainer.max_epochs", "2")
    half = _finetune(pretrained_checkpoint, tmp_path / "half", "--trainer.max_epochs", "1")
    resumed = _finetune(pretrained_checkpoint, tmp_path / "resumed", "--trainer.max_epochs", "2",
                        "--ckpt_path", str(half / "checkpoints/last.ckpt"))
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)
    assert int(b["state_dict"]["iteration"]) == 4
    assert a["msrl_finetune"]["algorithm"] == "reward backpropagation"
    assert a["msrl_finetune"]["class_path"] == "lightning_modules.RewardBackpropModule"
    assert a["msrl_rollout"] == {"num_steps": 3, "eta": 1.0, "guidance_scale": 1.0}
    moved = False
    start = torch.load(half / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)
        moved |= key.startswith("policy.unet.") and not torch.equal(value, start[key])
    assert moved  # the weights changed between the two halves: the resumed half did train
    out = tmp_path / "samples"
    main(["sample", "--checkpoint", str(whole / "checkpoints/last.ckpt"), "--num-samples", "2", "--steps", "2",
          "--out", str(out)])
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_straight_through_decoding_equals_the_lookup_and_passes_gradients() -> None:
    torch.manual_seed(0)
    autoencoder = AutoencoderModule(training=tiny_training(), **TINY_AUTOENCODER).eval().requires_grad_(False)
    latents = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    decoded = autoencoder.decode_latent_with_grad(latents)
    torch.testing.assert_close(decoded, autoencoder.decode_latent(latents))
    (gradient,) = torch.autograd.grad(decoded.sum(), latents)
    assert gradient.abs().sum() > 0  # the hard lookup alone would pass none
