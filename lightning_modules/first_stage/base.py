"""`FirstStageModule`: what every first stage of latent diffusion shares (docs/design.md §2a).

Training against PatchGAN discriminators (manual optimisation), validation metrics and previews,
the latent scale factor, and the checkpoint contract: every checkpoint carries what rebuilds the
autoencoder (`msrl_autoencoder`: class, arguments, scale factor, latent shape), read by
`from_msrl_checkpoint`. The VQ-GAN (`AutoencoderModule`, lightning_modules/first_stage/vqgan.py) and
the KL autoencoder (lightning_modules/first_stage/kl.py), siblings, supply the network and its latent hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from monai.losses import PatchAdversarialLoss
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_modules.checkpoint_io import (
    load_weights,
    public_class_path,
    rebuild_module,
    resolve_class,
    resume_random_states,
    save_random_states,
)
from lightning_modules.first_stage.losses import (
    Discriminators,
    MedicalNetPerceptualLoss,
    latent_moments,
    lesion_mask,
    random_cubes,
    scale_from_moments,
    weighted_l1,
)
from lightning_modules.first_stage.settings import FirstStageTraining, training_arguments
from lightning_modules.visualize import slice_grid

AUTOENCODER_KEY = "msrl_autoencoder"  # where a first stage's checkpoint records what rebuilds it


class FirstStageModule(L.LightningModule, ABC):
    """The shared training, validation and checkpointing of a 3D autoencoder for latent diffusion.

    A subclass passes its constructor's arguments (the network's and `training`) to `__init__`,
    builds `self.network`, calls `setup_training_parts()` and implements the latent hooks below.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        """Record the arguments as hyper-parameters (`training` as plain data) and keep the settings object."""
        super().__init__()
        training: FirstStageTraining = arguments["training"]
        self.save_hyperparameters({**arguments, "training": training.as_dict()})
        self.settings = training

    regulariser_name = "train/regulariser"  # what the latent regulariser is logged as

    def setup_training_parts(self) -> None:
        """What VQ and KL variants share: discriminators, losses, metrics and the latent-scale buffers."""
        hp, settings = self.hparams, self.settings
        settings.check(hp.spatial_size, hp.downsample_levels)
        self.automatic_optimization = False
        self.discriminators = Discriminators(hp.in_channels, settings.discriminator_channels,
                                             settings.discriminator_layers, settings.slice_discriminator,
                                             settings.slices_per_plane)
        self.adversarial_loss = PatchAdversarialLoss(criterion=settings.adversarial_criterion)
        # A tuple hides the frozen loss network from the state dict (see MedicalNetPerceptualLoss).
        self._perceptual = (() if settings.perceptual_weights_path is None else
                            (MedicalNetPerceptualLoss(settings.perceptual_weights_path, settings.perceptual_network),))
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.register_buffer("latent_scale", torch.ones(()))  # `scale_factor`; saved in every checkpoint
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))  # saved: survives resume
        self.register_buffer("latent_sums", torch.zeros(3, dtype=torch.float64), persistent=False)  # training
        self.register_buffer("val_latent_sums", torch.zeros(3, dtype=torch.float64), persistent=False)
        self._preview: torch.Tensor | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[C, s, s, s] of one volume's latent (s = spatial_size / 2^downsample_levels)."""
        side = self.hparams.spatial_size // 2 ** self.hparams.downsample_levels
        return (self.latent_channels, side, side, side)

    @property
    def scale_factor(self) -> float:
        """1 / std of whole training volumes' latents (see `train_crop_size`); diffusion works on `scale_factor · z`."""
        return float(self.latent_scale)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """`decode_latent(encode_latent(images))`: [B, C, S, S, S] in [-1, 1]."""
        return self.decode_latent(self.encode_latent(images))

    # The latent hooks of a first stage ------------------------------------------------------------
    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latent."""

    @abstractmethod
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, C_lat, s, s, s] of images [B, C, S, S, S] in [-1, 1]."""

    @abstractmethod
    def decode_latent(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S, S] in [-1, 1] from unscaled latents."""

    def decode_latent_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode_latent` through which gradients reach the latents (the KL decoder as it is; the VQ-GAN
        overrides it with a straight-through codebook lookup)."""
        return self.decode_latent(latents)

    @abstractmethod
    def autoencode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, latent regulariser loss, unscaled latents)."""

    def after_generator_step(self, latents: torch.Tensor) -> None:
        """Called after each autoencoder step with its latents (the VQ-GAN restarts dead codes here)."""

    def validation_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode_latent` during validation (the VQ-GAN also counts the codes used)."""
        return self.decode_latent(latents)

    def log_latent_health(self) -> None:
        """Log the latent's health at the end of validation (the VQ-GAN: codebook usage and perplexity)."""

    # Training ------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One autoencoder step, then (once the adversarial term is on) one discriminator step."""
        images, settings = batch["image"], self.settings
        lesion = lesion_mask(batch, settings.lesion_l1_weight, "model.init_args.training.lesion_l1_weight")
        if settings.train_crop_size is not None:  # the lesion mask cropped with its volume, as an extra channel
            both = images if lesion is None else torch.cat([images, lesion.to(images.dtype)], 1)
            both = random_cubes(both, settings.train_crop_size, 2 ** self.hparams.downsample_levels)
            images, lesion = (both, None) if lesion is None else (both[:, :-1], both[:, -1:])
        generator_optimizer, discriminator_optimizer = self.optimizers()
        adversarial = int(self.training_steps) >= settings.adversarial_start_step
        self.toggle_optimizer(generator_optimizer)
        reconstruction, regulariser, latents = self.autoencode(images)
        if settings.train_crop_size is None:
            self.latent_sums += latent_moments(latents)
        l1 = F.l1_loss(reconstruction.float(), images.float())
        # the optimiser sees the lesion-weighted L1 where asked; train/l1 stays the plain one
        loss = regulariser + (l1 if lesion is None else
                              weighted_l1(reconstruction, images, 1.0 + settings.lesion_l1_weight * lesion.float()))
        logs = {"train/l1": l1, self.regulariser_name: regulariser}
        if self._perceptual:
            perceptual = self._perceptual[0].to(images.device)(reconstruction.float(), images.float())
            loss, logs["train/perceptual"] = loss + settings.perceptual_weight * perceptual, perceptual
        if adversarial:
            fooling = self.adversarial_loss(self.discriminators(reconstruction), target_is_real=True,
                                            for_discriminator=False)
            loss, logs["train/generator_adversarial"] = loss + settings.adversarial_weight * fooling, fooling
        self._step(generator_optimizer, loss)
        if adversarial:
            self.toggle_optimizer(discriminator_optimizer)
            fake = self.adversarial_loss(self.discriminators(reconstruction.detach()), target_is_real=False,
                                         for_discriminator=True)
            real = self.adversarial_loss(self.discriminators(images), target_is_real=True, for_discriminator=True)
            logs["train/discriminator_loss"] = 0.5 * (fake + real)
            self._step(discriminator_optimizer, logs["train/discriminator_loss"])
        self.training_steps += 1
        self.after_generator_step(latents)
        logs["train/loss"] = loss
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=images.shape[0])

    def _step(self, optimizer: Any, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.settings.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.settings.gradient_clip_val,
                                gradient_clip_algorithm="norm")
        optimizer.step()
        self.untoggle_optimizer(optimizer)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for the autoencoder, AdamW for the discriminators (in that order)."""
        settings = self.settings
        generator = [p for p in self.network.parameters() if p.requires_grad]  # not the EMA codebook
        betas = tuple(settings.betas)
        return [torch.optim.AdamW(generator, lr=settings.lr, betas=betas),
                torch.optim.AdamW(self.discriminators.parameters(), lr=settings.discriminator_lr, betas=betas)]

    # Latent scale: from this epoch's training latents, or the validation volumes' with cubes ---------
    def on_train_epoch_start(self) -> None:
        """Start this epoch's latent statistics afresh."""
        self.latent_sums.zero_()

    def on_train_epoch_end(self) -> None:
        """Store 1/std of this epoch's training latents (before the epoch's checkpoint is written)."""
        if self.settings.train_crop_size is None:
            self.store_scale_factor(self.latent_sums)
        self.log("ae/scale_factor", self.scale_factor, batch_size=1, sync_dist=True)

    def store_scale_factor(self, sums: torch.Tensor) -> None:
        """Set `latent_scale` from `latent_moments` sums, summed over ranks (no-op if empty)."""
        scale = scale_from_moments(self.trainer.strategy.reduce(sums.clone(), reduce_op="sum"))
        if scale is not None:
            self.latent_scale.fill_(scale)

    # Validation ----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        """Store the scale factor, so that a checkpoint written after this validation carries it."""
        if self.settings.train_crop_size is None:
            self.store_scale_factor(self.latent_sums)
        self.val_latent_sums.zero_()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/l1, val/psnr and val/ssim of the reconstructions; keep the first batch's for the preview."""
        images = batch["image"].float()
        latents = self.encode_latent(batch["image"])
        self.val_latent_sums += latent_moments(latents)
        reconstruction = self.validation_decode(latents).float()
        size = images.shape[0]
        self.val_psnr(reconstruction, images)
        self.val_ssim(reconstruction, images)
        self.log("val/l1", F.l1_loss(reconstruction, images), prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/psnr", self.val_psnr, batch_size=size)
        self.log("val/ssim", self.val_ssim, batch_size=size)
        if batch_idx == 0:
            count = self.settings.preview_num_samples
            self._preview = torch.stack([images[:count], reconstruction[:count]], 1).flatten(0, 1)

    def on_validation_epoch_end(self) -> None:
        """Codebook health, real-vs-reconstructed middle slices (rows alternate), and with cubes the scale."""
        self.log_latent_health()
        if self.settings.train_crop_size is not None and not self.trainer.sanity_checking:
            self.store_scale_factor(self.val_latent_sums)
        preview, self._preview = self._preview, None
        if (preview is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero
                and isinstance(self.logger, TensorBoardLogger)):
            self.logger.experiment.add_image("val/reconstructions", slice_grid(preview), self.global_step)

    # Checkpoints ---------------------------------------------------------------------------------
    def autoencoder_spec(self) -> dict[str, Any]:
        """What rebuilds this autoencoder from a checkpoint: class, arguments, scale factor, latent shape."""
        return {"class_path": public_class_path(type(self)),
                "hparams": {key: value for key, value in self.hparams.items() if not key.startswith("_")},
                "scale_factor": self.scale_factor, "latent_shape": list(self.latent_shape)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write `autoencoder_spec()` under `msrl_autoencoder`, and the RNG states (crops replay on resume)."""
        checkpoint[AUTOENCODER_KEY] = self.autoencoder_spec()
        save_random_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states of a resumed run."""
        resume_random_states(checkpoint)

    @classmethod
    def from_msrl_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu"
                            ) -> FirstStageModule:
        """The frozen autoencoder (eval mode, no gradients) in a `msrl train-autoencoder` checkpoint.

        The file is read weights-only; the class named in it must be `cls` or a subclass. The
        perceptual loss network is a training aid and is not rebuilt.

        Raises:
            ValueError: the file is missing, unreadable, or not an msrl autoencoder checkpoint.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"autoencoder checkpoint {path} does not exist (msrl train-autoencoder writes one)")
        checkpoint = load_weights(path, map_location)
        spec = checkpoint.get(AUTOENCODER_KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(spec, dict):
            raise ValueError(f"checkpoint {path} is not an msrl autoencoder checkpoint (no msrl_autoencoder "
                             "entry; msrl train-autoencoder writes one)")
        model_class = resolve_class(spec.get("class_path"), cls, path)
        # the perceptual loss network is a training aid: not rebuilt (its file need not exist)
        arguments = training_arguments(spec["hparams"], perceptual_weights_path=None)
        model = rebuild_module(model_class, arguments, checkpoint["state_dict"])
        return model.eval().requires_grad_(False)
