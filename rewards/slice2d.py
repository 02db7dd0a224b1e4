"""2D slice-wise rewards (local texture): slices inside the brain, their aggregation, the slice critic."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from rewards.base import Reward

CRITICS_HOW_TO = "`msrl train-reward -c configs/rewards/critics.yaml` (its checkpoints/last.ckpt)"

Aggregate = Literal["mean", "min", "quantile"]


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
                 min_foreground: float = 0.1, background: float = -0.95) -> None:
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
            for axis in (2, 1, 0):  # axial (fixed z), coronal (fixed y), sagittal (fixed x)
                share = foreground.mean(dim=tuple(a for a in range(3) if a != axis))
                index = self._choose(share, generator)
                planes.append(volume.index_select(axis + 1, index.to(volume.device)).movedim(axis + 1, 0))
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


def aggregate(scores: torch.Tensor, how: Aggregate = "mean", quantile: float = 0.1) -> torch.Tensor:
    """Per-volume score [B] from per-slice scores [B, N]: mean, min, or a low quantile (punishes the worst)."""
    if how == "mean":
        return scores.mean(1)
    if how == "min":
        return scores.amin(1)
    if how == "quantile":
        return torch.quantile(scores.float(), quantile, dim=1)
    raise ValueError(f"aggregate must be mean, min or quantile, got {how!r}")


def flatten_slices(slices: torch.Tensor) -> torch.Tensor:
    """[B, N, C, S, S] → [B·N, C, S, S] for a 2D network."""
    return rearrange(slices, "b n c h w -> (b n) c h w")


class SliceCriticReward(Reward):
    """2D slice-wise realism (local texture): log p(real) of K slices per plane, aggregated.

    Args:
        checkpoint: a `RealismCriticModule` checkpoint.
        slices_per_plane: K slices from each of the axial, coronal and sagittal planes.
        sampling: "fixed" (evenly spaced inside the brain: a stable reward) or "random".
        how: "mean", "min" or "quantile" over the 3K slices (a low quantile punishes the worst slices).
        quantile: the quantile for how="quantile".
        name: log key.
    """

    def __init__(self, checkpoint: str | None = None, slices_per_plane: int = 4,
                 sampling: Literal["fixed", "random"] = "fixed", how: Aggregate = "mean", quantile: float = 0.1,
                 name: str = "slice2d") -> None:
        super().__init__(name)
        from lightning_modules.critics import RealismCriticModule  # heavy import, only when configured

        self.critic = RealismCriticModule.load_for_reward(checkpoint, type(self).__name__, CRITICS_HOW_TO)
        self.sampler = SliceSampler(slices_per_plane, mode=sampling)
        self.how, self.quantile = how, quantile

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Aggregated log p(real) of the slices: [B]."""
        slices = self.sampler(volumes)  # [B, 3K, C, S, S]
        logits = self.critic.slice_logits(flatten_slices(slices).float()).view(volumes.shape[0], -1)
        return aggregate(F.logsigmoid(logits), self.how, self.quantile)
