"""Per-class advantage normalisation for PPO (docs/design.md §3) and the clipped PPO objective."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_modules.finetune.running import RunningMoments


class ClassAdvantageNormaliser(nn.Module):
    """Advantages = rewards normalised by the mean and std of their class, clipped.

    "batch" uses the statistics of the (already all-gathered) batch itself; "running" keeps an
    exponential moving mean/variance per class in buffers (saved in checkpoints), which keeps small
    per-class batches from dividing by a noisy std.

    Args:
        num_classes: classes (0: one group for an unconditional model).
        mode: "batch" or "running".
        momentum: weight of the newest batch in the running statistics.
        clip: advantages are clipped to ±clip (DDPO's adv_clip_max, 5).
        eps: added to the std.
    """

    def __init__(self, num_classes: int, mode: Literal["batch", "running"] = "batch", momentum: float = 0.1,
                 clip: float = 5.0, eps: float = 1e-6) -> None:
        super().__init__()
        if mode not in ("batch", "running"):
            raise ValueError(f"advantage mode must be 'batch' or 'running', got {mode!r}")
        self.mode, self.clip, self.eps = mode, clip, eps
        self.running = RunningMoments(max(num_classes, 1), momentum)

    def forward(self, rewards: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Advantages [N] for rewards [N] and labels [N] (all ranks' samples, same on every rank)."""
        single = labels is None or len(self.running.count) == 1
        groups = torch.zeros_like(rewards, dtype=torch.long) if single else labels
        advantages = torch.zeros_like(rewards, dtype=torch.float64)
        for group in groups.unique().tolist():
            members = groups == group
            values = rewards[members].double()
            mean, var = values.mean(), values.var(unbiased=False)
            if self.mode == "running":
                self.running.update(group, mean, var)
                mean, var = self.running.mean[group], self.running.var[group]
            advantages[members] = (values - mean) / (var.sqrt() + self.eps)
        return advantages.clamp(-self.clip, self.clip).to(rewards.dtype)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective, loss = mean(max(−A·r, −A·clip(r, 1−ε, 1+ε))), r = exp(logp − logp_old).

    The ratio is computed in float32 at least (fp16 ratios overflow, docs/design.md §3).

    Returns:
        The loss and its diagnostics: approx_kl (½·mean((Δ logp)²)), clipfrac, ratio_mean and
        ratio_max_abs_dev (max |r − 1|).
    """
    delta = (log_prob.float() - old_log_prob.float())
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": 0.5 * (delta.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "ratio_mean": ratio.detach().mean(),
        "ratio_max_abs_dev": (ratio.detach() - 1.0).abs().max(),
    }
    return loss, stats
