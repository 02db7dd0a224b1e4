"""2D slice-wise rewards (local texture): slices inside the brain, their aggregation, the slice critic."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.finetune.reward import Reward
from lightning_modules.slices import SliceSampler, flatten_slices

CRITICS_HOW_TO = "`msrl train-reward -c configs/rewards/critics.yaml` (its checkpoints/last.ckpt)"

Aggregate = Literal["mean", "min", "quantile"]


def aggregate(scores: torch.Tensor, how: Aggregate = "mean", quantile: float = 0.1) -> torch.Tensor:
    """Per-volume score [B] from per-slice scores [B, N]: mean, min, or a low quantile (punishes the worst)."""
    if how == "mean":
        return scores.mean(1)
    if how == "min":
        return scores.amin(1)
    if how == "quantile":
        return torch.quantile(scores.float(), quantile, dim=1)
    raise ValueError(f"aggregate must be mean, min or quantile, got {how!r}")


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
        from lightning_modules.critics.networks import RealismCriticModule  # heavy import, only when configured

        self.critic = RealismCriticModule.load_for_reward(checkpoint, type(self).__name__, CRITICS_HOW_TO)
        self.sampler = SliceSampler(slices_per_plane, mode=sampling)
        self.how, self.quantile = how, quantile

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Aggregated log p(real) of the slices: [B]."""
        slices = self.sampler(volumes)  # [B, 3K, C, S, S]
        logits = self.critic.slice_logits(flatten_slices(slices).float()).view(volumes.shape[0], -1)
        return aggregate(F.logsigmoid(logits), self.how, self.quantile)
