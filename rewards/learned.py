"""Rewards from networks msrl trains itself (`msrl train-reward`): realism critics and the classifier.

The networks load from checkpoints with weights_only=True; a reward without a checkpoint fails
when it is configured, saying which command trains one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rewards.base import Reward
from rewards.slices import Aggregate, SliceSampler, aggregate, flatten_slices

CRITICS_HOW_TO = "`msrl train-reward -c configs/rewards/critics.yaml` (its checkpoints/last.ckpt)"
CLASSIFIER_HOW_TO = "`msrl train-reward -c configs/rewards/classifier.yaml` (its checkpoints/last.ckpt)"


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


class VolumeCriticReward(Reward):
    """3D volumetric realism (global structure): log p(real) of the whole volume.

    Args:
        checkpoint: a `RealismCriticModule` checkpoint.
        name: log key.
    """

    def __init__(self, checkpoint: str | None = None, name: str = "volume3d") -> None:
        super().__init__(name)
        from lightning_modules.critics import RealismCriticModule

        self.critic = RealismCriticModule.load_for_reward(checkpoint, type(self).__name__, CRITICS_HOW_TO)

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(real): [B]."""
        return F.logsigmoid(self.critic.volume_logits(volumes.float()))


class ClassifierReward(Reward):
    """Clinical relevance: log-probability the downstream classifier gives to the conditioned class.

    Args:
        checkpoint: a `ClassifierModule` checkpoint.
        name: log key.
    """

    def __init__(self, checkpoint: str | None = None, name: str = "classifier") -> None:
        super().__init__(name)
        from lightning_modules.critics import ClassifierModule

        self.classifier = ClassifierModule.load_for_reward(checkpoint, type(self).__name__, CLASSIFIER_HOW_TO)

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(label | volume): [B]; needs the labels the volumes were conditioned on."""
        if labels is None:
            raise ValueError("ClassifierReward needs the class labels of the volumes (a class-conditional model)")
        log_probs = F.log_softmax(self.classifier(volumes.float()), dim=1)
        return log_probs.gather(1, labels.long().view(-1, 1)).squeeze(1)
