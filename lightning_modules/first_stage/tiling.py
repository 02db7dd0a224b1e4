"""Tiled decoding: a first stage's decoder run window by window over a latent (docs/design.md §2a).

Decoding a whole 128³–256³ volume at once keeps every decoder activation of the full volume in
memory (at 256³ the first stage's last level alone holds 16 channels × 256³ floats). MONAI's
`SlidingWindowInferer` (as MAISI decodes its large latents) runs the decoder on overlapping latent
tiles and blends the tiles' outputs into the full volume, so the decoder's peak memory depends on
the tile, not on the volume. The inferer handles the 2^levels zoom between a latent tile and its
image window (`roi_size` is given in latent voxels).

A tile sees zero padding where the whole volume would see its neighbours, so a tile's outer
voxels differ from whole decoding. MONAI's blends ("constant", "gaussian") average them in;
"trim" lets each voxel come from the tile that holds it deepest (the overlap-tile strategy of
U-Net, Ronneberger et al. 2015): weights fall steeply within overlap·tile/2 latent voxels of a
tile's faces and consecutive centres abut, so tiled equals whole decoding once that margin covers
the decoder's receptive field, ±5 latent voxels for msrl's VQ-GAN (tests/lightning_modules/
test_tiling.py: max |tiled − whole| 2.9e-4 at 64³ on outputs of std 0.69). Decoders with
GroupNorm (the KL autoencoder) normalise each tile by its own statistics, so tiling changes
their output everywhere: tile only the VQ-GAN, whose decoder has no normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from monai.inferers import SlidingWindowInferer

Blend = Literal["constant", "gaussian", "trim"]
BLENDS: tuple[str, ...] = ("constant", "gaussian", "trim")


@dataclass(frozen=True)
class TiledDecoding:
    """How to decode latents tile by tile (tile_size None: the whole latent at once).

    Args:
        tile_size: side of a latent tile in latent voxels (e.g. 16 for 64³ image windows under a
            4× first stage); None, or a tile at least as large as the latent, decodes it whole.
        overlap: fraction of a tile shared with its neighbour along each axis, in [0, 1).
            `overlap · tile_size` should be a whole number of latent voxels.
        blend: "trim" keeps each tile's centre only (exact when overlap·tile/2 covers the decoder's
            receptive field), "gaussian" weighs centres over seams, "constant" averages overlaps.
        tiles_per_pass: tiles decoded per forward pass (the decoder's peak memory grows with it).
    """

    tile_size: int | None = None
    overlap: float = 0.625
    blend: Blend = "trim"
    tiles_per_pass: int = 1

    def __post_init__(self) -> None:
        if self.tile_size is not None and self.tile_size < 1:
            raise ValueError(f"decode_tile_size must be a positive number of latent voxels or None, got "
                             f"{self.tile_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"decode_overlap must be in [0, 1), got {self.overlap}")
        if self.blend not in BLENDS:
            raise ValueError(f"decode_blend must be one of {list(BLENDS)}, got {self.blend!r}")
        if self.tiles_per_pass < 1:
            raise ValueError(f"tiles per decoder pass must be >= 1, got {self.tiles_per_pass}")

    def is_tiled(self, latent_shape: tuple[int, ...]) -> bool:
        """Whether a latent of spatial shape `latent_shape` is decoded in more than one tile."""
        return self.tile_size is not None and any(side > self.tile_size for side in latent_shape)

    def decode(self, decoder: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """`decoder(latents)`, tile by tile when the latent is larger than a tile.

        Args:
            decoder: maps latents [b, C_lat, t, t, t] to images [b, C, f·t, f·t, f·t] (f = the zoom).
            latents: [B, C_lat, s, s, s].

        Returns:
            Images [B, C, f·s, f·s, f·s], on the latents' device.
        """
        if not self.is_tiled(tuple(latents.shape[2:])):
            return decoder(latents)
        weights = trim_weights(self.tile_size, self.overlap, latents.device) if self.blend == "trim" else None
        inferer = SlidingWindowInferer(roi_size=self.tile_size, sw_batch_size=self.tiles_per_pass,
                                       overlap=self.overlap, mode="constant" if weights is not None else self.blend,
                                       padding_mode="replicate", progress=False)
        if weights is not None:
            inferer.roi_weight_map = weights  # the inferer's own map otherwise (its public attribute)
        return inferer(latents, decoder)

    def margin(self) -> int:
        """Latent voxels dropped on each side of a tile under "trim": floor(overlap · tile / 2)."""
        return overlap_voxels(self.tile_size or 0, self.overlap) // 2


def overlap_voxels(tile_size: int, overlap: float) -> int:
    """overlap · tile_size in whole latent voxels (rounded: 5/6 · 12 is 9.999… in floating point)."""
    return round(overlap * tile_size)


def trim_weights(tile_size: int, overlap: float, device: torch.device) -> torch.Tensor:
    """[t, t, t] weights that let the deepest tile win: per axis base^min(d, margin), d = voxels to the nearer face.

    MONAI steps tiles by int((1 − overlap)·t) ≤ t − 2·margin, so every voxel at least a margin from
    the volume's faces lies in some tile's centre (weight base^margin per axis); nearer a volume
    face, the tile aligned with that face holds it deepest, with the same zero padding as the whole
    volume. Every other tile weighs at least `base` times less per voxel of depth, so seams fade
    to ~1e-5 of the decoder's output (a constant weight with a zero margin would leave voxels near
    the volume's faces without weight). base^(3·margin) stays within float32.
    """
    margin = overlap_voxels(tile_size, overlap) // 2
    base = min(100.0, 10.0 ** (10.0 / max(margin, 1)))
    depth = torch.arange(tile_size, device=device)
    depth = torch.minimum(depth, tile_size - 1 - depth).clamp(max=margin).to(torch.float64)
    line = (base ** depth).float()
    return line[:, None, None] * line[None, :, None] * line[None, None, :]
