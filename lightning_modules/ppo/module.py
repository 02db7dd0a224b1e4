"""`PPOFinetuneModule`: DDPO-style PPO fine-tuning of a pretrained 3D diffusion model (docs/design.md §3).

One training step is one PPO iteration: roll out DDIM trajectories with the current policy, each class
equally often on every rank (keeping every x_t and log-probability), score the final volumes with a reward module,
normalise the rewards per class across all DDP ranks, then update the policy with the clipped PPO
objective, recomputing log-probabilities of the stored steps.

The policy, rollout, reward logs (`ppo/reward/*`, `ppo/reward_raw/*`) and checkpoint records (`msrl_rollout`,
`msrl_reward`, `msrl_finetune`) are the shared ones of `FinetuneBase` (lightning_modules/finetune/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from datamodules.base import VolumeDataModule
from lightning_modules.diffusion.lora import DEFAULT_TARGETS
from lightning_modules.diffusion.sampling import Trajectory
from lightning_modules.finetune.base import FinetuneBase
from lightning_modules.finetune.labels import check_legacy_class_probs
from lightning_modules.ppo.advantages import ClassAdvantageNormaliser
from lightning_modules.ppo.update import TIMESTEP_WEIGHTINGS, PPOUpdate


class PPOFinetuneModule(PPOUpdate, FinetuneBase):
    """PPO on the denoising steps of a pretrained `DiffusionModule`, against any reward module.

    Args:
        init_checkpoint: a checkpoint of `msrl pretrain` (read with weights_only=True).
        reward: the reward module (contract of lightning_modules/finetune/reward.py), e.g. a `MultiScaleReward`.
        samples_per_iteration: volumes rolled out per rank and iteration; for a class-conditional model a
            multiple of its classes: each class gets samples_per_iteration / num_classes of them on every rank
            (`rollout_labels`), so per-class advantages never rest on 0 or 1 rollout.
        num_steps: DDIM steps of a rollout.
        eta: DDIM η of the rollout (> 0: the policy must be stochastic).
        class_probs: retired (batches are balanced); accepted as None or uniform only, so that configs and
            checkpoints written before still load.
        guidance_scale: classifier-free guidance weight of rollouts and updates (1: none).
        init_from_ema: start the policy from the pretrained EMA weights (else the raw weights).
        trainable_blocks: prefixes of UNet parameter names to train (None: every weight),
            e.g. ["up_blocks", "out"]. Not with LoRA (choose `lora_targets` instead).
        lora_rank: rank of LoRA adapters (PEFT) to train instead of the UNet's weights; 0: full
            fine-tuning. With LoRA the frozen base is the KL reference, the optimiser and the EMA
            hold the adapters only, and checkpoints hold the adapters plus the base checkpoint's
            path and SHA-256 (lightning_modules/diffusion/lora.py).
        lora_alpha: LoRA's α; the adapters' update is scaled by α/r (None: α = r).
        lora_targets: UNet layers that get adapters, by name or name ending (Conv3d and Linear).
        num_inner_epochs: PPO passes over each iteration's samples.
        timestep_fraction: share of the stochastic denoising steps trained on per inner epoch.
        micro_batch_size: samples per forward pass in the update; gradients of all chosen steps of a
            micro-batch accumulate into one optimiser step (DDP syncs only on the last).
        logprob_reduction: "mean" or "sum" of the per-voxel log-density; the clip range belongs to it.
        clip_range: PPO's ε (1e-4 fits "mean", as in DDPO; "sum" needs a larger one).
        adv_clip_max: advantages are clipped to ±this.
        advantage_mode: "batch" or "running" per-class statistics.
        kl_coef: weight of the KL to the frozen pretrained model per step (DPOK); 0: no reference.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW's (β1, β2). β2 sets how long large gradients keep later steps small: with full
            fine-tuning, the pull-back gradients that follow Adam's first, sign-like step
            (docs/studies.md#adams-first-step).
        lr_warmup_iterations: k > 0: the learning rate rises linearly over the first k PPO iterations
            (lr·i/k in iteration i = 1..k, logged as ppo/lr); 0: `lr` from the start. It softens Adam's first
            step, which moves every weight by ~lr whatever its gradient (docs/studies.md#adams-first-step).
        timestep_weighting: "none": every chosen step's surrogate counts alike, so the last stochastic step,
            whose log-probability gradient is by far the largest, decides the update; "equal": each step's loss
            is weighted by σ_t/|∂μ/∂ε̂| (mean 1), giving every step the same gradient scale
            (`equal_gradient_weights`; docs/studies.md#timestep-weighting-and-fraction).
        max_grad_norm: gradient-norm clip.
        ema_decay: EMA of the policy weights (what `msrl sample` uses afterwards).
        iterations_per_epoch: PPO iterations per Lightning epoch (epochs only pace checkpoints).
        image_every_n_iterations: log middle slices of the rollout volumes every k iterations.
        seed: seed of rollouts and update shuffles (with the iteration and rank: resumable).
        max_nonfinite_steps: an optimiser step with non-finite gradients is skipped and counted
            (ppo/skipped_steps); this many in a row stop the run.
        controlnet_checkpoint: an `msrl train-controlnet` checkpoint of `init_checkpoint` (its recorded base
            SHA-256 is checked): every rollout is drawn from a lesion mask through this frozen ControlNet,
            in the rollout and in the update (lightning_modules/finetune/masks.py); None: no masks.
        mask_data: with `controlnet_checkpoint`, the data module whose training split's masks (`seg`) the
            rollouts draw, each from its class's masks.
    """

    metric_prefix = "ppo"
    algorithm = "PPO"

    def __init__(
        self, init_checkpoint: str, reward: nn.Module, samples_per_iteration: int = 4, num_steps: int = 20,
        eta: float = 1.0, class_probs: Sequence[float] | None = None, guidance_scale: float = 1.0,
        init_from_ema: bool = True, trainable_blocks: Sequence[str] | None = None, num_inner_epochs: int = 1,
        timestep_fraction: float = 1.0, micro_batch_size: int = 2,
        logprob_reduction: Literal["mean", "sum"] = "mean", clip_range: float = 1e-4, adv_clip_max: float = 5.0,
        advantage_mode: Literal["batch", "running"] = "batch", kl_coef: float = 0.0, lr: float = 1e-5,
        weight_decay: float = 0.0, max_grad_norm: float = 1.0, ema_decay: float = 0.9, iterations_per_epoch: int = 5,
        image_every_n_iterations: int = 5, seed: int = 0, max_nonfinite_steps: int = 5, lora_rank: int = 0,
        lora_alpha: float | None = None, lora_targets: Sequence[str] = DEFAULT_TARGETS,
        adam_betas: tuple[float, float] = (0.9, 0.999), lr_warmup_iterations: int = 0,
        timestep_weighting: Literal["none", "equal"] = "none", controlnet_checkpoint: str | None = None,
        mask_data: VolumeDataModule | None = None,
    ) -> None:
        super().__init__()
        if eta <= 0:
            raise ValueError(f"eta must be > 0 for PPO (a deterministic step has no log-probability), got {eta}")
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise ValueError(f"timestep_weighting must be one of {list(TIMESTEP_WEIGHTINGS)}, "
                             f"got {timestep_weighting!r}")
        self.save_hyperparameters(ignore=["reward", "mask_data"])
        self.build_policy(reward, full_reference=kl_coef > 0, mask_data=mask_data)
        num_classes = self.policy.hparams.num_classes
        check_legacy_class_probs(class_probs, num_classes)
        self.advantages = ClassAdvantageNormaliser(num_classes, advantage_mode, clip=adv_clip_max)

    # One PPO iteration -------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Rollout → reward → advantages → clipped-PPO update; logs under ppo/."""
        times = {}
        start = self.clock()
        labels, trajectory, samples = self.rollout()
        masks = self.rollout_masks(labels)  # what the rollout was drawn from (None without a conditioner)
        times["rollout"] = self.clock() - start
        start = self.clock()
        volumes = self.policy.to_images(samples)  # a latent model's decoder runs here, part of the reward step
        times["decode"] = self.clock() - start
        with torch.no_grad():
            rewards, components = self.score(volumes, labels, masks)
        times["reward"] = self.clock() - start
        start = self.clock()
        advantages = self.compute_advantages(rewards, labels)
        stats = self.update(trajectory, labels, advantages, self.rollout_condition(masks))
        times["update"] = self.clock() - start
        self.iteration += 1
        stats["advantage/abs_mean"] = advantages.abs().mean()
        self.log_iteration(rewards, components, labels, stats, times, volumes)

    def rollout(self) -> tuple[torch.Tensor | None, Trajectory, torch.Tensor]:
        """Sample `samples_per_iteration` trajectories with the current policy (no grad, eval mode).

        Returns the labels, the trajectory (every x_t and log-probability, in latent space for a
        latent model) and the final samples (latents or volumes; `policy.to_images` makes volumes).
        """
        return self.sample_rollout(return_trajectory=True, reduction=self.hparams.logprob_reduction)

    def compute_advantages(self, rewards: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Normalise per class over the rewards of all ranks; return this rank's share [B].

        rewards, labels: this rank's [B]; gathered rank-major ([world · B]), so this rank's share is the
        slice [rank · B, (rank + 1) · B). With balanced labels each class's statistics rest on
        world · B / num_classes rewards.
        """
        every_reward = self.all_gather(rewards).reshape(-1)
        every_label = None if labels is None else self.all_gather(labels).reshape(-1)
        advantages = self.advantages(every_reward, every_label)
        batch = rewards.shape[0]
        return advantages[self.global_rank * batch : (self.global_rank + 1) * batch]
