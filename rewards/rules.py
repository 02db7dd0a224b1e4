"""Rule-based rewards: scores that need no training."""

from __future__ import annotations

import torch

from rewards.base import Reward


class InterSliceContinuityReward(Reward):
    """Penalise slice-to-slice jumps that a real scan does not have (3D volumetric, rule-based).

    The reward is minus the mean absolute difference between neighbouring slices along the three
    axes, inside the foreground (voxels above `background` in either slice), so that speckle noise
    and slice-wise discontinuities lower it while a smooth, coherent volume raises it.

    Args:
        background: intensity at or below which a voxel is background (preprocessing sets -1).
        name: log key.
    """

    def __init__(self, background: float = -0.95, name: str = "continuity") -> None:
        super().__init__(name)
        self.background = background

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-mean |x_{i+1} − x_i| over the three axes and the foreground: [B]."""
        volumes = volumes.float()
        total = volumes.new_zeros(volumes.shape[0])
        count = volumes.new_zeros(volumes.shape[0])
        for axis in (2, 3, 4):
            size = volumes.shape[axis] - 1
            ahead, behind = volumes.narrow(axis, 1, size), volumes.narrow(axis, 0, size)
            foreground = ((ahead > self.background) | (behind > self.background)).float()
            total += ((ahead - behind).abs() * foreground).flatten(1).sum(1)
            count += foreground.flatten(1).sum(1)
        return -total / count.clamp(min=1.0)
