"""`AutoencoderModule`: the 3D VQ-GAN first stage of latent diffusion (DESIGN.md §2a).

The autoencoder shrinks a volume by 2^downsample_levels per side. Latent diffusion works on
`scale_factor · encode_latent(x)` and brings its samples back with `decode_latent`; every checkpoint
carries what rebuilds the autoencoder (`msrl_autoencoder`: class, arguments, scale factor, latent
shape), read by `AutoencoderModule.from_msrl_checkpoint`. `KLAutoencoderModule`
(lightning_modules/autoencoder_kl.py) is the KL-regularised alternative, chosen by `class_path`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.loggers import TensorBoardLogger
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import VQVAE
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_modules.autoencoder_losses import (
    Discriminators,
    MedicalNetPerceptualLoss,
    codebook_perplexity,
    codebook_usage,
    constructor_arguments,
    latent_moments,
    random_cubes,
    restart_dead_codes,
    scale_from_moments,
)
from lightning_modules.checkpoint_io import load_weights, random_states, restore_random_states
from lightning_modules.visualize import slice_grid


class AutoencoderModule(L.LightningModule):
    """A 3D VQ-GAN (Esser et al. 2021): MONAI's `VQVAE` trained against PatchGAN discriminators.

    Generator loss: L1 + the codebook commitment loss (EMA codebook, van den Oord et al. 2017)
    + `perceptual_weight`·perceptual (optional) + `adversarial_weight`·adversarial (from step
    `adversarial_start_step` on). Manual optimisation: one AdamW step for the autoencoder, then one
    for the discriminators; Lightning counts both in `global_step`, so bound runs by `max_epochs`.
    Gradients are clipped here (`gradient_clip_val`): Lightning cannot clip manual optimisation.

    Args:
        in_channels: image channels (linked from the data module by `msrl train-autoencoder`).
        spatial_size: side of the cubic volumes (linked from the data module).
        num_classes: classes of the data set (linked; unused: the autoencoder ignores labels).
        channels: channels of each stride-2 level; one entry per level.
        num_res_layers: residual layers per level.
        num_res_channels: channels inside the residual layers, per level (or one for all).
        downsample_levels: stride-2 levels: 2 shrinks each side 4×, 3 shrinks it 8×.
        num_embeddings: codebook size.
        embedding_dim: channels of the latent (and of each code).
        commitment_cost: weight of the commitment loss ‖z − sg[e]‖² that keeps encoder outputs near codes.
        codebook_decay: EMA decay of the codebook (lower follows the encoder faster).
        dead_code_restart: move codes that no encoder output used onto encoder outputs (fights collapse).
        dead_code_threshold: a code used by fewer latent vectors than this since the last check is dead.
        dead_code_interval: training steps between dead-code checks.
        adversarial_weight: weight of the generator's adversarial loss.
        adversarial_criterion: "hinge" or "least_squares" (MONAI `PatchAdversarialLoss`).
        adversarial_start_step: training steps of reconstruction alone before the discriminators join.
        discriminator_channels: channels of the first discriminator layer.
        discriminator_layers: strided layers of each discriminator.
        slice_discriminator: add a 2D discriminator on random slices of the three planes.
        slices_per_plane: slices per plane and volume for the slice discriminator.
        perceptual_weights_path: local MedicalNet weights for a perceptual loss; None turns it off.
        perceptual_network: the ResNet depth of that file ("resnet10", "resnet50", …).
        perceptual_weight: weight of the perceptual loss.
        lr: AdamW learning rate of the autoencoder.
        discriminator_lr: AdamW learning rate of the discriminators.
        betas: AdamW betas of both (GAN practice: a low β1).
        gradient_clip_val: clip each optimiser's gradient norm to this (None: no clipping).
        train_crop_size: train on random cubes of this side (a multiple of 2^downsample_levels) instead
            of whole volumes: the networks are convolutional, and a 32³ cube of a 64³ volume costs an
            eighth of its step. None trains on whole volumes; validation always uses them. Cubes
            oversample the brain (their latents' std was 1.4× the whole volumes' on the template), so
            with cubes the scale factor comes from the whole validation volumes' latents.
        preview_num_samples: validation volumes shown next to their reconstructions in TensorBoard.
    """

    regulariser_name = "train/codebook_loss"  # what the latent regulariser is logged as

    def __init__(
        self,
        in_channels: int = 1,
        spatial_size: int = 64,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 64),
        num_res_layers: int = 1,
        num_res_channels: Sequence[int] | int = (32, 64),
        downsample_levels: int = 2,
        num_embeddings: int = 256,
        embedding_dim: int = 8,
        commitment_cost: float = 0.25,
        codebook_decay: float = 0.9,
        dead_code_restart: bool = True,
        dead_code_threshold: float = 1.0,
        dead_code_interval: int = 20,
        adversarial_weight: float = 0.01,
        adversarial_criterion: Literal["hinge", "least_squares"] = "least_squares",
        adversarial_start_step: int = 1000,
        discriminator_channels: int = 32,
        discriminator_layers: int = 3,
        slice_discriminator: bool = False,
        slices_per_plane: int = 4,
        perceptual_weights_path: str | None = None,
        perceptual_network: str = "resnet10",
        perceptual_weight: float = 0.1,
        lr: float = 2e-4,
        discriminator_lr: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.9),
        gradient_clip_val: float | None = 1.0,
        train_crop_size: int | None = None,
        preview_num_samples: int = 2,
    ) -> None:
        arguments = constructor_arguments(locals())
        super().__init__()
        self.save_hyperparameters(arguments)
        if len(channels) != downsample_levels:
            raise ValueError(f"channels {tuple(channels)} needs one entry per stride-2 level "
                             f"(downsample_levels={downsample_levels})")
        if num_embeddings < 2 or dead_code_interval < 1:
            raise ValueError(f"num_embeddings must be >= 2 and dead_code_interval >= 1, got {num_embeddings} "
                             f"and {dead_code_interval}")
        self.network = VQVAE(
            spatial_dims=3, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels),
            num_res_layers=num_res_layers,
            num_res_channels=num_res_channels if isinstance(num_res_channels, int) else tuple(num_res_channels),
            downsample_parameters=((2, 4, 1, 1),) * downsample_levels,
            upsample_parameters=((2, 4, 1, 1, 0),) * downsample_levels,
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, commitment_cost=commitment_cost,
            decay=codebook_decay,
        )
        self.register_buffer("code_counts", torch.zeros(num_embeddings), persistent=False)  # since the last check
        self.register_buffer("val_code_counts", torch.zeros(num_embeddings), persistent=False)
        self.setup_training_parts()

    def setup_training_parts(self) -> None:
        """What VQ and KL variants share: discriminators, losses, metrics and the latent-scale buffers."""
        hp = self.hparams
        factor = 2 ** hp.downsample_levels
        for key in ("spatial_size", "train_crop_size"):
            if hp[key] is not None and (hp[key] % factor or hp[key] <= 0):
                raise ValueError(f"{key}={hp[key]} must be a positive multiple of 2^downsample_levels = {factor}")
        side = hp.spatial_size if hp.train_crop_size is None else hp.train_crop_size
        if side > hp.spatial_size or side < 3 * 2 ** hp.discriminator_layers:
            raise ValueError(f"the training volumes' side ({side}, train_crop_size or spatial_size) must be at most "
                             f"spatial_size={hp.spatial_size} and at least 3·2^discriminator_layers = "
                             f"{3 * 2 ** hp.discriminator_layers} (smaller leaves the PatchGAN no patch)")
        if hp.adversarial_criterion not in ("hinge", "least_squares"):
            raise ValueError(f"adversarial_criterion must be 'hinge' or 'least_squares', got "
                             f"{hp.adversarial_criterion!r}")
        self.automatic_optimization = False
        self.discriminators = Discriminators(hp.in_channels, hp.discriminator_channels, hp.discriminator_layers,
                                             hp.slice_discriminator, hp.slices_per_plane)
        self.adversarial_loss = PatchAdversarialLoss(criterion=hp.adversarial_criterion)
        # A tuple hides the frozen loss network from the state dict (see MedicalNetPerceptualLoss).
        self._perceptual = (() if hp.perceptual_weights_path is None else
                            (MedicalNetPerceptualLoss(hp.perceptual_weights_path, hp.perceptual_network),))
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.register_buffer("latent_scale", torch.ones(()))  # `scale_factor`; saved in every checkpoint
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))  # saved: survives resume
        self.register_buffer("latent_sums", torch.zeros(3, dtype=torch.float64), persistent=False)  # training
        self.register_buffer("val_latent_sums", torch.zeros(3, dtype=torch.float64), persistent=False)
        self._preview: torch.Tensor | None = None

    # Public API of the first stage ---------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the latent."""
        return self.hparams.embedding_dim

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[C, s, s, s] of one volume's latent (s = spatial_size / 2^downsample_levels)."""
        side = self.hparams.spatial_size // 2 ** self.hparams.downsample_levels
        return (self.latent_channels, side, side, side)

    @property
    def scale_factor(self) -> float:
        """1 / std of whole training volumes' latents (see `train_crop_size`); diffusion works on `scale_factor · z`."""
        return float(self.latent_scale)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled continuous latents [B, C_lat, s, s, s] of images [B, C, S, S, S] in [-1, 1].

        For the VQ-GAN these are the encoder outputs before quantisation, as in LDM (Rombach et
        al. 2022): the decoder's quantiser absorbs a diffusion model's small errors.
        """
        return self.network.encode(images)

    def decode_latent(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S, S] in [-1, 1] from unscaled latents: quantise (no codebook update), decode."""
        return self.network.decode(self.network.quantizer.embed(self.code_indices(latents))).clamp(-1, 1)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """`decode_latent(encode_latent(images))`: [B, C, S, S, S] in [-1, 1]."""
        return self.decode_latent(self.encode_latent(images))

    def code_indices(self, latents: torch.Tensor) -> torch.Tensor:
        """Index [B, s, s, s] of the nearest code of each latent vector (the codebook is not updated)."""
        return self.network.quantizer.quantizer.quantize(latents)[2]

    # Hooks the KL variant replaces ---------------------------------------------------------------
    def autoencode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, latent regulariser loss, unscaled latents); updates the codebook."""
        latents = self.encode_latent(images)
        quantized, commitment, indices = self.network.quantizer.quantizer(latents)
        self.code_counts += torch.bincount(indices.flatten(), minlength=self.hparams.num_embeddings)
        return self.network.decode(quantized), commitment, latents

    def after_generator_step(self, latents: torch.Tensor) -> None:
        """Every `dead_code_interval` steps, restart the codes used by fewer than `dead_code_threshold` vectors.

        Counts are summed over ranks and the replacements come from rank 0, so every rank keeps the
        same codebook.
        """
        hp = self.hparams
        if not hp.dead_code_restart or int(self.training_steps) % hp.dead_code_interval:
            return
        counts = self.trainer.strategy.reduce(self.code_counts.clone(), reduce_op="sum")
        self.code_counts.zero_()
        dead = counts < hp.dead_code_threshold
        if dead.any():
            vectors = latents.detach().float().movedim(1, -1).reshape(-1, latents.shape[1])
            picks = vectors[torch.randint(len(vectors), (int(dead.sum()),), device=vectors.device)]
            restart_dead_codes(self.network.quantizer.quantizer, dead, self.trainer.strategy.broadcast(picks))
        self.log("train/dead_codes_restarted", dead.sum().float(), on_step=True, batch_size=1)

    def validation_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode_latent(latents)`, counting the codes used for the epoch's codebook health."""
        indices = self.code_indices(latents)
        self.val_code_counts += torch.bincount(indices.flatten(), minlength=self.hparams.num_embeddings)
        return self.network.decode(self.network.quantizer.embed(indices)).clamp(-1, 1)

    def log_latent_health(self) -> None:
        """`ae/codebook_perplexity` and `ae/codebook_usage` of the validation epoch (all ranks' codes)."""
        counts = self.trainer.strategy.reduce(self.val_code_counts.clone(), reduce_op="sum")
        self.val_code_counts.zero_()
        # Every rank holds the same summed counts; sync_dist only tells Lightning so.
        self.log("ae/codebook_perplexity", codebook_perplexity(counts), batch_size=1, sync_dist=True)
        self.log("ae/codebook_usage", codebook_usage(counts), batch_size=1, sync_dist=True)

    # Training ------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One autoencoder step, then (once the adversarial term is on) one discriminator step."""
        images, hp = batch["image"], self.hparams
        if hp.train_crop_size is not None:
            images = random_cubes(images, hp.train_crop_size, 2 ** hp.downsample_levels)
        generator_optimizer, discriminator_optimizer = self.optimizers()
        adversarial = int(self.training_steps) >= hp.adversarial_start_step
        self.toggle_optimizer(generator_optimizer)
        reconstruction, regulariser, latents = self.autoencode(images)
        if hp.train_crop_size is None:
            self.latent_sums += latent_moments(latents)
        l1 = F.l1_loss(reconstruction.float(), images.float())
        loss = l1 + regulariser
        logs = {"train/l1": l1, self.regulariser_name: regulariser}
        if self._perceptual:
            perceptual = self._perceptual[0].to(images.device)(reconstruction.float(), images.float())
            loss, logs["train/perceptual"] = loss + hp.perceptual_weight * perceptual, perceptual
        if adversarial:
            fooling = self.adversarial_loss(self.discriminators(reconstruction), target_is_real=True,
                                            for_discriminator=False)
            loss, logs["train/generator_adversarial"] = loss + hp.adversarial_weight * fooling, fooling
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
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val,
                                gradient_clip_algorithm="norm")
        optimizer.step()
        self.untoggle_optimizer(optimizer)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for the autoencoder, AdamW for the discriminators (in that order)."""
        hp = self.hparams
        generator = [p for p in self.network.parameters() if p.requires_grad]  # not the EMA codebook
        return [torch.optim.AdamW(generator, lr=hp.lr, betas=tuple(hp.betas)),
                torch.optim.AdamW(self.discriminators.parameters(), lr=hp.discriminator_lr, betas=tuple(hp.betas))]

    # Latent scale: from this epoch's training latents, or the validation volumes' with cubes ---------
    def on_train_epoch_start(self) -> None:
        """Start this epoch's latent statistics afresh."""
        self.latent_sums.zero_()

    def on_train_epoch_end(self) -> None:
        """Store 1/std of this epoch's training latents (before the epoch's checkpoint is written)."""
        if self.hparams.train_crop_size is None:
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
        if self.hparams.train_crop_size is None:
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
            count = self.hparams.preview_num_samples
            self._preview = torch.stack([images[:count], reconstruction[:count]], 1).flatten(0, 1)

    def on_validation_epoch_end(self) -> None:
        """Codebook health, real-vs-reconstructed middle slices (rows alternate), and with cubes the scale."""
        self.log_latent_health()
        if self.hparams.train_crop_size is not None and not self.trainer.sanity_checking:
            self.store_scale_factor(self.val_latent_sums)
        preview, self._preview = self._preview, None
        if (preview is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero
                and isinstance(self.logger, TensorBoardLogger)):
            self.logger.experiment.add_image("val/reconstructions", slice_grid(preview), self.global_step)

    # Checkpoints ---------------------------------------------------------------------------------
    def autoencoder_spec(self) -> dict[str, Any]:
        """What rebuilds this autoencoder from a checkpoint: class, arguments, scale factor, latent shape."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "hparams": {key: value for key, value in self.hparams.items() if not key.startswith("_")},
                "scale_factor": self.scale_factor, "latent_shape": list(self.latent_shape)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write `autoencoder_spec()` under `msrl_autoencoder`, and the RNG states (crops replay on resume)."""
        checkpoint["msrl_autoencoder"] = self.autoencoder_spec()
        checkpoint["msrl_rng"] = random_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states of a resumed run."""
        if "msrl_rng" in checkpoint:
            restore_random_states(checkpoint["msrl_rng"])

    @classmethod
    def from_msrl_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> AutoencoderModule:
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
        spec = checkpoint.get("msrl_autoencoder") if isinstance(checkpoint, dict) else None
        if not isinstance(spec, dict):
            raise ValueError(f"checkpoint {path} is not an msrl autoencoder checkpoint (no msrl_autoencoder "
                             "entry; msrl train-autoencoder writes one)")
        model_class = _autoencoder_class(spec.get("class_path"), path, cls)
        # LightningCLI hands its config to every save_hyperparameters() called while it builds a module.
        token = _given_hyperparameters.set(None)
        try:
            model = model_class(**{**spec["hparams"], "perceptual_weights_path": None})
        finally:
            _given_hyperparameters.reset(token)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval().requires_grad_(False)


def _autoencoder_class(class_path: Any, path: Path, base: type[AutoencoderModule]) -> type[AutoencoderModule]:
    """The class a checkpoint names, refused unless it is `base` or one of its subclasses."""
    module_name, _, name = str(class_path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name else None
    except ImportError:
        found = None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ValueError(f"checkpoint {path} names class {class_path!r}, which is not a {base.__name__} "
                         "(or subclass of it) that this installation provides")
    return found
