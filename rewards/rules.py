"""Rule-based rewards: scores that need no training."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.base import VolumeDataModule
from datamodules.preprocessing import FOREGROUND_THRESHOLD, foreground_histogram
from lightning_modules.finetune.reward import Reward


class InterSliceContinuityReward(Reward):
    """Penalise slice-to-slice jumps that a real scan does not have (3D volumetric, rule-based).

    The jump is the mean absolute difference between neighbouring slices along the three axes,
    inside the foreground (voxels above `background` in either slice). Without a target the reward
    is minus the jump: speckle and slice-wise discontinuities lower it, but a blurred or blank volume
    wins. With `target` (the real volumes' mean jump, e.g. `continuity_target` of the training split)
    the reward is minus the distance to it: real texture scores best, noise and blur both lose, and a
    blank volume (no foreground: jump 0) scores −target.

    Args:
        background: intensity at or below which a voxel is background (preprocessing sets -1).
        target: the real volumes' mean jump (None: reward = −jump, which blur and blank volumes win).
        name: log key.
    """

    def __init__(self, background: float = FOREGROUND_THRESHOLD, target: float | None = None,
                 name: str = "continuity") -> None:
        super().__init__(name)
        if target is not None and target <= 0:
            raise ValueError(f"target must be the real volumes' mean slice-to-slice jump (> 0), got {target}")
        self.background, self.target = background, target

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """−jump, or −|jump − target| with a target: [B]."""
        jump = self.jump(volumes)
        return -jump if self.target is None else -(jump - self.target).abs()

    def jump(self, volumes: torch.Tensor) -> torch.Tensor:
        """mean |x_{i+1} − x_i| over the three axes and the foreground: [B] (0 for a blank volume)."""
        volumes = volumes.float()
        total = volumes.new_zeros(volumes.shape[0])
        count = volumes.new_zeros(volumes.shape[0])
        for axis in (2, 3, 4):
            size = volumes.shape[axis] - 1
            ahead, behind = volumes.narrow(axis, 1, size), volumes.narrow(axis, 0, size)
            foreground = ((ahead > self.background) | (behind > self.background)).float()
            total += ((ahead - behind).abs() * foreground).flatten(1).sum(1)
            count += foreground.flatten(1).sum(1)
        return total / count.clamp(min=1.0)


class HemisphericSymmetryReward(Reward):
    """Left–right symmetry of the brain (3D volumetric, rule-based).

    Minus the mean absolute difference between the volume and its mirror image across the
    mid-sagittal plane (axis D, left→right after preprocessing), inside the foreground. A lesion is
    asymmetric by nature: `classes` limits the reward to the classes it should apply to (others
    get 0; PPO normalises advantages per class, so a constant changes nothing for them).

    Args:
        classes: labels the reward applies to (None: every volume).
        background: intensity at or below which a voxel is background.
        name: log key.
    """

    def __init__(self, classes: list[int] | None = None, background: float = FOREGROUND_THRESHOLD,
                 name: str = "symmetry") -> None:
        super().__init__(name)
        self.classes, self.background = classes, background

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-mean |x − mirror(x)| over the foreground: [B]."""
        volumes = volumes.float()
        mirror = volumes.flip(2)
        foreground = ((volumes > self.background) | (mirror > self.background)).float()
        count = foreground.flatten(1).sum(1).clamp(min=1)
        reward = -((volumes - mirror).abs() * foreground).flatten(1).sum(1) / count
        if self.classes is not None and labels is not None:
            applies = torch.isin(labels, torch.tensor(self.classes, device=labels.device))
            reward = torch.where(applies, reward, torch.zeros_like(reward))
        return reward


class BrainMaskPlausibilityReward(Reward):
    """One connected brain and nothing outside the head (3D volumetric, rule-based).

    reward = (share of foreground voxels in the largest connected component)
           − (share of foreground voxels within `border` voxels of the volume's edge).
    Preprocessing crops to the brain and pads, so real volumes score close to 1. Not differentiable:
    it thresholds and labels connected components (scipy, on the CPU).

    Args:
        background: intensity at or below which a voxel is background.
        border: width of the edge shell, in voxels, where a real brain has no mass.
        name: log key.
    """

    differentiable = False

    def __init__(self, background: float = -0.8, border: int = 1, name: str = "mask") -> None:
        super().__init__(name)
        self.background, self.border = background, border

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Largest-component share minus edge share: [B] in [-1, 1]."""
        from scipy import ndimage  # connected components; scipy comes with nilearn

        foreground = (volumes.float().amax(dim=1) > self.background).cpu().numpy()  # [B, D, H, W]
        rewards = []
        for mask in foreground:
            total = mask.sum()
            if total == 0:
                rewards.append(-1.0)
                continue
            components, count = ndimage.label(mask)
            largest = np.bincount(components.ravel())[1:].max() if count else 0
            inner = np.zeros_like(mask)
            b = self.border
            inner[b:-b, b:-b, b:-b] = True
            rewards.append(float(largest / total - (mask & ~inner).sum() / total))
        return torch.tensor(rewards, device=volumes.device)


class IntensityHistogramReward(Reward):
    """Closeness of the foreground intensity distribution to the real training data's.

    Minus the 1-Wasserstein distance between the volume's foreground intensity histogram and the
    mean histogram of the real training volumes (`VolumeDataModule.intensity_histogram`, stored
    with the data module's cache). Not differentiable: a histogram's bin counts have no gradient.

    Args:
        data: the real data set (its training split gives the reference histogram).
        bins: histogram bins over [-1, 1].
        background: intensity at or below which a voxel is background.
        name: log key.
    """

    differentiable = False

    def __init__(self, data: VolumeDataModule, bins: int = 64, background: float = FOREGROUND_THRESHOLD,
                 name: str = "histogram") -> None:
        super().__init__(name)
        self.bins, self.background = bins, background
        self.register_buffer("reference_cdf", data.intensity_histogram(bins, background).cumsum(0).float())

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-W1(volume's foreground histogram, reference): [B]."""
        cdfs = torch.stack([foreground_histogram(v, self.bins, self.background) for v in volumes]).cumsum(1)
        width = 2.0 / self.bins
        return -(cdfs - self.reference_cdf.to(cdfs.device)).abs().sum(1) * width
