"""Clinical relevance: how clearly a volume shows the class it was conditioned on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.finetune.reward import Reward

CLASSIFIER_HOW_TO = "`msrl train-reward -c configs/rewards/classifier.yaml` (its checkpoints/last.ckpt)"


class ClassifierReward(Reward):
    """Clinical relevance: log-probability the downstream classifier gives to the conditioned class.

    Args:
        checkpoint: a `ClassifierModule` checkpoint.
        name: log key.
    """

    def __init__(self, checkpoint: str | None = None, name: str = "classifier") -> None:
        super().__init__(name)
        from lightning_modules.critics.networks import ClassifierModule

        self.classifier = ClassifierModule.load_for_reward(checkpoint, type(self).__name__, CLASSIFIER_HOW_TO)

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(label | volume): [B]; needs the labels the volumes were conditioned on."""
        if labels is None:
            raise ValueError("ClassifierReward needs the class labels of the volumes (a class-conditional model)")
        log_probs = F.log_softmax(self.classifier(volumes.float()), dim=1)
        return log_probs.gather(1, labels.long().view(-1, 1)).squeeze(1)
