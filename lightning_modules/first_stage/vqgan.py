"""`AutoencoderModule`: the 3D VQ-GAN first stage of latent diffusion (docs/design.md §2a).

The autoencoder shrinks a volume by 2^downsample_levels per side. Latent diffusion works on
`scale_factor · encode_latent(x)` and brings its samples back with `decode_latent`; training,
validation and checkpoints (`msrl_autoencoder`, read by `AutoencoderModule.from_msrl_checkpoint`)
are shared with every first stage in lightning_modules/first_stage.py. `KLAutoencoderModule`
(lightning_modules/autoencoder_kl.py) is the KL-regularised alternative, chosen by `class_path`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import VQVAE

from lightning_modules.first_stage.base import FirstStageModule
from lightning_modules.first_stage.losses import (
    codebook_perplexity,
    codebook_usage,
    constructor_arguments,
    restart_dead_codes,
)
from lightning_modules.first_stage.settings import DEFAULT_TRAINING, FirstStageTraining


class AutoencoderModule(FirstStageModule):
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
        training: how it is trained (losses, discriminators, optimisers, crops): `FirstStageTraining`.
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
        training: FirstStageTraining = DEFAULT_TRAINING,
    ) -> None:
        super().__init__(constructor_arguments(locals()))
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

    # Public API of the first stage ---------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the latent."""
        return self.hparams.embedding_dim

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled continuous latents [B, C_lat, s, s, s] of images [B, C, S, S, S] in [-1, 1].

        For the VQ-GAN these are the encoder outputs before quantisation, as in LDM (Rombach et
        al. 2022): the decoder's quantiser absorbs a diffusion model's small errors.
        """
        return self.network.encode(images)

    def decode_latent(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S, S] in [-1, 1] from unscaled latents: quantise (no codebook update), decode."""
        return self.network.decode(self.network.quantizer.embed(self.code_indices(latents))).clamp(-1, 1)

    def decode_latent_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode_latent` with a straight-through lookup: z + (q(z) − z).detach() (van den Oord et al. 2017).

        The forward pass decodes exactly the nearest codes, as `decode_latent`; the backward pass treats
        the lookup as the identity, so a reward's gradient reaches the diffusion model's latents.
        """
        quantised = self.network.quantizer.embed(self.code_indices(latents)).to(latents.dtype)
        return self.network.decode(latents + (quantised - latents).detach()).clamp(-1, 1)

    def code_indices(self, latents: torch.Tensor) -> torch.Tensor:
        """Index [B, s, s, s] of the nearest code of each latent vector (the codebook is not updated)."""
        return self.network.quantizer.quantizer.quantize(latents)[2]

    # The latent hooks (the KL variant replaces them) ---------------------------------------------
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

