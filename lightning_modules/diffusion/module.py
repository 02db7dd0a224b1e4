"""`DiffusionModule`: class-conditional 3D DDPM pretraining with MONAI's UNet and schedulers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_modules.checkpoint_io import load_weights, rebuild_module, resume_random_states, save_random_states
from lightning_modules.diffusion.latent import LatentSpace
from lightning_modules.diffusion.lora import LORA_KEY, load_lora_model
from lightning_modules.diffusion.noise_schedules import default_noise_scheduler, schedule_from_betas
from lightning_modules.diffusion.nonfinite import skip_nonfinite_loss
from lightning_modules.diffusion.optim import warmup_cosine_schedule
from lightning_modules.diffusion.sampling import Denoiser, ddim_from_training_schedule, sample
from lightning_modules.diffusion.speed import apply_speed_options, to_channels_last
from lightning_modules.first_stage.losses import lesion_mask, weighted_mean
from lightning_modules.visualize import slice_grid

log = logging.getLogger(__name__)

DIFFUSION_KEY = "msrl_diffusion"  # where a checkpoint records what rebuilds its model: hparams, schedule, prefix


class DiffusionModule(L.LightningModule):
    """Pretrains a 3D noise predictor (docs/design.md §2): DDPM loss, EMA weights, DDIM previews.

    Args:
        in_channels: image channels (linked from the data module by `msrl pretrain`).
        spatial_size: side of the cubic volumes (linked from the data module).
        num_classes: class labels; 0 makes the model unconditional. Label `num_classes` is the
            null class used for classifier-free guidance.
        channels: UNet channels per level.
        attention_levels: self-attention at each level (costly at high resolution).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of `channels`).
        noise_scheduler: the MONAI training scheduler (beta schedule, T, prediction type); None
            builds `default_noise_scheduler()`: T = 1000, scaled-linear betas 0.0015–0.0195, v-prediction
            (Salimans & Ho 2022). With ε-prediction, x0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ amplifies ε̂'s error
            ~80× at t = T, and short runs sample noise (seen on the demo).
        cfg_dropout: probability of replacing a label by the null class while training.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        ema_decay: decay of the exponential moving average of the weights (used for sampling).
        activation_checkpointing: recompute UNet blocks in the backward pass to save memory.
        preview_every_n_epochs: log DDIM samples to TensorBoard every k validation epochs (0: never).
        preview_num_samples: volumes per preview (labels alternate between classes).
        preview_steps: DDIM steps of a preview.
        seed: seed of the fixed validation noise and previews.
        max_nonfinite_steps: a non-finite loss skips its optimiser step (counted in
            train/skipped_steps); this many in a row stop the run.
        autoencoder_checkpoint: an `msrl train-autoencoder` checkpoint: diffuse in its (scaled)
            latent space, decode samples to full-size volumes. None: diffusion in voxel space.
        use_flash_attention: MONAI's flash / memory-efficient attention (PyTorch SDPA) in the UNet.
        channels_last: channels-last-3D layout for the UNet's weights and inputs (GPU path).
        compile_unet: `torch.compile` the UNet (GPU path; off until measured to pay).
        decode_batch_size: latents decoded per decoder pass (tiles per pass when tiled); latent models only.
        decode_tile_size: decode latents tile by tile, tiles of this side in latent voxels, with
            MONAI's `SlidingWindowInferer` (`TiledDecoding`): the decoder's peak memory then depends
            on the tile, not the volume (128³–256³). None (default): each latent decoded whole.
            Used wherever samples become volumes: PPO's reward, `msrl sample`, `msrl evaluate`, previews.
        decode_overlap: fraction of a tile shared with each neighbour, in [0, 1); overlap · tile should
            be whole latent voxels.
        decode_blend: "trim" (each voxel from the tile holding it deepest: equal to whole decoding once
            overlap · tile / 2 covers the decoder's reach, 5 latent voxels for msrl's VQ-GAN),
            "gaussian" or "constant" (MONAI's blends of overlapping tiles).
        lesion_loss_weight: w > 0 weighs the training loss of the positions a lesion covers by 1 + w (the
            batch's `seg` labels, max-pooled onto the grid the UNet denoises), as a weighted mean. A small
            lesion at a random place is a few per cent of the loss, so an unweighted model learns the brain
            and drops the lesion, whatever its class (docs/design.md §2a). 0: the plain DDPM loss.
    """

    def __init__(
        self,
        in_channels: int = 1,
        spatial_size: int = 32,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 16,
        norm_num_groups: int = 16,
        noise_scheduler: DDPMScheduler | None = None,
        cfg_dropout: float = 0.1,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.995,
        activation_checkpointing: bool = False,
        preview_every_n_epochs: int = 5,
        preview_num_samples: int = 2,
        preview_steps: int = 25,
        seed: int = 0,
        max_nonfinite_steps: int = 5,
        autoencoder_checkpoint: str | None = None,
        use_flash_attention: bool = False,
        channels_last: bool = False,
        compile_unet: bool = False,
        decode_batch_size: int = 4,
        decode_tile_size: int | None = None,
        decode_overlap: float = 0.625,
        decode_blend: Literal["constant", "gaussian", "trim"] = "trim",
        lesion_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) != len(attention_levels):
            raise ValueError(f"channels {tuple(channels)} and attention_levels {tuple(attention_levels)} "
                             "must have the same length")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every channel count {tuple(channels)}")
        if lesion_loss_weight < 0:
            raise ValueError(f"lesion_loss_weight must be >= 0 (0: the plain loss), got {lesion_loss_weight}")
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        noise_scheduler = noise_scheduler if noise_scheduler is not None else default_noise_scheduler()
        if noise_scheduler.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got "
                             f"{noise_scheduler.prediction_type!r}")
        self.save_hyperparameters(ignore=["noise_scheduler"])
        self.noise_scheduler = noise_scheduler
        self.null_class = num_classes if num_classes > 0 else None
        self.latent = None if autoencoder_checkpoint is None else LatentSpace(
            autoencoder_checkpoint, decode_batch_size=decode_batch_size, decode_tile_size=decode_tile_size,
            decode_overlap=decode_overlap, decode_blend=decode_blend)
        if self.latent is not None:
            self.latent.check_images(in_channels, spatial_size)
        unet_channels = self.sample_shape[0]
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=unet_channels, out_channels=unet_channels, channels=tuple(channels),
            attention_levels=tuple(attention_levels), num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes + 1 if num_classes > 0 else None, use_flash_attention=use_flash_attention,
        )
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))  # saved: survives resume
        self._skips_in_a_row = 0
        if activation_checkpointing:
            enable_activation_checkpointing(self.unet)
        apply_speed_options(self.unet, channels_last, compile_unet)

    # The space diffusion happens in --------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int, int]:
        """[C, s, s, s] of what the UNet denoises: the scaled latent, or the volume itself."""
        if self.latent is not None:
            return self.latent.shape
        size = self.hparams.spatial_size
        return (self.hparams.in_channels, size, size, size)

    def to_diffusion_space(self, images: torch.Tensor, subject_ids: list[str] | None = None) -> torch.Tensor:
        """Volumes [B, C, S, S, S] → what the UNet denoises (scaled latents, cached per subject, or the volumes)."""
        return images if self.latent is None else self.latent.encode_cached(images, subject_ids)

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Final samples → volumes [B, C, S, S, S] in [-1, 1] (decoded by the frozen autoencoder if latent)."""
        return samples.clamp(-1, 1) if self.latent is None else self.latent.decode(samples).clamp(-1, 1)

    def ddim_scheduler(self) -> DDIMScheduler:
        """DDIM over this model's schedule; x0 is clipped to [-1, 1] only for voxel-space models."""
        return ddim_from_training_schedule(self.noise_scheduler, clip_sample=self.latent is None)

    # The network -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None, *,
                down_residuals: Sequence[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Prediction of the trained UNet for x_t [B, C, D, H, W], timesteps [B] and labels [B].

        `down_residuals`/`mid_residual`: a ControlNet's outputs, added to the UNet's skips (None: none).
        """
        x = to_channels_last(x) if self.hparams.channels_last else x
        return self.unet(x, timesteps, class_labels=labels if self.null_class is not None else None,
                         down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual)

    def ema_forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None, *,
                    down_residuals: Sequence[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Prediction of the EMA weights (what sampling uses), with optional ControlNet residuals."""
        return self.ema.module(x, timesteps, class_labels=labels if self.null_class is not None else None,
                               down_block_additional_residuals=down_residuals,
                               mid_block_additional_residual=mid_residual)

    def diffusion_loss(self, images: torch.Tensor, labels: torch.Tensor | None,
                       generator: torch.Generator | None = None, label_dropout: float = 0.0,
                       weights: torch.Tensor | None = None, predict: Denoiser | None = None) -> torch.Tensor:
        """DDPM MSE between the prediction and its target (ε or v) at random timesteps.

        `weights` [B, 1, *spatial] (broadcast over channels) makes it a weighted mean (`lesion_weights`).
        `predict` replaces this model's `forward` (a ControlNet trains through the frozen UNet this way).
        """
        batch = images.shape[0]
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.num_train_timesteps, (batch,), generator=generator,
                                  device=images.device)
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        if self.noise_scheduler.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(images, noise, timesteps)
        else:
            target = noise
        if labels is not None and self.null_class is not None and label_dropout > 0:
            drop = torch.rand(batch, device=images.device) < label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        prediction = (predict if predict is not None else self)(noisy, timesteps, labels)
        if weights is None:
            return F.mse_loss(prediction.float(), target.float())
        return weighted_mean((prediction.float() - target.float()).square(), weights)

    def lesion_weights(self, batch: dict[str, Any], grid: tuple[int, ...], weight: float | None = None
                       ) -> torch.Tensor | None:
        """1 + `weight` (default `lesion_loss_weight`) where the batch's lesion labels reach a position of `grid`,
        else 1 (None if 0)."""
        weight = self.hparams.lesion_loss_weight if weight is None else weight
        lesion = lesion_mask(batch, weight, "model.lesion_loss_weight")
        if lesion is None:
            return None
        lesion = lesion.float()
        factor = lesion.shape[-1] // grid[-1]
        covered = F.max_pool3d(lesion, factor) if factor > 1 else lesion  # any lesion voxel in the latent's cell
        return 1.0 + weight * covered

    # Lightning hooks ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """One DDPM step on a batch of volumes, with classifier-free-guidance label dropout.

        A non-finite loss on any rank skips the step on every rank (returning None everywhere, so
        DDP's collectives stay matched), is counted, and after `max_nonfinite_steps` in a row stops.
        """
        latents = self.to_diffusion_space(batch["image"], batch.get("subject_id"))
        loss = self.diffusion_loss(latents, batch["label"], label_dropout=self.hparams.cfg_dropout,
                                   weights=self.lesion_weights(batch, tuple(latents.shape[2:])))
        if skip_nonfinite_loss(self, loss):
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/loss with noise and timesteps fixed by (seed, batch), comparable across epochs."""
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed * 7919 + batch_idx)
        latents = self.to_diffusion_space(batch["image"], batch.get("subject_id"))
        loss = self.diffusion_loss(latents, batch["label"], generator=generator)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimiser, then the EMA (only after real steps, whatever the accumulation)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.unet)

    def on_validation_epoch_end(self) -> None:
        """Every `preview_every_n_epochs`, log middle slices of a few EMA samples to TensorBoard."""
        every = self.hparams.preview_every_n_epochs
        if every <= 0 or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        if not self.trainer.is_global_zero or not isinstance(self.logger, TensorBoardLogger):
            return
        volumes = self.generate(self.hparams.preview_num_samples, num_steps=self.hparams.preview_steps,
                                seed=self.hparams.seed)
        self.logger.experiment.add_image("val/samples", slice_grid(volumes), self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warm-up and cosine decay per optimiser step."""
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        trainer = self._trainer
        total = (lambda: trainer.estimated_stepping_batches) if trainer is not None else None
        scheduler = warmup_cosine_schedule(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def diffusion_spec(self, prefix: str = "") -> dict[str, Any]:
        """What rebuilds this model from any msrl checkpoint: hparams, noise schedule, state prefix.

        The noise schedule is stored as its betas (plain tensors), so any beta schedule reloads
        exactly; `prefix` is where this module's weights sit in the checkpoint's state dict.
        """
        return {
            "hparams": {k: v for k, v in self.hparams.items() if not k.startswith("_")},
            "prefix": prefix,
            "noise_schedule": {"prediction_type": str(self.noise_scheduler.prediction_type),
                               "betas": self.noise_scheduler.betas.detach().cpu().clone()},
            "autoencoder": None if self.latent is None else self.latent.spec(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write `diffusion_spec()` (so `msrl sample` and PPO can rebuild the model) and RNG states."""
        checkpoint[DIFFUSION_KEY] = self.diffusion_spec()
        save_random_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the noise schedule, and the RNG states so a resumed run draws what it would have."""
        spec = checkpoint.get(DIFFUSION_KEY, {}).get("noise_schedule")
        if spec is not None:
            self.noise_scheduler = schedule_from_betas(spec["betas"], spec["prediction_type"])
        resume_random_states(checkpoint)

    @classmethod
    def from_msrl_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
        """The diffusion model inside any msrl checkpoint (pretraining or PPO), read weights-only.

        A LoRA PPO checkpoint (`msrl_lora`) holds adapters only: its base checkpoint is read (refused when
        missing or changed) and the adapters are merged in, so the model returned is a plain one.
        """
        checkpoint = load_weights(path, map_location)
        spec = checkpoint.get(DIFFUSION_KEY) if isinstance(checkpoint, dict) else None
        if spec is None:
            raise ValueError(f"checkpoint {path} was not written by msrl pretrain or finetune (no msrl_diffusion)")
        if LORA_KEY in checkpoint:
            return load_lora_model(cls, path, checkpoint, spec, map_location)
        schedule = schedule_from_betas(spec["noise_schedule"]["betas"], spec["noise_schedule"]["prediction_type"])
        model = rebuild_module(cls, {**spec["hparams"], "noise_scheduler": schedule}, checkpoint["state_dict"],
                               prefix=spec["prefix"])
        recorded = spec.get("autoencoder")
        if model.latent is not None and recorded is not None:  # the file exists (or __init__ raised): same one?
            model.latent.check_sha256(recorded["sha256"])
        return model

    # Sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num_samples: int, labels: torch.Tensor | None = None, num_steps: int = 50,
                 eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0, use_ema: bool = True,
                 progress: bool = False, denoiser: Denoiser | None = None) -> torch.Tensor:
        """Draw volumes [N, C, S, S, S] in [-1, 1] with DDIM; labels alternate 0, 1, … if not given.

        `denoiser` replaces the (EMA) UNet, e.g. by the UNet with a ControlNet's residuals.
        """
        if labels is None and self.null_class is not None:
            labels = torch.arange(num_samples) % self.hparams.num_classes
        if labels is not None:
            labels = labels.to(self.device, torch.long)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn((num_samples, *self.sample_shape), generator=generator, device=self.device)
        model = denoiser if denoiser is not None else (self.ema_forward if use_ema else self.forward)
        was_training = self.training
        self.eval()
        samples, _ = sample(model, self.ddim_scheduler(), noise, labels, num_steps=num_steps, eta=eta,
                            guidance_scale=guidance_scale, null_class=self.null_class, generator=generator,
                            progress=progress)
        self.train(was_training)
        return self.to_images(samples)


def enable_activation_checkpointing(unet: DiffusionModelUNet) -> None:
    """Recompute each ResNet and attention block of a MONAI UNet on its own in the backward pass.

    Finer than whole down/up blocks, whose recomputation keeps a full-resolution block's activations
    alive at once (peak 0.66 of no checkpointing at 32³; per ResNet 0.58, see benchmarks/RESULTS.md).
    PyTorch's `checkpoint_wrapper` keeps parameter names unchanged, so checkpoints load either way.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for block in [*unet.down_blocks, *unet.up_blocks]:
        for name in ("resnets", "attentions"):
            layers = getattr(block, name, None) or []
            for index, layer in enumerate(layers):
                layers[index] = checkpoint_wrapper(layer)
    for name in ("resnet_1", "attention", "resnet_2"):
        if getattr(unet.middle_block, name, None) is not None:
            setattr(unet.middle_block, name, checkpoint_wrapper(getattr(unet.middle_block, name)))
