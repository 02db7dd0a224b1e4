"""`FinetuneBase`: what every reward fine-tuner of a pretrained `DiffusionModule` shares (docs/design.md §3, §3a).

PPO (`lightning_modules/ppo/`) and reward backpropagation (`lightning_modules/backprop/`) differ only in how
they turn rewards into a gradient. Everything else is here, written once: the policy (from the EMA or raw
pretrained weights, LoRA adapters or chosen blocks, its EMA, the frozen base), the rollout (balanced labels,
seeded noise, the recorded DDIM sampler), scoring with the reward, the logs (under the fine-tuner's
`metric_prefix`), the learning-rate warm-up, the non-finite-step guard and the checkpoint records that
`msrl sample`, `evaluate`, `export` and `merge-lora` read:

- `msrl_diffusion`: the policy as a diffusion model (weights under `policy.`);
- `msrl_rollout`: {num_steps, eta, guidance_scale} of the sampler that was trained;
- `msrl_reward`: the reward's config and its networks' files with their SHA-256 (`rewards.reward_from_checkpoint`);
- `msrl_finetune`: the algorithm, the module's class and its settings (what the model card states);
- `msrl_lora` (LoRA only): the adapters' settings and base checkpoint; the base weights are left out;
- `msrl_masks` (mask-conditioned runs only): the frozen ControlNet and the mask pool (finetune/masks.py).

A rollout's noise is seeded per sample by (seed, iteration, the sample's index over all ranks), so a DDP
rank draws what one process with the whole batch would draw for the same samples, and a resumed run
draws what the uninterrupted one would have.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from monai.networks.schedulers import DDIMScheduler
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from datamodules.base import VolumeDataModule
from datamodules.resumable import ResumableLoader
from lightning_modules.checkpoint_io import public_class_path
from lightning_modules.diffusion.lora import (
    LORA_KEY,
    AdapterEMA,
    adapters_disabled,
    add_lora,
    drop_base_weights,
    lora_record,
)
from lightning_modules.diffusion.module import DIFFUSION_KEY, DiffusionModule
from lightning_modules.diffusion.sampling import Reduction, Trajectory, gaussian_noise, guided_prediction, sample
from lightning_modules.finetune.labels import balanced_labels
from lightning_modules.finetune.masks import MaskConditioning
from lightning_modules.finetune.reward import RAW_TOTAL, REWARD_KEY, raw_total_of, reward_networks, score_components
from lightning_modules.lightning_internals import cli_model_arguments
from lightning_modules.visualize import slice_grid

BASE_PREFIXES = ("policy.unet.", "policy.ema.module.")  # where a LoRA run's frozen base weights sit
ROLLOUT_KEY = "msrl_rollout"  # the checkpoint's record of the sampler that was trained
FINETUNE_KEY = "msrl_finetune"  # the checkpoint's record of the algorithm and its settings
# callable(x, t, labels) → prediction; called with `condition=` (the ControlNet's input) in mask-conditioned runs
Denoiser = Callable[..., torch.Tensor]


class FinetuneBase(MaskConditioning, L.LightningModule):
    """The policy, rollout, scoring, logging and checkpoints of a reward fine-tuner (manual optimisation).

    A subclass records its arguments (`save_hyperparameters(ignore=["reward"])`; they must include
    init_checkpoint, samples_per_iteration, num_steps, eta, guidance_scale, init_from_ema, trainable_blocks,
    lora_rank/alpha/targets, lr, weight_decay, adam_betas, lr_warmup_iterations, max_grad_norm, ema_decay,
    iterations_per_epoch, image_every_n_iterations, seed, max_nonfinite_steps; controlnet_checkpoint for
    mask conditioning), calls `build_policy`, and implements `training_step`, logging through `log_iteration`.
    """

    metric_prefix: ClassVar[str] = "finetune"  # logs are <metric_prefix>/reward/mean, …/reward_raw/total, …
    algorithm: ClassVar[str] = "fine-tuning"  # how the model card names the method

    def __init__(self) -> None:
        super().__init__()
        given = cli_model_arguments()  # LightningCLI's config of this module; None when built in Python
        self.reward_config: dict[str, Any] | None = given.get("reward") if given else None
        self.mask_data_config: Any = given.get("mask_data") if given else None
        self.automatic_optimization = False

    def build_policy(self, reward: nn.Module, full_reference: bool, mask_data: VolumeDataModule | None = None) -> None:
        """Load the pretrained policy, add LoRA or choose the trainable blocks, set up the EMA and the reward.

        Args:
            reward: the reward module; frozen and in eval mode here (gradients still reach its input).
            full_reference: keep a frozen copy of the pretrained UNet (needed by a penalty to the pretrained
                model under full fine-tuning; with LoRA the base with its adapters off is that model).
            mask_data: with `controlnet_checkpoint`, the data module whose training masks rollouts are drawn
                from (`MaskConditioning.build_conditioner`).
        """
        hp = self.hparams
        if len(hp.adam_betas) != 2 or not all(0 <= b < 1 for b in hp.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(hp.adam_betas)}")
        if hp.lr_warmup_iterations < 0:
            raise ValueError(f"lr_warmup_iterations must be >= 0 (0: no warm-up), got {hp.lr_warmup_iterations}")
        if hp.lora_rank < 0 or (hp.lora_rank > 0 and hp.trainable_blocks is not None):
            raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {hp.lora_rank}; with LoRA choose the "
                             f"layers by lora_targets, not trainable_blocks ({hp.trainable_blocks})")
        self.policy = DiffusionModule.from_msrl_checkpoint(hp.init_checkpoint)
        if hp.init_from_ema:
            self.policy.unet.load_state_dict(self.policy.ema.module.state_dict())
        self.lora = None if hp.lora_rank == 0 else lora_record(
            hp.lora_rank, hp.lora_alpha, hp.lora_targets, hp.init_checkpoint, "ema" if hp.init_from_ema else "raw")
        if self.lora is not None:  # the base stays frozen: it is the reference, with the adapters off
            add_lora(self.policy.unet, hp.lora_rank, hp.lora_alpha, hp.lora_targets)
            self.policy.ema = AdapterEMA(self.policy.unet, hp.ema_decay)
        else:
            self.policy.ema = AveragedModel(self.policy.unet, multi_avg_fn=get_ema_multi_avg_fn(hp.ema_decay),
                                            use_buffers=True).requires_grad_(False)
        keep_copy = full_reference and self.lora is None
        self.reference = copy.deepcopy(self.policy.unet).requires_grad_(False).eval() if keep_copy else None
        self.reward = reward.requires_grad_(False).eval()
        self.rollout_labels()  # refuses a samples_per_iteration the classes do not divide, before any rollout
        self.build_conditioner(hp.get("controlnet_checkpoint"), mask_data, reward, self.mask_data_config)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._skips_in_a_row = 0
        if self.lora is None:
            self._select_trainable(hp.trainable_blocks)

    def _select_trainable(self, prefixes: Sequence[str] | None) -> None:
        named = list(self.policy.unet.named_parameters())
        for name, parameter in named:
            parameter.requires_grad_(prefixes is None or any(name.startswith(p) for p in prefixes))
        if not any(p.requires_grad for _, p in named):
            raise ValueError(f"trainable_blocks {list(prefixes or [])} match no UNet parameter; names start with "
                             f"{sorted({n.split('.')[0] for n, _ in named})}")

    # Lightning plumbing ------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """One dummy item per iteration and rank (the distributed sampler splits them)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return ResumableLoader(range(self.hparams.iterations_per_epoch * world), batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable UNet weights (the adapters only, with LoRA)."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay, betas=tuple(self.hparams.adam_betas))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The UNet weights the optimiser moves."""
        return [p for p in self.policy.unet.parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint readable by `msrl sample` like a pretraining one; record sampler, reward, algorithm."""
        hp = self.hparams
        checkpoint[DIFFUSION_KEY] = self.policy.diffusion_spec(prefix="policy.")
        checkpoint[ROLLOUT_KEY] = {"num_steps": int(hp.num_steps), "eta": float(hp.eta),
                                      "guidance_scale": float(hp.guidance_scale)}
        checkpoint[REWARD_KEY] = {"config": copy.deepcopy(self.reward_config),
                                     "networks": reward_networks(self.reward)}
        checkpoint[FINETUNE_KEY] = {"algorithm": self.algorithm, "class_path": public_class_path(type(self)),
                                    "settings": {key: value for key, value in hp.items()
                                                 if not key.startswith("_") and key != "init_checkpoint"}}
        self.save_mask_record(checkpoint)
        if self.lora is not None:
            checkpoint[LORA_KEY] = copy.deepcopy(self.lora)
            checkpoint["state_dict"] = drop_base_weights(checkpoint["state_dict"], BASE_PREFIXES)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming a LoRA run: same adapters over the same base file; put the (unsaved) base weights back.
        A mask-conditioned run resumes with the same ControlNet and mask pool (`check_mask_record`)."""
        self.check_mask_record(checkpoint)
        record = checkpoint.get(LORA_KEY)
        if (record is None) != (self.lora is None):
            raise ValueError(f"the checkpoint resumed was written {'with' if record else 'without'} LoRA, this run is "
                             f"configured {'with' if self.lora else 'without'}: resume with its lora_rank")
        if record is None:
            return
        keys = ("rank", "alpha", "targets", "base_sha256", "base_weights")
        if any(record[key] != self.lora[key] for key in keys):
            raise ValueError(f"the checkpoint resumed holds LoRA {[record[k] for k in keys]} over "
                             f"{record['base_checkpoint']}; this run is configured with {[self.lora[k] for k in keys]} "
                             f"over {self.lora['base_checkpoint']}: resume with the same init_checkpoint and lora_*")
        own = self.state_dict()
        kept = drop_base_weights(own, BASE_PREFIXES)
        checkpoint["state_dict"] = {**{k: v for k, v in own.items() if k not in kept}, **checkpoint["state_dict"]}

    # The rollout -------------------------------------------------------------------------------
    def rollout_labels(self) -> torch.Tensor | None:
        """Class labels of one rank's rollouts [samples_per_iteration] (None for an unconditional model).

        0, 1, …, K−1, 0, 1, …: each class samples_per_iteration / K times, the same on every rank and
        iteration (`balanced_labels`); all ranks together hold world_size · samples_per_iteration / K per class.
        """
        if self.policy.null_class is None:
            return None
        return balanced_labels(self.hparams.samples_per_iteration, self.policy.hparams.num_classes, self.device)

    def rollout_generators(self) -> list[torch.Generator]:
        """One generator per rollout of this rank, seeded by (seed, iteration, the sample's index over all ranks)."""
        count = self.hparams.samples_per_iteration
        first = self.global_rank * count
        return [torch.Generator(device=self.device).manual_seed(
            hash((self.hparams.seed, int(self.iteration), first + index)) % 2**62) for index in range(count)]

    def sample_rollout(self, return_trajectory: bool = False, reduction: Reduction = "mean", grad_steps: int = 0,
                       denoiser: Denoiser | None = None) -> tuple[torch.Tensor | None, Trajectory | None, torch.Tensor]:
        """Sample `samples_per_iteration` volumes with the current policy and the recorded DDIM sampler.

        Args:
            return_trajectory: keep every x_t and log-probability (PPO).
            reduction: the log-probabilities' reduction (`sample`).
            grad_steps: K last steps whose autograd graph is kept (reward backpropagation); 0: no gradients,
                and the UNet runs in eval mode.
            denoiser: callable(x, t, labels) → prediction (default: the policy's UNet); in a mask-conditioned
                run called with `condition=`, this iteration's masks as the ControlNet reads them.

        Returns:
            The labels, the trajectory (or None) and the final samples (latents for a latent model).
        """
        hp, policy = self.hparams, self.policy
        generators = self.rollout_generators()
        labels = self.rollout_labels()
        condition = self.rollout_condition(self.rollout_masks(labels))
        model = denoiser or self.policy_forward
        if condition is not None:
            model = partial(model, condition=condition)
        noise = gaussian_noise((hp.samples_per_iteration, *policy.sample_shape), generators, self.device)
        was_training = policy.unet.training
        if grad_steps == 0:
            policy.unet.eval()
        samples, trajectory = sample(model, self.scheduler, noise, labels,
                                     num_steps=hp.num_steps, eta=hp.eta, guidance_scale=hp.guidance_scale,
                                     null_class=policy.null_class, generator=generators,
                                     return_trajectory=return_trajectory, reduction=reduction, grad_steps=grad_steps)
        policy.unet.train(was_training)
        return labels, trajectory, samples

    @property
    def scheduler(self) -> DDIMScheduler:
        """The DDIM scheduler over the pretrained model's own noise schedule."""
        if not hasattr(self, "_scheduler"):
            self._scheduler = self.policy.ddim_scheduler()
        return self._scheduler

    def predict(self, unet: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        """A UNet's prediction, guided as in the rollout (with the conditioner's residuals for `condition`)."""

        def model(x_: torch.Tensor, t_: torch.Tensor, y_: torch.Tensor | None) -> torch.Tensor:
            return self.unet_prediction(unet, x_, t_, y_, condition)

        return guided_prediction(model, x, timesteps, labels, self.hparams.guidance_scale, self.policy.null_class)

    def frozen_base(self) -> AbstractContextManager[nn.Module]:
        """The frozen pretrained UNet: a copy (full fine-tuning) or the policy with its adapters off (LoRA)."""
        return adapters_disabled(self.policy.unet) if self.lora is not None else nullcontext(self.reference)

    # Optimisation ------------------------------------------------------------------------------
    def current_lr(self) -> float:
        """This iteration's learning rate: `lr`, ramped linearly over the first `lr_warmup_iterations`."""
        warmup = self.hparams.lr_warmup_iterations
        return self.hparams.lr * min(1.0, (int(self.iteration) + 1) / warmup) if warmup > 0 else self.hparams.lr

    def clip_and_step(self, optimizer: Any) -> torch.Tensor | None:
        """Clip the gradient norm, step and update the EMA; skip (and count) a step with non-finite gradients.

        Returns the gradient norm before clipping, or None for a skipped step. Gradients are all-reduced
        before this, so every rank decides alike.
        """
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.hparams.max_grad_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self._skip_step()
            return None
        self._skips_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.policy.ema.update_parameters(self.policy.unet)
        return grad_norm.detach()

    def _skip_step(self) -> None:
        """Count a skipped optimiser step; stop after `max_nonfinite_steps` in a row."""
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        if self._skips_in_a_row >= self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.algorithm} gradients were non-finite in {self._skips_in_a_row} optimiser steps in a row "
                f"(iteration {int(self.iteration)}); likely causes: a learning rate too high (lr={self.hparams.lr}), "
                "fp16 (use bf16-mixed or 32-true), or settings of the method that do not fit together")

    # Scoring and logging -----------------------------------------------------------------------
    def clock(self) -> float:
        """Wall time after the GPU has finished its queued work (CUDA is asynchronous; <prefix>/time/* must not lie)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def log_iteration(self, rewards: torch.Tensor, components: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      stats: dict[str, torch.Tensor], times: dict[str, float], volumes: torch.Tensor) -> None:
        """Log one iteration under `metric_prefix`.

        `reward/mean`, `reward/std` and `reward/class_<k>` are the total as the reward returns it (normalised
        by running statistics under `MultiScaleReward(normalise=True)`, so they can fall while every raw
        component rises); `reward/<component>` is a component's raw value on this rank's samples.
        `reward_raw/<component>` and `reward_raw/total` (Σ_k w_k · raw_k) are raw means over every rank's
        samples: read those to ask whether the reward rose (docs/design.md §7). `stats` and `times` (seconds
        per phase) are the algorithm's own.
        """
        prefix = self.metric_prefix
        rewards, components = rewards.detach(), {k: v.detach() for k, v in components.items()}
        every = self.all_gather(rewards).reshape(-1)
        metrics = {f"{prefix}/reward/mean": every.mean(), f"{prefix}/reward/std": every.std(unbiased=False),
                   f"{prefix}/iteration": self.iteration.float()}
        for name, value in components.items():
            metrics[f"{prefix}/reward/{name}"] = value.mean()
        raw = {**components, RAW_TOTAL: raw_total_of(self.reward, rewards, components)}
        every_raw = self.all_gather(torch.stack(list(raw.values()))).reshape(-1, len(raw), rewards.shape[0])
        for name, value in zip(raw, every_raw.mean(dim=(0, 2)), strict=True):
            metrics[f"{prefix}/reward_raw/{name}"] = value
        if labels is not None:
            for k in range(self.policy.hparams.num_classes):
                if (labels == k).any():
                    metrics[f"{prefix}/reward/class_{k}"] = rewards[labels == k].mean()
        metrics.update({f"{prefix}/{key}": value for key, value in stats.items()})
        metrics.update({f"{prefix}/time/{key}": torch.tensor(value) for key, value in times.items()})
        self.log(f"{prefix}/reward/mean", metrics.pop(f"{prefix}/reward/mean"), prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)
        every_k = self.hparams.image_every_n_iterations
        if every_k > 0 and int(self.iteration) % every_k == 0 and self.trainer.is_global_zero \
                and isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_image(f"{prefix}/samples", slice_grid(volumes[:4].detach()),
                                             int(self.iteration))

    def score(self, volumes: torch.Tensor, labels: torch.Tensor | None, masks: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward's total [B] and raw components of volumes (with gradients where grad mode is on); `masks`
        (`rollout_masks`) reach the reward's parts that read them."""
        return score_components(self.reward, volumes, labels, masks)


def finetune_tags(suffix: str) -> tuple[str, ...]:
    """`<prefix>/<suffix>` for every fine-tuner's prefix (what figures read from either algorithm's runs)."""
    return tuple(f"{prefix}/{suffix}" for prefix in metric_prefixes())


def metric_prefixes() -> tuple[str, ...]:
    """The metric prefixes of every fine-tuner defined (subclasses of `FinetuneBase`), PPO's first."""
    return tuple(algorithm_names())


def algorithm_names() -> dict[str, str]:
    """{metric prefix: the method's name (`algorithm`)} of every fine-tuner defined, PPO's first; for a prefix
    several classes share, the first class found (breadth first: the fine-tuner before its subclasses)."""
    found: dict[str, str] = {}
    pending = list(FinetuneBase.__subclasses__())
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.metric_prefix, cls.algorithm)
        pending.extend(cls.__subclasses__())
    return dict(sorted(found.items(), key=lambda item: item[0] != "ppo"))
