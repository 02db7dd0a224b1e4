"""`ControlNetModule`: lesion-mask conditioning of a frozen pretrained `DiffusionModule` (docs/design.md §2b).

ControlNet (Zhang et al. 2023, MONAI's `ControlNet`): a trainable copy of the UNet's encoder reads the mask
and adds residuals to the frozen UNet's skips through zero-initialised convolutions, so training starts
from the pretrained model exactly and learns only what the mask adds. The base is held outside the module
tree (as `LatentSpace` is): checkpoints hold the ControlNet and its EMA only, DDP never wraps the base, and
`msrl_controlnet` records the base file with its SHA-256 so a missing or changed base is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from monai.networks.nets import ControlNet
from monai.networks.utils import copy_model_state
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from datamodules.digest import check_recorded_file, sha256_of
from lightning_modules.checkpoint_io import load_weights, rebuild_module, resume_random_states, save_random_states
from lightning_modules.controlnet.masks import MASK_LABELS, check_mask_labels, label_channels, mask_channels, pool_to
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.diffusion.nonfinite import skip_nonfinite_loss
from lightning_modules.diffusion.optim import warmup_cosine_schedule

CONTROLNET_KEY = "msrl_controlnet"  # where a checkpoint records its base, label channels and settings
PRETRAIN_HOW_TO = "train one with `msrl pretrain -c configs/pretrain/template_latent.yaml`"


class ControlNetModule(L.LightningModule):
    """Trains a ControlNet on a frozen pretrained diffusion model's DDPM loss, the lesion mask as its condition.

    Args:
        base_checkpoint: an `msrl pretrain` (or fine-tuning) checkpoint; its EMA weights are frozen.
        in_channels: image channels (linked from the data; must be the base's).
        spatial_size: side of the cubic volumes and masks (linked from the data; must be the base's).
        num_classes: class labels (linked from the data; must be the base's).
        mask_labels: the BraTS codes that become condition channels, in channel order.
        conditioning: "pool": the one-hot mask average-pooled onto the latent grid (label fractions per
            cell) and a stride-free embedding, cheap on CPUs; "embed": the full-size mask through MONAI's
            strided embedding (one stride-2 stage per halving, as MAISI), costlier but sees finer edges.
        embedding_channels: channels of the conditioning embedding's stages; None: (16,) for "pool",
            8, 16, 32, … (one more than the halvings) for "embed".
        conditioning_scale: factor on every residual (1: as trained).
        cfg_dropout: probability of the null class while training; None: the base's.
        lesion_loss_weight: latent cells a lesion covers weigh 1 + w in the loss; None: the base's.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        ema_decay: decay of the ControlNet weights' moving average (used for sampling).
        seed: seed of the fixed validation noise.
        max_nonfinite_steps: non-finite losses in a row that stop the run (each skips its step).
    """

    def __init__(self, base_checkpoint: str, in_channels: int = 1, spatial_size: int = 64, num_classes: int = 2,
                 mask_labels: Sequence[int] = MASK_LABELS, conditioning: Literal["pool", "embed"] = "pool",
                 embedding_channels: Sequence[int] | None = None, conditioning_scale: float = 1.0,
                 cfg_dropout: float | None = None, lesion_loss_weight: float | None = None, lr: float = 5e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 ema_decay: float = 0.99, seed: int = 0, max_nonfinite_steps: int = 5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mask_labels = check_mask_labels(mask_labels)
        if conditioning not in ("pool", "embed"):
            raise ValueError(f"conditioning must be 'pool' or 'embed', got {conditioning!r}")
        base = load_base(base_checkpoint, in_channels, spatial_size, num_classes)
        object.__setattr__(self, "_base", base)  # not a submodule: outside the state dict, DDP and .train()
        self.base_path, self.base_sha256 = Path(base_checkpoint).resolve(), sha256_of(base_checkpoint)
        self.cfg_dropout = base.hparams.cfg_dropout if cfg_dropout is None else cfg_dropout
        self.lesion_loss_weight = base.hparams.lesion_loss_weight if lesion_loss_weight is None else lesion_loss_weight
        if not 0.0 <= self.cfg_dropout < 1.0 or self.lesion_loss_weight < 0:
            raise ValueError(f"cfg_dropout must be in [0, 1) and lesion_loss_weight >= 0, got {self.cfg_dropout} "
                             f"and {self.lesion_loss_weight}")
        self.latent_size = base.sample_shape[-1]
        self.embedding_channels = conditioning_stages(conditioning, spatial_size, self.latent_size, embedding_channels)
        settings = base.hparams
        self.controlnet = ControlNet(
            spatial_dims=3, in_channels=base.sample_shape[0], channels=tuple(settings.channels),
            attention_levels=tuple(settings.attention_levels), num_res_blocks=settings.num_res_blocks,
            num_head_channels=settings.num_head_channels, norm_num_groups=settings.norm_num_groups,
            num_class_embeds=None if base.null_class is None else base.null_class + 1,
            conditioning_embedding_in_channels=len(self.mask_labels),
            conditioning_embedding_num_channels=self.embedding_channels,
            use_flash_attention=settings.use_flash_attention)
        copy_base_weights(self.controlnet, base.ema.module, base_checkpoint)
        self.ema = AveragedModel(self.controlnet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))  # saved: survives resume
        self._skips_in_a_row = 0

    @property
    def base(self) -> DiffusionModule:
        """The frozen pretrained model, moved to this module's device (a no-op when it is there)."""
        return self._base.to(self.device)

    # The condition and the controlled prediction ---------------------------------------------------
    def condition(self, seg: torch.Tensor) -> torch.Tensor:
        """The ControlNet's input of label maps `seg` [B, 1, S, S, S]: one-hot channels, pooled in "pool" mode."""
        size = self.hparams.spatial_size
        if tuple(seg.shape[-3:]) != (size, size, size):
            raise ValueError(f"masks must be {size}³ like the volumes this model was trained on, got "
                             f"{tuple(seg.shape[-3:])}")
        channels = mask_channels(seg, self.mask_labels)
        return pool_to(channels, self.latent_size) if self.hparams.conditioning == "pool" else channels

    def residuals(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                  condition: torch.Tensor, use_ema: bool = False) -> dict[str, Any]:
        """The ControlNet's skip and middle residuals for x_t [B, C, s, s, s] (`DiffusionModule.forward`'s keywords)."""
        network = self.ema.module if use_ema else self.controlnet
        down, mid = network(x, timesteps, controlnet_cond=condition,
                            conditioning_scale=self.hparams.conditioning_scale,
                            class_labels=labels if self._base.null_class is not None else None)
        return {"down_residuals": down, "mid_residual": mid}

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                condition: torch.Tensor, use_ema: bool = False, model: DiffusionModule | None = None,
                model_ema: bool = True) -> torch.Tensor:
        """The frozen base's (EMA) prediction with this ControlNet's residuals.

        A batch larger than the condition's (classifier-free guidance stacks [conditional, null]) repeats
        the condition, so the mask conditions the null pass too (as MONAI's ControlNet inferers do).
        `model` (None: the base) is another diffusion model of the base's architecture the residuals are
        added to, e.g. one fine-tuned under this ControlNet; `model_ema`: its EMA weights, else its raw ones.
        """
        condition = condition.repeat(x.shape[0] // condition.shape[0], 1, 1, 1, 1)
        model = self.base if model is None else model
        predict = model.ema_forward if model_ema else model.forward
        return predict(x, timesteps, labels, **self.residuals(x, timesteps, labels, condition, use_ema))

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
             label_dropout: float = 0.0) -> torch.Tensor:
        """The base's (lesion-weighted) DDPM loss on a batch, predicted through this ControlNet."""
        if "seg" not in batch:
            raise ValueError("a ControlNet needs lesion masks in each batch (the 'seg' key), which this data set "
                             "does not serve; data sets with lesion labels: BraTS, the template cohort")
        base = self.base
        latents = base.to_diffusion_space(batch["image"], batch.get("subject_id"))
        weights = base.lesion_weights(batch, tuple(latents.shape[2:]), self.lesion_loss_weight)
        predict = partial(self, condition=self.condition(batch["seg"]))
        return base.diffusion_loss(latents, batch["label"], generator=generator, label_dropout=label_dropout,
                                   weights=weights, predict=predict)

    # Lightning hooks ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """One step with label dropout; a non-finite loss skips it (`skip_nonfinite_loss`)."""
        loss = self.loss(batch, label_dropout=self.cfg_dropout)
        if skip_nonfinite_loss(self, loss):
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/loss with noise and timesteps fixed by (seed, batch), comparable across epochs."""
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed * 7919 + batch_idx)
        loss = self.loss(batch, generator=generator)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimiser, then the EMA."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.controlnet)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the ControlNet alone, with linear warm-up and cosine decay per optimiser step."""
        optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        trainer = self._trainer
        total = (lambda: trainer.estimated_stepping_batches) if trainer is not None else None
        scheduler = warmup_cosine_schedule(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def controlnet_record(self) -> dict[str, Any]:
        """`msrl_controlnet`: the base file and its SHA-256, what each condition channel means, the settings."""
        return {"base_checkpoint": str(self.base_path), "base_sha256": self.base_sha256, "base_weights": "ema",
                "label_channels": label_channels(self.mask_labels), "conditioning": self.hparams.conditioning,
                "embedding_channels": list(self.embedding_channels),
                "hparams": {k: v for k, v in self.hparams.items() if not k.startswith("_")}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write `msrl_controlnet` and the RNG states (a resumed run draws what it would have)."""
        checkpoint[CONTROLNET_KEY] = self.controlnet_record()
        save_random_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume over another base than the one trained on; restore the RNG states."""
        recorded = checkpoint.get(CONTROLNET_KEY, {}).get("base_sha256")
        if recorded is not None and recorded != self.base_sha256:
            raise ValueError(f"base checkpoint {self.base_path} is not the one this ControlNet was trained on "
                             f"(sha256 {self.base_sha256[:16]}…, recorded {recorded[:16]}…): restore the original file")
        resume_random_states(checkpoint)

    @classmethod
    def from_msrl_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ControlNetModule:
        """The ControlNet inside an `msrl train-controlnet` checkpoint with its base (refused if missing or changed)."""
        checkpoint = load_weights(path, map_location)
        record = checkpoint.get(CONTROLNET_KEY) if isinstance(checkpoint, dict) else None
        if record is None:
            raise ValueError(f"checkpoint {path} was not written by msrl train-controlnet (no {CONTROLNET_KEY})")
        base = check_base(record, path)
        return rebuild_module(cls, {**record["hparams"], "base_checkpoint": str(base)}, checkpoint["state_dict"])

    # Sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, seg: torch.Tensor, labels: torch.Tensor | None = None, num_steps: int = 50, eta: float = 0.0,
                 guidance_scale: float = 1.0, seed: int = 0, use_ema: bool = True,
                 model: DiffusionModule | None = None, model_ema: bool = True) -> torch.Tensor:
        """Volumes [N, C, S, S, S] in [-1, 1] drawn under label maps `seg` [N, 1, S, S, S] (the base's sampler).

        Args:
            use_ema: the ControlNet's EMA weights (else its raw ones).
            model: the diffusion model this ControlNet's residuals are added to, whose sampler draws (None: the
                frozen base); it must have the base's architecture (`check_architecture`), e.g. a model
                fine-tuned under this ControlNet, and is moved to this module's device.
            model_ema: `model`'s EMA weights (else its raw ones); the base always predicts with its EMA.
        """
        if model is None:
            model, model_ema = self.base, True
        else:
            model = check_architecture(model, self._base, self.base_path).to(self.device)
        denoiser = partial(self, condition=self.condition(seg.to(self.device)), use_ema=use_ema, model=model,
                           model_ema=model_ema)
        return model.generate(seg.shape[0], labels, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
                              seed=seed, denoiser=denoiser)


def check_architecture(model: DiffusionModule, base: DiffusionModule, base_path: str | Path) -> DiffusionModule:
    """`model`, refused unless its UNet has the base's weights (names, shapes) and denoised shape: a ControlNet's
    residuals fit that UNet's skips only."""
    shapes = [{key: tuple(value.shape) for key, value in m.ema.module.state_dict().items()} for m in (model, base)]
    differ = sorted(set(shapes[0].items()) ^ set(shapes[1].items()))
    if differ or tuple(model.sample_shape) != tuple(base.sample_shape):
        raise ValueError(f"a ControlNet of {base_path} adds residuals to models of that base's architecture only: "
                         f"this model denoises {tuple(model.sample_shape)} (base {tuple(base.sample_shape)}) and "
                         f"{len(differ)} UNet weights differ in name or shape {differ[:2]}")
    return model


def load_base(path: str | Path, in_channels: int, spatial_size: int, num_classes: int) -> DiffusionModule:
    """The frozen pretrained model (EMA weights, eval mode) of `path`, refused unless it fits the data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base_checkpoint {path} does not exist: a ControlNet conditions a pretrained "
                                f"diffusion model; {PRETRAIN_HOW_TO}")
    base = DiffusionModule.from_msrl_checkpoint(path)
    found = (base.hparams.in_channels, base.hparams.spatial_size, base.hparams.num_classes)
    if found != (in_channels, spatial_size, num_classes):
        raise ValueError(f"base checkpoint {path} was trained on {found[0]}-channel {found[1]}³ volumes with "
                         f"{found[2]} classes, the data has {in_channels}-channel {spatial_size}³ with {num_classes}")
    return base.requires_grad_(False).eval()


def conditioning_stages(conditioning: str, spatial_size: int, latent_size: int,
                        channels: Sequence[int] | None) -> tuple[int, ...]:
    """The embedding's stage channels, checked to bring the condition onto the latent grid.

    MONAI's embedding halves the size once per stage after the first and adds it to the latent in place,
    so the sizes must agree: one stage in "pool" mode, 1 + log2(spatial / latent) in "embed" mode.
    """
    halvings = math.log2(spatial_size / latent_size)
    stages = 1 if conditioning == "pool" else 1 + round(halvings)
    if conditioning == "embed" and halvings != round(halvings):
        raise ValueError(f"conditioning 'embed' needs a latent side {latent_size} that is the volume side "
                         f"{spatial_size} halved a whole number of times; use 'pool'")
    if channels is None:
        channels = (16,) if stages == 1 else tuple(8 << i for i in range(stages))  # (8, 16, 32) for 4×, as MAISI
    channels = tuple(channels)
    if len(channels) != stages:
        raise ValueError(f"embedding_channels {list(channels)} must have {stages} entries for conditioning "
                         f"{conditioning!r} ({spatial_size}³ masks onto the {latent_size}³ latent grid)")
    return channels


def copy_base_weights(controlnet: ControlNet, unet: nn.Module, source: str | Path) -> None:
    """Initialise the ControlNet's encoder with the UNet's weights, checking every shared weight was copied.

    MONAI's `copy_model_state` skips weights whose shapes differ without a word; a ControlNet that did
    not start from the base would not reproduce it. Its own `controlnet_*` layers keep their zero init.
    """
    _, updated, _ = copy_model_state(controlnet, unet.state_dict())
    expected = {key for key in controlnet.state_dict() if not key.startswith("controlnet_")}
    if set(updated) != expected:
        missing = sorted(expected - set(updated))
        raise ValueError(f"the ControlNet could not copy {len(missing)} weights of the UNet in {source} (shapes "
                         f"differ): {missing[:4]}")


def check_base(record: dict[str, Any], checkpoint: str | Path) -> Path:
    """The base checkpoint a ControlNet checkpoint names, refused (naming both files) if missing or changed."""
    return check_recorded_file(record["base_checkpoint"], record["base_sha256"], "base checkpoint",
                               f"ControlNet checkpoint {checkpoint}")
