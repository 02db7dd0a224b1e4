"""3D volumetric rewards (global structure): the volume realism critic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.finetune.reward import Reward
from rewards.slice2d import CRITICS_HOW_TO


class VolumeCriticReward(Reward):
    """3D volumetric realism (global structure): log p(real) of the whole volume.

    Args:
        checkpoint: a `RealismCriticModule` checkpoint.
        name: log key.
    """

    def __init__(self, checkpoint: str | None = None, name: str = "volume3d") -> None:
        super().__init__(name)
        from lightning_modules.critics.networks import RealismCriticModule

        self.critic = RealismCriticModule.load_for_reward(checkpoint, type(self).__name__, CRITICS_HOW_TO)

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(real): [B]."""
        return F.logsigmoid(self.critic.volume_logits(volumes.float()))
