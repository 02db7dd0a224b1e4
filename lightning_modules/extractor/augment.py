"""The two augmented views of one volume that the self-supervised encoder learns to match.

The views differ in pose (a random affine: zoom, rotation, shift; a left-right mirror) and mildly
in contrast (a gamma curve), which a brain MRI can differ in without being a different or a worse
brain. They deliberately contain none of the artefacts the evaluation must see (noise, blur,
ghosting, bias field): an encoder trained to ignore an artefact would give it no FID.

The transforms are TorchIO's `RandomFlip`/`RandomAffine`/`RandomGamma` redone on whole batches with
`affine_grid`/`grid_sample`: TorchIO resamples one volume at a time (SimpleITK), which took two
thirds of a training step at 64³ on 2 CPU cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datamodules.preprocessing import BACKGROUND


@dataclass(frozen=True)
class ViewAugmentation:
    """How far two views of a volume may differ.

    Args:
        scale: zoom range per axis, 1 ± scale (0.15: 0.85–1.15).
        degrees: rotation range ±degrees about every axis.
        translation: shift range ±translation, as a fraction of the volume's side.
        flip_probability: chance of a left-right mirror (axis 0 after canonical RAS orientation).
        log_gamma: contrast range, log γ ~ U(−log_gamma, log_gamma); 0 turns it off.
    """

    scale: float = 0.15
    degrees: float = 10.0
    translation: float = 0.08
    flip_probability: float = 0.5
    log_gamma: float = 0.2

    def __post_init__(self) -> None:
        for name in ("scale", "degrees", "translation", "flip_probability", "log_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"augmentation.{name} must be >= 0, got {getattr(self, name)}")
        if not self.scale < 1 or not self.flip_probability <= 1:
            raise ValueError(f"augmentation.scale must be < 1 and flip_probability <= 1, got {self.scale}, "
                             f"{self.flip_probability}")

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        """One random view of each volume [B, C, S, S, S] in [-1, 1] (background stays -1).

        Draws from torch's global generator on the CPU, so a seeded run draws the same views.
        """
        size = len(volumes)
        theta = random_affine(size, self.scale, self.degrees, self.translation)
        flip = torch.rand(size) < self.flip_probability
        theta[flip, :, 2] *= -1  # mirror spatial axis 0 (D): affine_grid orders coordinates (W, H, D)
        gamma = torch.empty(size).uniform_(-self.log_gamma, self.log_gamma).exp()
        unit = (volumes.float() - BACKGROUND) / (1 - BACKGROUND)  # [0, 1], background 0: what padding adds
        grid = F.affine_grid(theta.to(volumes.device), list(volumes.shape), align_corners=False)
        moved = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved = moved.clamp(0, 1) ** gamma.to(volumes.device).view(-1, *[1] * (volumes.ndim - 1))
        return moved * (1 - BACKGROUND) + BACKGROUND


def random_affine(size: int, scale: float, degrees: float, translation: float) -> torch.Tensor:
    """`size` random 3D affines [size, 3, 4] in `affine_grid`'s normalised coordinates.

    Rotation about each axis uniform in ±degrees, zoom per axis in 1 ± scale, shift per axis in
    ±translation of the side (2·translation in [-1, 1] units), as TorchIO's `RandomAffine` draws them.
    """
    angles = torch.empty(size, 3).uniform_(-degrees, degrees) * math.pi / 180
    zoom = torch.empty(size, 3).uniform_(1 - scale, 1 + scale)
    shift = torch.empty(size, 3).uniform_(-translation, translation) * 2
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones(size), torch.zeros(size)

    def rotation(axis: int) -> torch.Tensor:
        c, s = cos[:, axis], sin[:, axis]
        rows = {0: [[one, zero, zero], [zero, c, -s], [zero, s, c]],
                1: [[c, zero, s], [zero, one, zero], [-s, zero, c]],
                2: [[c, -s, zero], [s, c, zero], [zero, zero, one]]}[axis]
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    # output -> input coordinates: a zoom-in by z samples the input on a grid shrunk by 1/z
    linear = rotation(0) @ rotation(1) @ rotation(2) / zoom.unsqueeze(1)
    return torch.cat([linear, shift.unsqueeze(-1)], dim=-1)


def two_views(volumes: torch.Tensor, augmentation: ViewAugmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views [B, C, S, S, S] of each volume."""
    return augmentation(volumes), augmentation(volumes)
