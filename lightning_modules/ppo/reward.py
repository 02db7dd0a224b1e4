"""The reward contract (docs/design.md §4).

A reward is a `torch.nn.Module` mapping volumes `[B, C, D, H, W]` in [-1, 1] and class labels
`[B]` (or None) to one finite score per volume `[B]`, higher is better. PPO calls it under
`no_grad`, on whatever device and dtype the volumes have. Any module with that `forward` plugs in
through YAML `class_path`; subclassing `Reward` only adds a `name` and per-component scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Reward(nn.Module, ABC):
    """Base class of msrl's rewards.

    Args:
        name: the key of this reward in logs (`ppo/reward/<name>`).
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    @abstractmethod
    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [B] for volumes [B, C, D, H, W] in [-1, 1] and labels [B] (or None)."""

    def score(self, volumes: torch.Tensor, labels: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward [B] and its components ({name: [B]}; a plain reward is its own component)."""
        total = self(volumes, labels)
        return total, {self.name: total}


def score_components(reward: nn.Module, volumes: torch.Tensor, labels: torch.Tensor | None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Call any reward module and check what it returns: finite float [B], named components.

    Modules that are not `Reward`s (a user's own `nn.Module`) are named after their class.
    """
    if hasattr(reward, "score"):
        total, components = reward.score(volumes, labels)
    else:
        total = reward(volumes, labels)
        components = {getattr(reward, "name", type(reward).__name__): total}
    name = getattr(reward, "name", type(reward).__name__)
    if not torch.is_tensor(total) or total.shape != (volumes.shape[0],):
        shape = tuple(total.shape) if torch.is_tensor(total) else type(total).__name__
        raise ValueError(f"reward {name} returned {shape}, expected a tensor of shape ({volumes.shape[0]},)")
    for key, value in {name: total, **components}.items():
        if not torch.isfinite(value).all():
            samples = torch.nonzero(~torch.isfinite(value)).flatten().tolist()
            raise FloatingPointError(f"reward component {key} returned non-finite values for samples {samples} "
                                     f"of this batch: {value.tolist()}")
    return total.float(), {key: value.float() for key, value in components.items()}
