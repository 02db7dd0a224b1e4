"""The latent pair: a PPO rollout in a VQ-GAN's latent space, decoding included, against the same rollout in voxels.

Both sides are `PPOFinetuneModule`s built by `benchmarks.finetuning.ppo_module`, with the same
number of volumes and DDIM steps; the latent one's pretrained model names an autoencoder. The
autoencoder is freshly initialised and saved in-process (`AutoencoderModule.from_msrl_checkpoint`
reads the file): an untrained first stage costs what a trained one does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.pretraining import autocast
from benchmarks.settings import Autoencoder, BenchConfig
from lightning_modules.ppo.module import PPOFinetuneModule

PHASES = ("rollout", "decode", "scoring", "update")  # scoring: the reward minus the decoder


def untrained_autoencoder(autoencoder: Autoencoder, workdir: Path) -> Path:
    """Write a freshly initialised `AutoencoderModule` of these sizes as an msrl autoencoder checkpoint.

    The file holds what `msrl train-autoencoder` writes for loading: `msrl_autoencoder` (class,
    arguments, scale factor 1, latent shape) and the state dict.
    """
    from lightning_modules.first_stage.vqgan import AutoencoderModule

    module = AutoencoderModule(**autoencoder.module_kwargs())
    path = workdir / "autoencoder.ckpt"
    torch.save({"msrl_autoencoder": module.autoencoder_spec(), "state_dict": module.state_dict()}, path)
    return path


def rollout_to_volumes(module: PPOFinetuneModule, config: BenchConfig) -> Callable[[], None]:
    """One PPO rollout as `training_step` runs it, up to the volumes the reward scores.

    `PPOFinetuneModule.rollout()` (trajectory and log-probs kept), then `policy.to_images`: the
    frozen decoder for a latent policy, a clamp for a voxel one. A and B of `latent_rollout_ratio`.
    """
    def run() -> None:
        with autocast(config.device, config.precision):
            _, _, samples = module.rollout()
            module.policy.to_images(samples)

    return run


def latent_split(iteration: dict[str, float]) -> dict[str, float]:
    """A PPO iteration's seconds per phase, the reward's decoder taken out of it (`ppo/time/reward` includes it)."""
    return {"rollout": iteration["rollout"], "decode": iteration["decode"],
            "scoring": iteration["reward"] - iteration["decode"], "update": iteration["update"],
            "iteration": iteration["iteration"]}
