"""Downstream utility: train a 3D classifier on real / synthetic / real + synthetic, test on held-out real.

The paper's second claim (docs/design.md §5): synthetic volumes are useful when a classifier trained
on them (alone, or added to the real ones) does well on real volumes it has never seen. Each
training set is trained with several seeds and reported as mean ± std of accuracy, balanced
accuracy and AUROC (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

from lightning_modules.critics.networks import PooledConvNet, random_flips
from msrl.evaluation.metrics import Estimate, mean_std_ci

UTILITY_METRICS = ("accuracy", "balanced_accuracy", "auroc")


@dataclass
class LabelledVolumes:
    """Volumes [N, C, S, S, S] in [-1, 1] with class labels [N]."""

    volumes: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.volumes) != len(self.labels):
            raise ValueError(f"{len(self.volumes)} volumes but {len(self.labels)} labels")

    def __add__(self, other: LabelledVolumes) -> LabelledVolumes:
        return LabelledVolumes(torch.cat([self.volumes, other.volumes]), torch.cat([self.labels, other.labels]))


@dataclass
class UtilityProtocol:
    """How each classifier is trained: the `ClassifierModule` network, AdamW, random flips.

    Args:
        channels: channels of the classifier's strided conv blocks.
        epochs: passes over the training set.
        batch_size: volumes per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seeds: one classifier per seed and training set.
    """

    channels: Sequence[int] = (16, 32, 64)
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seeds: Sequence[int] = (0, 1, 2)

    def train(self, data: LabelledVolumes, num_classes: int, seed: int) -> PooledConvNet:
        """A classifier trained on `data` from a seeded initialisation and shuffle."""
        torch.manual_seed(seed)
        network = PooledConvNet(3, data.volumes.shape[1], num_classes, self.channels)
        optimiser = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        network.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(data.labels), generator=generator)
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                loss = F.cross_entropy(network(random_flips(data.volumes[index])), data.labels[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        return network.eval()

    @torch.no_grad()
    def test(self, network: PooledConvNet, test: LabelledVolumes, num_classes: int) -> dict[str, float]:
        """Accuracy, balanced accuracy (macro recall) and AUROC on the held-out real volumes."""
        logits = torch.cat([network(test.volumes[i : i + self.batch_size])
                            for i in range(0, len(test.labels), self.batch_size)])
        return {
            "accuracy": float(multiclass_accuracy(logits, test.labels, num_classes, average="micro")),
            "balanced_accuracy": float(multiclass_accuracy(logits, test.labels, num_classes, average="macro")),
            "auroc": float(multiclass_auroc(logits, test.labels, num_classes)),
        }

    def evaluate(self, train: LabelledVolumes, test: LabelledVolumes, num_classes: int) -> dict[str, Estimate]:
        """Every metric as mean ± std over the seeds, for one training set."""
        if len(set(train.labels.tolist())) < 2:
            raise ValueError(f"a utility training set needs at least two classes, got labels "
                             f"{sorted(set(train.labels.tolist()))}")
        runs = [self.test(self.train(train, num_classes, seed), test, num_classes) for seed in self.seeds]
        return {name: mean_std_ci([run[name] for run in runs]) for name in UTILITY_METRICS}

