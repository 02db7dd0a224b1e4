"""Slices of volumes, the one way msrl takes them: planes, positions, in-brain sampling.

The 2D slice critic and its reward, the VQ-GAN's slice discriminator, the slice feature extractor
of the evaluation and the pictures all take slices here, so "axial" means the same everywhere:
volumes are [B, C, D, H, W] in RAS+ voxel order (docs/design.md §1), and a plane's slices fix one
spatial axis (axial: the last, inferior→superior; coronal: H; sagittal: D).
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange

from datamodules.preprocessing import FOREGROUND_THRESHOLD

PLANES = ("axial", "coronal", "sagittal")
PLANE_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}  # the spatial axis (of D, H, W) a plane's slices fix


def plane_slices(volumes: torch.Tensor, plane: str, index: torch.Tensor) -> torch.Tensor:
    """Slices [B, K, C, S, S] of volumes [B, C, D, H, W] at the K positions `index` along `plane`'s axis."""
    axis = 2 + PLANE_AXES[plane]
    return volumes.index_select(axis, index.to(volumes.device)).movedim(axis, 1)


class SliceSampler:
    """K slices from each of the axial, coronal and sagittal planes, inside the brain.

    A slice is eligible when at least `min_foreground` of its voxels are foreground; "fixed"
    takes K evenly spaced eligible slices (the same for every call: a stable reward), "random"
    draws K of them with the given generator (more coverage when training a critic).

    Args:
        slices_per_plane: K.
        mode: "fixed" or "random".
        min_foreground: share of foreground voxels that makes a slice eligible.
        background: intensity at or below which a voxel is background.
    """

    def __init__(self, slices_per_plane: int = 4, mode: Literal["fixed", "random"] = "fixed",
                 min_foreground: float = 0.1, background: float = FOREGROUND_THRESHOLD) -> None:
        if slices_per_plane < 1:
            raise ValueError(f"slices_per_plane must be >= 1, got {slices_per_plane}")
        if mode not in ("fixed", "random"):
            raise ValueError(f"mode must be 'fixed' or 'random', got {mode!r}")
        self.k, self.mode, self.min_foreground, self.background = slices_per_plane, mode, min_foreground, background

    def __call__(self, volumes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Slices [B, 3K, C, S, S] of cubic volumes [B, C, S, S, S] (planes in the order axial, coronal, sagittal)."""
        if volumes.shape[-1] != volumes.shape[-2] or volumes.shape[-2] != volumes.shape[-3]:
            raise ValueError(f"slice sampling needs cubic volumes, got {tuple(volumes.shape)}")
        out = []
        for volume in volumes:
            foreground = (volume.amax(0) > self.background).float()  # [S, S, S]
            planes = []
            for plane in PLANES:
                axis = PLANE_AXES[plane]
                share = foreground.mean(dim=tuple(a for a in range(3) if a != axis))
                planes.append(plane_slices(volume[None], plane, self._choose(share, generator))[0])
            out.append(torch.cat(planes))  # [3K, C, S, S]
        return torch.stack(out)

    def _choose(self, share: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        eligible = torch.nonzero(share >= self.min_foreground).flatten().cpu()
        if len(eligible) == 0:  # an empty volume: fall back to the middle slices
            eligible = torch.arange(len(share) // 2 - 1, len(share) // 2 + 1)
        if self.mode == "fixed":
            positions = torch.linspace(0, len(eligible) - 1, self.k + 2)[1:-1].round().long()
            return eligible[positions]
        return eligible[torch.randint(len(eligible), (self.k,), generator=generator)]


def flatten_slices(slices: torch.Tensor) -> torch.Tensor:
    """[B, N, C, S, S] → [B·N, C, S, S] for a 2D network."""
    return rearrange(slices, "b n c h w -> (b n) c h w")
