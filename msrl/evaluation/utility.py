"""Downstream utility: train a 3D classifier on real / synthetic / real + synthetic, test on held-out real.

The paper's second claim (docs/design.md §5): synthetic volumes are useful when a classifier trained
on them (alone, or added to the real ones) does well on real volumes it has never seen. Each
training set is trained with several seeds (and, for synthetic data, optionally one independent
draw per seed) and reported as mean, std and a t-quantile 95 % interval over the seeds of accuracy,
balanced accuracy and AUROC (torchmetrics); `runs` keeps the per-seed values, and each test volume's
predicted class per seed, for paired comparisons.

The classifier (`UtilityNet`) shares nothing with the reward classifier (`PooledConvNet` in
lightning_modules/critics/networks.py): other blocks (MONAI residual units), other normalisation
(batch norm), other pooling (global average), and its own training here. An evaluation whose
classifier is the reward's network would measure distillation, not usefulness (docs/design.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc

from lightning_modules.critics.networks import random_flips
from msrl.evaluation.metrics import Estimate, mean_t_ci

UTILITY_METRICS = ("accuracy", "balanced_accuracy", "auroc")
PREDICTION_METRICS = ("accuracy", "balanced_accuracy")  # computable from each test volume's predicted class


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


class UtilityNet(nn.Module):
    """Average-pool by `downsample`, a stem convolution, stride-2 MONAI residual units, global max pool.

    Args:
        in_channels: image channels.
        num_classes: logits per volume.
        channels: output channels of the stem (first) and of each residual unit (the rest).
        downsample: the input is average-pooled by this factor first (64³ → 32³ with 2): a lesion
            spans many voxels, and a CPU trains ~8× faster.
        dropout: dropout before the linear head.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (8, 16, 32, 64),
                 downsample: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels needs a stem width and at least one unit width, got {list(channels)}")
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.downsample = downsample
        layers: list[nn.Module] = [Convolution(3, in_channels, channels[0], strides=2, kernel_size=3, act="PRELU",
                                               norm="BATCH")]
        for previous, width in zip(channels[:-1], channels[1:], strict=True):
            layers.append(ResidualUnit(3, previous, width, strides=2, kernel_size=3, subunits=2, act="PRELU",
                                       norm="BATCH"))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels[-1], num_classes))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for volumes [N, C, S, S, S]."""
        if self.downsample > 1:
            volumes = F.avg_pool3d(volumes, self.downsample)
        return self.head(self.features(volumes).amax(dim=(2, 3, 4)))


@dataclass
class UtilityProtocol:
    """How each utility classifier is trained: `UtilityNet`, AdamW with a one-cycle schedule, random flips and shifts.

    After training, the batch-norm statistics are refitted on the training volumes (see `_refit_batch_norm`).

    Args:
        channels: widths of the classifier's stem and residual units.
        downsample: average-pooling factor applied to the volumes before the classifier.
        epochs: passes over the training set.
        batch_size: volumes per step.
        lr: AdamW peak learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        max_shift: random circular shift (voxels of the downsampled volume) along each axis, per volume.
        seeds: one classifier per seed and training set.
    """

    channels: Sequence[int] = (16, 32)  # shallow: a local detector under the global max learns from tens of volumes
    downsample: int = 2
    epochs: int = 40
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 2
    seeds: Sequence[int] = (0, 1, 2)

    def __post_init__(self) -> None:
        for key in ("downsample", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"utility.{key} must be >= 1, got {getattr(self, key)}")
        if len(self.seeds) == 0:
            raise ValueError("utility.seeds must name at least one seed")

    def train(self, data: LabelledVolumes, num_classes: int, seed: int) -> UtilityNet:
        """A classifier trained on `data` from a seeded initialisation, shuffle and augmentation."""
        _check_training_set(data)
        torch.manual_seed(seed)
        network = UtilityNet(data.volumes.shape[1], num_classes, self.channels, downsample=1)
        volumes = F.avg_pool3d(data.volumes.float(), self.downsample) if self.downsample > 1 else data.volumes
        optimiser = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * math.ceil(len(data.labels) / self.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=self.lr, total_steps=max(steps, 1))
        generator = torch.Generator().manual_seed(seed)
        network.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(data.labels), generator=generator)
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                if len(index) < 2:  # batch norm needs two volumes
                    continue
                batch = _random_shifts(random_flips(volumes[index]), self.max_shift, generator)
                loss = F.cross_entropy(network(batch), data.labels[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        _refit_batch_norm(network, volumes, self.batch_size)
        network.downsample = self.downsample  # it was trained on pooled volumes: it now takes full-size ones
        return network.eval()

    @torch.no_grad()
    def test(self, network: nn.Module, test: LabelledVolumes, num_classes: int) -> dict[str, Any]:
        """Accuracy, balanced accuracy (macro recall) and AUROC on the held-out real volumes, and each one's prediction.

        `predicted` is the predicted class of every test volume in the test split's order: a
        comparison of two sources resamples the test volumes (`paired_test_volumes`), which the three
        summary numbers alone cannot.
        """
        logits = torch.cat([network(test.volumes[i : i + self.batch_size].float())
                            for i in range(0, len(test.labels), self.batch_size)])
        return {
            "accuracy": float(multiclass_accuracy(logits, test.labels, num_classes, average="micro")),
            "balanced_accuracy": float(multiclass_accuracy(logits, test.labels, num_classes, average="macro")),
            "auroc": float(multiclass_auroc(logits, test.labels, num_classes)),
            "predicted": logits.argmax(1).tolist(),
        }

    def classifiers(self, train: LabelledVolumes | Sequence[LabelledVolumes], num_classes: int) -> list[UtilityNet]:
        """One trained classifier per seed, in the order of `seeds`.

        Args:
            train: one training set for every seed, or one per seed (the i-th is trained with
                seeds[i]): independent synthetic draws, so the spread covers draws and seeds.
            num_classes: classes of the data set.
        """
        sets = [train] * len(self.seeds) if isinstance(train, LabelledVolumes) else list(train)
        if len(sets) != len(self.seeds):
            raise ValueError(f"got {len(sets)} training sets for {len(self.seeds)} seeds {list(self.seeds)}: "
                             "pass one set, or one per seed")
        return [self.train(data, num_classes, seed) for data, seed in zip(sets, self.seeds, strict=True)]

    def runs(self, train: LabelledVolumes | Sequence[LabelledVolumes], test: LabelledVolumes,
             num_classes: int) -> list[dict[str, Any]]:
        """The metrics and predictions (see `test`) of one classifier per seed (`classifiers`) on held-out `test`."""
        return [self.test(network, test, num_classes) for network in self.classifiers(train, num_classes)]

    def evaluate(self, train: LabelledVolumes | Sequence[LabelledVolumes], test: LabelledVolumes,
                 num_classes: int) -> dict[str, Estimate]:
        """Every metric as mean, std and t-quantile 95 % interval over the seeds (see `runs`)."""
        return summarise(self.runs(train, test, num_classes))


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Estimate]:
    """Mean, std and t-quantile 95 % interval over the runs of each utility metric."""
    if not runs:
        raise ValueError("no utility runs to summarise: the protocol needs at least one seed")
    return {name: mean_t_ci([run[name] for run in runs]) for name in UTILITY_METRICS}


@torch.no_grad()
def _refit_batch_norm(network: nn.Module, volumes: torch.Tensor, batch_size: int) -> None:
    """Batch-norm statistics as the average over batches of the training volumes (as SWA's `update_bn`).

    With tens of volumes a classifier takes only tens of steps, too few for the running averages
    (momentum 0.1) to forget their initial values: its eval-mode logits would be shifted to one class.
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    network.train()
    for start in range(0, len(volumes), batch_size):
        network(volumes[start : start + batch_size])


def _random_shifts(volumes: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Roll each volume by up to ±`max_shift` voxels along each spatial axis (background wraps around)."""
    if max_shift <= 0:
        return volumes
    shifts = torch.randint(-max_shift, max_shift + 1, (len(volumes), volumes.ndim - 2), generator=generator)
    return torch.stack([volume.roll(tuple(shift.tolist()), dims=tuple(range(1, volume.ndim)))
                        for volume, shift in zip(volumes, shifts, strict=True)])


def _check_training_set(data: LabelledVolumes) -> None:
    classes = sorted(set(data.labels.tolist()))
    if len(classes) < 2:
        raise ValueError(f"a utility training set needs at least two classes, got labels {classes}")
    if len(data.labels) < 2:
        raise ValueError(f"a utility training set needs at least two volumes, got {len(data.labels)}")
