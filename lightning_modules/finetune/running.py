"""Running mean and variance of several groups (reward components, classes), kept in buffers."""

from __future__ import annotations

import torch
from torch import nn


class RunningMoments(nn.Module):
    """Exponential moving mean/variance per group; the first batch of a group sets its values.

    Buffers are saved in checkpoints, so a resumed run continues with the same statistics.

    Args:
        groups: number of independent groups.
        momentum: weight of the newest batch.
    """

    def __init__(self, groups: int, momentum: float) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(groups, dtype=torch.float64))
        self.register_buffer("var", torch.ones(groups, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(groups, dtype=torch.long))

    @torch.no_grad()
    def update(self, group: int, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> None:
        """Fold one batch's mean and (population) variance of `group` into the running values."""
        if self.count[group] == 0:
            self.mean[group], self.var[group] = batch_mean, batch_var
        else:
            delta = batch_mean - self.mean[group]
            self.mean[group] += self.momentum * delta
            self.var[group] = (1 - self.momentum) * (self.var[group] + self.momentum * delta**2) \
                + self.momentum * batch_var
        self.count[group] += 1
