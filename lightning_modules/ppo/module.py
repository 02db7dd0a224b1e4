"""`PPOFinetuneModule`: DDPO-style PPO fine-tuning of a pretrained 3D diffusion model (docs/design.md §3).

One training step is one PPO iteration: roll out DDIM trajectories with the current policy, each class
equally often on every rank (keeping every x_t and log-probability), score the final volumes with a reward module,
normalise the rewards per class across all DDP ranks, then update the policy with the clipped PPO
objective, recomputing log-probabilities of the stored steps.

Logged rewards: `ppo/reward/mean`, `ppo/reward/std` and `ppo/reward/class_<k>` are the total as the
reward returns it, normalised by running statistics under `MultiScaleReward(normalise=True)`, so they
can fall while every raw component rises; `ppo/reward/<component>` is a component's raw value on
rank 0's samples (kept for existing curves). `ppo/reward_raw/<component>` and `ppo/reward_raw/total`
(Σ_k w_k · raw_k; a plain reward's own value) are raw means over every rank's samples: read those to
ask whether the reward rose (docs/design.md §7).

A checkpoint records what produced it: `msrl_rollout` (the rollout sampler) and `msrl_reward` (the
reward's config and its networks' files with their SHA-256), so evaluation can sample like the
rollouts and rebuild the reward (`rewards.reward_from_checkpoint`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from monai.networks.schedulers import DDIMScheduler
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from datamodules.resumable import ResumableLoader
from lightning_modules.diffusion.lora import (
    DEFAULT_TARGETS,
    LORA_KEY,
    AdapterEMA,
    add_lora,
    drop_base_weights,
    lora_record,
)
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.diffusion.sampling import Trajectory, sample
from lightning_modules.lightning_internals import cli_model_arguments
from lightning_modules.ppo.advantages import ClassAdvantageNormaliser
from lightning_modules.ppo.labels import balanced_labels, check_legacy_class_probs
from lightning_modules.ppo.reward import RAW_TOTAL, raw_total_of, reward_networks, score_components
from lightning_modules.ppo.update import TIMESTEP_WEIGHTINGS, PPOUpdate
from lightning_modules.visualize import slice_grid

BASE_PREFIXES = ("policy.unet.", "policy.ema.module.")  # where a LoRA run's frozen base weights sit


class PPOFinetuneModule(PPOUpdate, L.LightningModule):
    """PPO on the denoising steps of a pretrained `DiffusionModule`, against any reward module.

    Args:
        init_checkpoint: a checkpoint of `msrl pretrain` (read with weights_only=True).
        reward: the reward module (contract of `rewards/base.py`), e.g. a `MultiScaleReward`.
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
        adam_betas: AdamW's (β1, β2). β2 sets how long large gradients keep later steps small. On the demo
            the large ones are the second micro-batch's pull-back after Adam's first, sign-like step overshot
            the last stochastic step (t = 53): 5–20× the on-policy gradient, which itself stays constant; with
            0.999 they held the steps at ~0.06·lr by iteration 9 (approx_kl 6e-4 → 8e-9), 0.9 only delays
            that (docs/design.md §3).
        lr_warmup_iterations: k > 0: the learning rate rises linearly over the first k PPO iterations
            (lr·i/k in iteration i = 1..k, logged as ppo/lr); 0: `lr` from the start. Adam's first step moves
            every weight by ~lr whatever its gradient (a sign step): on the demo at lr 3e-4 that step alone raised
            the held-out FID 0.31 → 0.41; with k = 5 it rose to 0.33 (approx_kl then peaked at 5e-5 and still fell
            below 1e-8 once lr reached 3e-4).
        timestep_weighting: "none": every chosen step's surrogate counts alike, so the last stochastic step,
            whose log-probability gradient is ~400× the first's, decides the update; "equal": each step's loss
            is weighted by σ_t/|∂μ/∂ε̂| (mean 1), giving every step the same gradient scale
            (`equal_gradient_weights`).
        max_grad_norm: gradient-norm clip.
        ema_decay: EMA of the policy weights (what `msrl sample` uses afterwards).
        iterations_per_epoch: PPO iterations per Lightning epoch (epochs only pace checkpoints).
        image_every_n_iterations: log middle slices of the rollout volumes every k iterations.
        seed: seed of rollouts and update shuffles (with the iteration and rank: resumable).
        max_nonfinite_steps: an optimiser step with non-finite gradients is skipped and counted
            (ppo/skipped_steps); this many in a row stop the run.
    """

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
        timestep_weighting: Literal["none", "equal"] = "none",
    ) -> None:
        super().__init__()
        given = cli_model_arguments()  # LightningCLI's config of this module; None when built in Python
        self.reward_config: dict[str, Any] | None = given.get("reward") if given else None
        if eta <= 0:
            raise ValueError(f"eta must be > 0 for PPO (a deterministic step has no log-probability), got {eta}")
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if len(adam_betas) != 2 or not all(0 <= b < 1 for b in adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(adam_betas)}")
        if timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise ValueError(f"timestep_weighting must be one of {list(TIMESTEP_WEIGHTINGS)}, "
                             f"got {timestep_weighting!r}")
        if lr_warmup_iterations < 0:
            raise ValueError(f"lr_warmup_iterations must be >= 0 (0: no warm-up), got {lr_warmup_iterations}")
        if lora_rank < 0 or (lora_rank > 0 and trainable_blocks is not None):
            raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {lora_rank}; with LoRA choose the "
                             f"layers by lora_targets, not trainable_blocks ({trainable_blocks})")
        self.save_hyperparameters(ignore=["reward"])
        self.automatic_optimization = False
        self.policy = DiffusionModule.from_msrl_checkpoint(init_checkpoint)
        if init_from_ema:
            self.policy.unet.load_state_dict(self.policy.ema.module.state_dict())
        self.lora = None if lora_rank == 0 else lora_record(lora_rank, lora_alpha, lora_targets, init_checkpoint,
                                                            "ema" if init_from_ema else "raw")
        if self.lora is not None:  # the base stays frozen: it is the KL reference, with the adapters off
            add_lora(self.policy.unet, lora_rank, lora_alpha, lora_targets)
            self.policy.ema = AdapterEMA(self.policy.unet, ema_decay)
        else:
            self.policy.ema = AveragedModel(self.policy.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay),
                                            use_buffers=True).requires_grad_(False)
        full_reference = kl_coef > 0 and self.lora is None
        self.reference = copy.deepcopy(self.policy.unet).requires_grad_(False).eval() if full_reference else None
        self.reward = reward.requires_grad_(False).eval()
        num_classes = self.policy.hparams.num_classes
        check_legacy_class_probs(class_probs, num_classes)
        self.rollout_labels()  # refuses a samples_per_iteration the classes do not divide, before any rollout
        self.advantages = ClassAdvantageNormaliser(num_classes, advantage_mode, clip=adv_clip_max)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._skips_in_a_row = 0
        if self.lora is None:
            self._select_trainable(trainable_blocks)

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
        trainable = [p for p in self.policy.unet.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                 betas=tuple(self.hparams.adam_betas))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint readable by `msrl sample` like a pretraining one; record sampler and reward.

        `msrl_rollout`: {num_steps, eta, guidance_scale} of the rollouts (the sampler that was trained).
        `msrl_reward`: {"config": the reward's {class_path, init_args} as configured (None when the module
        was built in Python), "networks": [{component, path, sha256}, …] of its trained networks}.
        `msrl_lora` (LoRA only): the adapters' settings and base checkpoint; the base weights are left out.
        """
        hp = self.hparams
        checkpoint["msrl_diffusion"] = self.policy.diffusion_spec(prefix="policy.")
        checkpoint["msrl_rollout"] = {"num_steps": int(hp.num_steps), "eta": float(hp.eta),
                                      "guidance_scale": float(hp.guidance_scale)}
        checkpoint["msrl_reward"] = {"config": copy.deepcopy(self.reward_config),
                                     "networks": reward_networks(self.reward)}
        if self.lora is not None:
            checkpoint[LORA_KEY] = copy.deepcopy(self.lora)
            checkpoint["state_dict"] = drop_base_weights(checkpoint["state_dict"], BASE_PREFIXES)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming a LoRA run: same adapters over the same base file; put the (unsaved) base weights back."""
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

    # One PPO iteration -------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Rollout → reward → advantages → clipped-PPO update; logs under ppo/."""
        times = {}
        start = self._clock()
        labels, trajectory, samples = self.rollout()
        times["rollout"] = self._clock() - start
        start = self._clock()
        volumes = self.policy.to_images(samples)  # a latent model's decoder runs here, part of the reward step
        times["decode"] = self._clock() - start
        with torch.no_grad():
            rewards, components = score_components(self.reward, volumes, labels)
        times["reward"] = self._clock() - start
        start = self._clock()
        advantages = self.compute_advantages(rewards, labels)
        stats = self.update(trajectory, labels, advantages)
        times["update"] = self._clock() - start
        self.iteration += 1
        self._log_iteration(rewards, components, labels, advantages, stats, times, volumes)

    def _clock(self) -> float:
        """Wall time after the GPU has finished its queued work (CUDA is asynchronous; ppo/time/* must not lie)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def rollout(self) -> tuple[torch.Tensor | None, Trajectory, torch.Tensor]:
        """Sample `samples_per_iteration` trajectories with the current policy (no grad, eval mode).

        Returns the labels, the trajectory (every x_t and log-probability, in latent space for a
        latent model) and the final samples (latents or volumes; `policy.to_images` makes volumes).
        """
        hp, policy = self.hparams, self.policy
        generator = torch.Generator(device=self.device).manual_seed(
            hash((hp.seed, int(self.iteration), self.global_rank)) % 2**62)
        labels = self.rollout_labels()
        noise = torch.randn((hp.samples_per_iteration, *policy.sample_shape), generator=generator, device=self.device)
        policy.unet.eval()
        volumes, trajectory = sample(policy.forward, self.scheduler, noise, labels, num_steps=hp.num_steps, eta=hp.eta,
                                     guidance_scale=hp.guidance_scale, null_class=policy.null_class,
                                     generator=generator, return_trajectory=True, reduction=hp.logprob_reduction)
        policy.unet.train()
        return labels, trajectory, volumes

    def rollout_labels(self) -> torch.Tensor | None:
        """Class labels of one rank's rollouts [samples_per_iteration] (None for an unconditional model).

        0, 1, …, K−1, 0, 1, …: each class samples_per_iteration / K times, the same on every rank and
        iteration (`balanced_labels`); all ranks together hold world_size · samples_per_iteration / K per class.
        """
        if self.policy.null_class is None:
            return None
        return balanced_labels(self.hparams.samples_per_iteration, self.policy.hparams.num_classes, self.device)

    @property
    def scheduler(self) -> DDIMScheduler:
        """The DDIM scheduler over the pretrained model's own noise schedule."""
        if not hasattr(self, "_scheduler"):
            self._scheduler = self.policy.ddim_scheduler()
        return self._scheduler

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

    def _log_iteration(self, rewards: torch.Tensor, components: dict[str, torch.Tensor], labels: torch.Tensor | None,
                       advantages: torch.Tensor, stats: dict[str, torch.Tensor], times: dict[str, float],
                       volumes: torch.Tensor) -> None:
        every = self.all_gather(rewards).reshape(-1)
        metrics = {"ppo/reward/mean": every.mean(), "ppo/reward/std": every.std(unbiased=False),
                   "ppo/advantage/abs_mean": advantages.abs().mean(), "ppo/iteration": self.iteration.float()}
        for name, value in components.items():
            metrics[f"ppo/reward/{name}"] = value.mean()
        raw = {**components, RAW_TOTAL: raw_total_of(self.reward, rewards, components)}
        every_raw = self.all_gather(torch.stack(list(raw.values()))).reshape(-1, len(raw), rewards.shape[0])
        for name, value in zip(raw, every_raw.mean(dim=(0, 2)), strict=True):
            metrics[f"ppo/reward_raw/{name}"] = value
        if labels is not None:
            for k in range(self.policy.hparams.num_classes):
                if (labels == k).any():
                    metrics[f"ppo/reward/class_{k}"] = rewards[labels == k].mean()
        metrics.update({f"ppo/{key}": value for key, value in stats.items()})
        metrics.update({f"ppo/time/{key}": torch.tensor(value) for key, value in times.items()})
        self.log("ppo/reward/mean", metrics.pop("ppo/reward/mean"), prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)
        every_k = self.hparams.image_every_n_iterations
        if every_k > 0 and int(self.iteration) % every_k == 0 and self.trainer.is_global_zero \
                and isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_image("ppo/samples", slice_grid(volumes[:4]), int(self.iteration))
