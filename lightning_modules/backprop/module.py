"""`RewardBackpropModule`: backpropagating a differentiable reward through the sampler (docs/design.md §3a).

Every learned reward in msrl is a network, differentiable in the volume; PPO (`PPOFinetuneModule`) sees one
scalar per volume. Direct reward backpropagation ascends ∂reward/∂θ itself: DRaFT-K (Clark et al., ICLR 2024)
backpropagates through the last K DDIM steps of a sample; AlignProp (Prabhudesai et al. 2023) draws K at
random per batch. One training step is one iteration: sample with the recorded sampler (the first N − K
steps without gradients, the last K with their graph kept), decode differentiably (a VQ-GAN's codebook
lookup passes gradients straight through, `z + (q(z) − z).detach()`; the KL decoder as it is), score, and
take one AdamW step on −mean(reward) + `base_penalty` · penalty, gradients clipped and (DDP) averaged over
ranks. Gradient checkpointing recomputes each kept UNet call and the decoder in the backward pass, so memory
holds K steps' inputs instead of their activations.

The penalty toward the frozen base is the mean squared difference between the fine-tuned and the frozen
pretrained UNet's predictions at the kept steps' inputs (the raw predictions, before guidance): a cheap
stand-in for the KL of PPO's `kl_coef`, which for two DDIM Gaussians of equal σ is this difference times a
per-step constant. Reward hacking of the critics is fast (docs/studies.md#choosing-study-4s-settings): keep
this penalty, a small LoRA, and the held-out guard's early stop.

Policy, rollout, logs (`backprop/reward/*`, `backprop/reward_raw/*`, `backprop/time/*`) and checkpoint records
are `FinetuneBase`'s, so `msrl sample`, `evaluate`, `export` and `merge-lora` read these checkpoints unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from datamodules.base import VolumeDataModule
from lightning_modules.diffusion.lora import DEFAULT_TARGETS
from lightning_modules.finetune.base import Denoiser, FinetuneBase
from lightning_modules.finetune.reward import non_differentiable_parts


class RewardBackpropModule(FinetuneBase):
    """Reward backpropagation through the last K denoising steps of a pretrained `DiffusionModule`.

    Args:
        init_checkpoint: a checkpoint of `msrl pretrain` (read with weights_only=True).
        reward: a differentiable reward module (contract of lightning_modules/finetune/reward.py); one whose
            parts declare `differentiable = False` (the brain-mask and histogram rules) is refused, naming them.
        samples_per_iteration: volumes sampled per rank and iteration (a multiple of the model's classes).
        num_steps: DDIM steps of a sample (the sampler recorded in checkpoints, as PPO's rollouts).
        eta: DDIM η of the sampler (0: deterministic DDIM; > 0: the noise is part of each sample's seed).
        guidance_scale: classifier-free guidance weight of the sampler (1: none).
        backprop_steps: K, the last denoising steps the gradient flows through (DRaFT-K); 0 trains nothing.
        random_backprop_steps: draw K uniformly in [1, backprop_steps] per iteration, the same on every rank
            (AlignProp's truncated backpropagation); False: K = backprop_steps always.
        gradient_checkpointing: recompute the kept UNet calls and the decoder in the backward pass
            (torch.utils.checkpoint) instead of keeping their activations.
        base_penalty: weight of the mean squared difference to the frozen pretrained UNet's predictions at
            the kept steps (0: none; with full fine-tuning > 0 keeps a frozen copy of the UNet).
        init_from_ema: start the policy from the pretrained EMA weights (else the raw weights).
        trainable_blocks: prefixes of UNet parameter names to train (None: every weight). Not with LoRA.
        lora_rank: rank of LoRA adapters (PEFT) to train instead of the UNet's weights; 0: full fine-tuning.
        lora_alpha: LoRA's α; the adapters' update is scaled by α/r (None: α = r).
        lora_targets: UNet layers that get adapters, by name or name ending (Conv3d and Linear).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW's (β1, β2).
        lr_warmup_iterations: k > 0: the learning rate rises linearly over the first k iterations.
        max_grad_norm: gradient-norm clip.
        ema_decay: EMA of the policy weights (what `msrl sample` uses afterwards).
        iterations_per_epoch: iterations per Lightning epoch (epochs only pace checkpoints).
        image_every_n_iterations: log middle slices of the samples every k iterations.
        seed: seed of the samples' noise and of K (with the iteration and sample index: resumable).
        max_nonfinite_steps: a step with non-finite gradients is skipped and counted; this many in a row stop.
        controlnet_checkpoint: an `msrl train-controlnet` checkpoint of `init_checkpoint`: every sample is drawn
            from a lesion mask through this frozen ControlNet, whose residuals the gradient passes through
            (lightning_modules/finetune/masks.py); None: no masks.
        mask_data: with `controlnet_checkpoint`, the data module whose training split's masks are drawn.
    """

    metric_prefix = "backprop"
    algorithm = "reward backpropagation"

    def __init__(
        self, init_checkpoint: str, reward: nn.Module, samples_per_iteration: int = 2, num_steps: int = 20,
        eta: float = 1.0, guidance_scale: float = 1.0, backprop_steps: int = 1, random_backprop_steps: bool = False,
        gradient_checkpointing: bool = True, base_penalty: float = 0.0, init_from_ema: bool = True,
        trainable_blocks: Sequence[str] | None = None, lora_rank: int = 0, lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_TARGETS, lr: float = 1e-4, weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999), lr_warmup_iterations: int = 0, max_grad_norm: float = 1.0,
        ema_decay: float = 0.9, iterations_per_epoch: int = 5, image_every_n_iterations: int = 5, seed: int = 0,
        max_nonfinite_steps: int = 5, controlnet_checkpoint: str | None = None,
        mask_data: VolumeDataModule | None = None,
    ) -> None:
        super().__init__()
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not 0 <= backprop_steps <= num_steps:
            raise ValueError(f"backprop_steps must be in [0, num_steps={num_steps}], got {backprop_steps}")
        if base_penalty < 0:
            raise ValueError(f"base_penalty must be >= 0 (0: no penalty), got {base_penalty}")
        refused = non_differentiable_parts(reward)
        if refused:
            raise ValueError(f"reward backpropagation needs a differentiable reward; these parts are not: "
                             f"{', '.join(refused)}. Remove them from the reward (or fine-tune with PPO, "
                             "lightning_modules.PPOFinetuneModule, which needs no gradient)")
        self.save_hyperparameters(ignore=["reward", "mask_data"])
        self.build_policy(reward, full_reference=base_penalty > 0, mask_data=mask_data)

    def kept_steps(self) -> int:
        """K of this iteration: `backprop_steps`, or drawn in [1, backprop_steps] from (seed, iteration)."""
        hp = self.hparams
        if not hp.random_backprop_steps or hp.backprop_steps <= 1:
            return int(hp.backprop_steps)
        # numbers only: hash() of a str differs between processes, so ranks and a resumed run would disagree
        generator = torch.Generator().manual_seed(int(hp.seed) * 1_000_003 + int(self.iteration) + 7)
        return int(torch.randint(1, hp.backprop_steps + 1, (), generator=generator))

    # One iteration -----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Sample (graph of the last K steps kept) → decode → reward → one optimiser step; logs under backprop/."""
        optimizer = self.optimizers()
        lr = self.current_lr()
        for group in optimizer.optimizer.param_groups:
            group["lr"] = lr
        kept = self.kept_steps()
        penalties: list[torch.Tensor] = []
        times = {}
        start = self.clock()
        labels, _, samples = self.sample_rollout(grad_steps=kept, denoiser=self.denoiser(penalties))
        times["rollout"] = self.clock() - start
        start = self.clock()
        with torch.set_grad_enabled(kept > 0):
            volumes = self.to_volumes(samples)
            times["decode"] = self.clock() - start
            rewards, components = self.score(volumes, labels, self.rollout_masks(labels))
        times["reward"] = self.clock() - start
        penalty = torch.stack(penalties).mean() if penalties else rewards.new_zeros(())
        loss = -rewards.mean() + self.hparams.base_penalty * penalty
        stats = {"loss": loss.detach(), "base_penalty": penalty.detach(), "backprop_steps": torch.tensor(float(kept)),
                 "lr": torch.tensor(lr)}
        start = self.clock()
        if kept > 0:  # K = 0 samples and scores only: nothing to differentiate, the weights stay
            if not loss.requires_grad:
                raise ValueError(f"the reward {getattr(self.reward, 'name', type(self.reward).__name__)} returned "
                                 "scores without a gradient (it detaches or leaves the graph): reward "
                                 "backpropagation needs ∂reward/∂volume; fine-tune with PPO instead")
            self.manual_backward(loss)
            grad_norm = self.clip_and_step(optimizer)
            if grad_norm is not None:
                stats["grad_norm"] = grad_norm
        times["update"] = self.clock() - start
        self.iteration += 1
        stats["skipped_steps"] = self.skipped_steps.float()
        self.log_iteration(rewards, components, labels, stats, times, volumes)

    def denoiser(self, penalties: list[torch.Tensor]) -> Denoiser:
        """The policy's UNet as the sampler calls it; at kept steps checkpointed, its penalty appended to `penalties`.

        The penalty is computed outside the checkpointed call: a recomputation in the backward pass must
        not append again. With masks (`condition`) the frozen ControlNet's residuals join both predictions,
        inside the checkpointed call.
        """
        hp = self.hparams

        def denoise(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                    condition: torch.Tensor | None = None) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return self.policy_forward(x, t, labels, condition)
            prediction = (checkpoint(self.policy_forward, x, t, labels, condition, use_reentrant=False)
                          if hp.gradient_checkpointing else self.policy_forward(x, t, labels, condition))
            if hp.base_penalty > 0:
                with torch.no_grad(), self.frozen_base() as base:
                    reference = self.unet_prediction(base, x, t, labels, condition)
                penalties.append((prediction.float() - reference.float()).pow(2).mean())
            return prediction

        return denoise

    def to_volumes(self, samples: torch.Tensor) -> torch.Tensor:
        """Final samples → volumes [B, C, S, S, S] in [-1, 1]; through a latent model's decoder with gradients
        where grad mode is on (checkpointed with `gradient_checkpointing`)."""
        latent = self.policy.latent
        if latent is None or not torch.is_grad_enabled():
            return self.policy.to_images(samples)
        return latent.decode_with_grad(samples, checkpoint=self.hparams.gradient_checkpointing).clamp(-1, 1)
