"""`KLAutoencoderModule`: the KL-regularised first stage (MONAI `AutoencoderKL`), a drop-in for the VQ-GAN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import AutoencoderKL

from lightning_modules.first_stage.base import FirstStageModule
from lightning_modules.first_stage.losses import constructor_arguments
from lightning_modules.first_stage.settings import DEFAULT_TRAINING, FirstStageTraining


class KLAutoencoderModule(FirstStageModule):
    """LDM's KL autoencoder (Rombach et al. 2022): a Gaussian latent with a small KL penalty, no codebook.

    Chosen by `class_path: lightning_modules.KLAutoencoderModule`; a sibling of the VQ-GAN
    `AutoencoderModule` under `FirstStageModule`, it trains, logs, checkpoints and reloads like it
    (in_channels, spatial_size and num_classes as there; `training` is the shared
    `FirstStageTraining`). `encode_latent` returns the posterior
    mean, so latents are deterministic and can be cached.

    Args:
        channels: channels of each level; the first level keeps the resolution, so
            `len(channels) == downsample_levels + 1`.
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (must divide every channel count).
        latent_channels: channels of the latent.
        attention: self-attention in the encoder's and decoder's middle blocks (costly at 3D sizes).
        kl_weight: weight of KL(q(z|x) ‖ N(0, I)), summed over latent elements, averaged over the batch.
        downsample_levels: stride-2 levels: 2 shrinks each side 4×.
        training: how it is trained (losses, discriminators, optimisers, crops): `FirstStageTraining`.
    """

    regulariser_name = "train/kl"

    def __init__(
        self,
        in_channels: int = 1,
        spatial_size: int = 64,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 64, 64),
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        latent_channels: int = 8,
        attention: bool = False,
        kl_weight: float = 1e-6,
        downsample_levels: int = 2,
        training: FirstStageTraining = DEFAULT_TRAINING,
    ) -> None:
        super().__init__(constructor_arguments(locals()))
        if len(channels) != downsample_levels + 1:
            raise ValueError(f"channels {tuple(channels)} needs downsample_levels + 1 = {downsample_levels + 1} "
                             "entries (AutoencoderKL's first level keeps the resolution)")
        if any(width % norm_num_groups for width in channels):
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every channel count {tuple(channels)}")
        self.network = AutoencoderKL(
            spatial_dims=3, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels),
            num_res_blocks=num_res_blocks, attention_levels=(False,) * len(channels), latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, with_encoder_nonlocal_attn=attention,
            with_decoder_nonlocal_attn=attention,
        )
        self.setup_training_parts()

    @property
    def latent_channels(self) -> int:
        """Channels of the latent."""
        return self.hparams.latent_channels

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior means [B, latent_channels, s, s, s] of images [B, C, S, S, S] in [-1, 1]."""
        return self.network.encode(images)[0]

    def decode_latent(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S, S] in [-1, 1] from unscaled latents."""
        return self.network.decode(latents).clamp(-1, 1)

    def autoencode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass on a posterior sample: (reconstruction, kl_weight·KL, posterior means)."""
        mean, sigma = self.network.encode(images)
        sample = self.network.sampling(mean, sigma)
        variance = sigma.float().pow(2)
        kl = 0.5 * (mean.float().pow(2) + variance - torch.log(variance.clamp_min(1e-12)) - 1)
        return self.network.decode(sample), self.hparams.kl_weight * kl.flatten(1).sum(1).mean(), mean
