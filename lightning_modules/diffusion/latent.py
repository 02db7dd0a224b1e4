"""The frozen first stage of a latent diffusion model (docs/design.md §2a): encode, scale, decode.

A latent `DiffusionModule` diffuses `scale_factor · encode_latent(x)` (LDM, Rombach et al. 2022;
MONAI's `LatentDiffusionInferer` semantics) and decodes its samples back to full-size volumes.
The autoencoder's weights stay in their own file: the diffusion checkpoint records its path and
SHA-256, and loading fails with a message naming the file when it is missing or has changed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.digest import sha256_of
from lightning_modules.first_stage.tiling import Blend, TiledDecoding

TRAIN_HOW_TO = "train one with `msrl train-autoencoder -c configs/autoencoder/template.yaml`"


class LatentSpace:
    """A frozen autoencoder with its latent scale: `encode` images → scaled latents, `decode` back.

    It is deliberately not an `nn.Module` attribute of the diffusion model, so that its weights do
    not enter the diffusion checkpoint; `to(device)` moves it along.

    Args:
        checkpoint: an `msrl train-autoencoder` checkpoint (read with weights_only=True).
        expected_sha256: the hash recorded when the diffusion model was trained (None: not checked).
        decode_batch_size: latents decoded per forward pass; when tiled, tiles per forward pass.
        decode_tile_size: side of a latent tile decoded at once (`TiledDecoding`); None decodes each
            latent whole. Tiling bounds the decoder's memory by the tile, not the volume (128³–256³).
        decode_overlap: fraction of a tile shared with each neighbour, in [0, 1).
        decode_blend: "trim", "gaussian" or "constant" weighting of overlapping tiles (`TiledDecoding`).
    """

    def __init__(self, checkpoint: str | Path, expected_sha256: str | None = None, decode_batch_size: int = 4,
                 decode_tile_size: int | None = None, decode_overlap: float = 0.625,
                 decode_blend: Blend = "trim") -> None:
        from lightning_modules.first_stage.base import FirstStageModule

        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"this latent diffusion model needs its autoencoder checkpoint {path}, which does "
                                    f"not exist: restore that file (or {TRAIN_HOW_TO} and pretrain again)")
        if decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        self.path, self.sha256, self.decode_batch_size = path, sha256_of(path), decode_batch_size
        self.tiling = TiledDecoding(decode_tile_size, decode_overlap, decode_blend, tiles_per_pass=decode_batch_size)
        if expected_sha256 is not None:
            self.check_sha256(expected_sha256)
        self.autoencoder = FirstStageModule.from_msrl_checkpoint(path)
        self._cache: dict[str, torch.Tensor] = {}
        self.scale_factor = self.autoencoder.scale_factor
        self.shape = tuple(self.autoencoder.latent_shape)

    def check_sha256(self, expected: str) -> None:
        """Raise unless the autoencoder file is the one a diffusion model recorded."""
        if self.sha256 != expected:
            raise ValueError(f"autoencoder checkpoint {self.path} is not the one this diffusion model was trained "
                             f"with (sha256 {self.sha256[:16]}…, recorded {expected[:16]}…): its latents would mean "
                             "something else; restore the original file")

    def check_images(self, in_channels: int, spatial_size: int) -> None:
        """Raise unless the data's volumes are what the autoencoder was trained on."""
        if (self.image_channels, self.image_size) != (in_channels, spatial_size):
            raise ValueError(f"autoencoder {self.path} was trained on {self.image_channels}-channel "
                             f"{self.image_size}³ volumes, the data has {in_channels}-channel {spatial_size}³")

    @property
    def image_channels(self) -> int:
        """Channels of the images the autoencoder was trained on."""
        return int(self.autoencoder.hparams.in_channels)

    @property
    def image_size(self) -> int:
        """Side of the cubic images the autoencoder was trained on."""
        return int(self.autoencoder.hparams.spatial_size)

    def to(self, device: torch.device | str) -> LatentSpace:
        """Move the autoencoder (no-op when it is there already)."""
        self.autoencoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C_lat, s, s, s] of images [B, C, S, S, S] in [-1, 1]."""
        self.to(images.device)
        return self.autoencoder.encode_latent(images) * self.scale_factor

    @torch.no_grad()
    def encode_cached(self, images: torch.Tensor, keys: list[str] | None) -> torch.Tensor:
        """`encode`, reusing the latents of volumes seen before (keyed by subject id).

        The encoder is deterministic and frozen, so a subject's latent never changes: training
        encodes each volume once instead of once per epoch (at 64³ the encoder costs more than
        the latent UNet's step). Without keys (or with augmented volumes) use `encode`.
        """
        if keys is None:
            return self.encode(images)
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            for index, latent in zip(missing, self.encode(images[missing]), strict=True):
                self._cache[keys[index]] = latent
        return torch.stack([self._cache[key].to(images.device) for key in keys])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C, S, S, S] in [-1, 1] of scaled latents, `decode_batch_size` at a time (tiled if set)."""
        self.to(latents.device)
        parts = [self.tiling.decode(self.autoencoder.decode_latent, chunk.float() / self.scale_factor)
                 for chunk in latents.split(self.decode_batch_size)]
        return torch.cat(parts)

    def decode_with_grad(self, latents: torch.Tensor, checkpoint: bool = True) -> torch.Tensor:
        """`decode` that passes gradients back to the latents (reward backpropagation, docs/design.md §3a).

        The autoencoder stays frozen; a VQ-GAN's codebook lookup passes the gradient straight through
        (`decode_latent_with_grad`). With `checkpoint` each chunk's decoder activations are recomputed in
        the backward pass instead of kept (torch.utils.checkpoint): the decoder's memory is then one
        chunk's, at the price of a second decoder forward.
        """
        from torch.utils.checkpoint import checkpoint as recompute

        self.to(latents.device)
        decoder = self.autoencoder.decode_latent_with_grad

        def decode(chunk: torch.Tensor) -> torch.Tensor:
            return self.tiling.decode(decoder, chunk.float() / self.scale_factor)

        parts = [recompute(decode, chunk, use_reentrant=False) if checkpoint else decode(chunk)
                 for chunk in latents.split(self.decode_batch_size)]
        return torch.cat(parts)

    def spec(self) -> dict[str, str]:
        """What a diffusion checkpoint records about its autoencoder."""
        return {"path": str(self.path), "sha256": self.sha256}
