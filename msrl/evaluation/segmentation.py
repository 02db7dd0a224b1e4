"""Segmentation utility: train a 3D segmenter on real / synthetic / real + synthetic pairs, test on held-out real.

The mask-conditioned counterpart of the classification utility (msrl/evaluation/utility.py): a
generator drawn from lesion masks is useful when a segmenter trained on its (volume, mask) pairs,
alone or added to the real ones, segments real volumes it has never seen. Masks carry BraTS's
labels (1 necrotic core, 2 oedema, 4 enhancing rim; datamodules/template.py, datamodules/brats.py),
one class each beside background 0. Each training set is trained with several seeds; a seed's
number is the mean Dice over the held-out volumes per label and for the whole tumour (every label
> 0), reported as mean, std and t-quantile 95 % interval over the seeds (`mean_t_ci`).

Dice of one volume is 2|P ∩ M| / (|P| + |M|). It is NaN where the region is absent from both the
prediction and the mask: nothing to find and nothing found says nothing about the segmenter, and
counting it as 1 would let lesion-free volumes inflate the mean. A region in only one of the two
gives 0 (a missed or a hallucinated lesion). Means over volumes leave the NaNs out.

The segmenter (`Segmenter`, MONAI's SegResNet) is trained here from scratch: no reward network's
weights enter it, so the evaluation does not measure what a reward was trained to see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.multiprocessing as multiprocessing
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import SegResNet
from torch import nn

from lightning_modules.critics.networks import random_flips
from msrl.evaluation.metrics import Estimate, mean_t_ci
from msrl.evaluation.scores import record

SEGMENTATION_LABELS = (1, 2, 4)  # BraTS: necrotic core, oedema, enhancing rim
WHOLE_TUMOUR = "whole_tumour"  # every label > 0
SEGMENTATION_METRIC = "segmentation/dice"
TRAIN_SETS = ("real", "synthetic", "real+synthetic")


@dataclass
class MaskedVolumes:
    """Volumes [N, C, S, S, S] in [-1, 1] with their masks [N, 1, S, S, S] of label codes (0 = background).

    Masks given as [N, S, S, S] gain the channel axis.
    """

    volumes: torch.Tensor
    masks: torch.Tensor

    def __post_init__(self) -> None:
        if self.masks.ndim == 4:
            self.masks = self.masks.unsqueeze(1)
        if self.volumes.ndim != 5 or tuple(self.masks.shape) != (len(self.volumes), 1, *self.volumes.shape[2:]):
            raise ValueError(f"need volumes [N, C, S, S, S] and masks [N, 1, S, S, S] of the same N and S, got "
                             f"{tuple(self.volumes.shape)} and {tuple(self.masks.shape)}")

    def __add__(self, other: MaskedVolumes) -> MaskedVolumes:
        return MaskedVolumes(torch.cat([self.volumes, other.volumes]), torch.cat([self.masks, other.masks]))


def class_indices(masks: torch.Tensor, labels: Sequence[int] = SEGMENTATION_LABELS) -> torch.Tensor:
    """Each voxel's class index (0 background, i + 1 for labels[i]); a value that is neither is refused."""
    values, counts = masks.unique(return_counts=True)
    allowed = {0, *labels}
    unknown = {v.item(): int(c) for v, c in zip(values, counts, strict=True) if v.item() not in allowed}
    if unknown:
        raise ValueError(f"mask values {unknown} (value: voxels) are neither background 0 nor one of the labels "
                         f"{list(labels)}")
    lookup = torch.zeros(max(allowed) + 1, dtype=torch.long)
    lookup[list(labels)] = torch.arange(1, len(labels) + 1)
    return lookup[masks.long()]


def dice_per_volume(predicted: torch.Tensor, masks: torch.Tensor,
                    labels: Sequence[int] = SEGMENTATION_LABELS) -> dict[str, torch.Tensor]:
    """Dice of every volume per label and for the whole tumour: {"1": [N], "2": [N], "4": [N], "whole_tumour": [N]}.

    Args:
        predicted: predicted label maps [N, 1, S, S, S] (label codes, 0 = background).
        masks: the true masks, the same shape and codes.
        labels: the labels scored one by one.

    Returns:
        NaN where the region is in neither the prediction nor the mask, 0 where it is in only one.
    """
    if predicted.shape != masks.shape:
        raise ValueError(f"predictions {tuple(predicted.shape)} and masks {tuple(masks.shape)} differ in shape")
    for maps in (predicted, masks):
        class_indices(maps, labels)  # refuses a code that is neither background nor a label
    p, m = predicted.flatten(1), masks.flatten(1)
    dice = {str(label): _dice(p == label, m == label) for label in labels}
    dice[WHOLE_TUMOUR] = _dice(p > 0, m > 0)
    return dice


def _dice(predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    overlap = (predicted & mask).sum(1).double()
    total = predicted.sum(1).double() + mask.sum(1).double()
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.nan)


class Segmenter(nn.Module):
    """MONAI's SegResNet on volumes average-pooled by `downsample`, its logits upsampled back to the input size.

    Args:
        in_channels: image channels.
        labels: the label codes it segments, one output class each after background.
        init_filters: SegResNet's first width, doubled at each scale; a multiple of 8 (group norm, 8 groups).
        blocks_down: residual blocks at each encoder scale (its length is the number of scales).
        downsample: average-pooling factor of the input (64³ → 32³ with 2): a lesion spans many
            voxels, and a CPU trains ~8× faster.
    """

    def __init__(self, in_channels: int, labels: Sequence[int] = SEGMENTATION_LABELS, init_filters: int = 8,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), downsample: int = 2) -> None:
        super().__init__()
        if init_filters < 8 or init_filters % 8:
            raise ValueError(f"init_filters must be a positive multiple of 8 (group norm), got {init_filters}")
        if downsample < 1 or not blocks_down:
            raise ValueError(f"need downsample >= 1 and at least one scale, got {downsample} and {list(blocks_down)}")
        self.labels, self.downsample = tuple(labels), downsample
        self.stride = downsample * 2 ** (len(blocks_down) - 1)  # the input side must be a multiple of it
        self.network = SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=in_channels,
                                 out_channels=len(self.labels) + 1, blocks_down=tuple(blocks_down),
                                 blocks_up=(1,) * (len(blocks_down) - 1), norm=("GROUP", {"num_groups": 8}))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Logits [N, len(labels) + 1, S, S, S] of volumes [N, C, S, S, S] in [-1, 1]."""
        size = tuple(volumes.shape[2:])
        if any(side % self.stride for side in size):
            raise ValueError(f"volume sides {size} must be multiples of {self.stride} (downsample × 2^(scales − 1))")
        if self.downsample == 1:
            return self.network(volumes)
        logits = self.network(F.avg_pool3d(volumes, self.downsample))
        return F.interpolate(logits, size=size, mode="trilinear", align_corners=False)


@torch.no_grad()
def predict_masks(network: nn.Module, volumes: torch.Tensor, labels: Sequence[int] = SEGMENTATION_LABELS,
                  batch_size: int = 4) -> torch.Tensor:
    """Predicted label maps [N, 1, S, S, S] (label codes) of volumes [N, C, S, S, S]: the arg-max class per voxel."""
    network.eval()
    codes = torch.tensor([0, *labels])
    return torch.cat([codes[network(chunk.float()).argmax(1, keepdim=True).cpu()]
                      for chunk in volumes.split(batch_size)])


@dataclass
class SegmentationProtocol:
    """How each segmenter is trained: `Segmenter`, MONAI's DiceCELoss, AdamW with a one-cycle schedule, random flips.

    Args:
        init_filters: the segmenter's first width.
        blocks_down: residual blocks per encoder scale.
        downsample: average-pooling factor of the volumes before the segmenter.
        steps: optimiser steps, whatever the training set's size (batches cycle through shuffled passes).
        batch_size: volumes per step.
        lr: AdamW peak learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        seeds: one segmenter per seed and training set.
        labels: the label codes segmented, one class each.
        workers: processes that train the seeds' segmenters side by side, each with an equal share of
            torch's threads (on CPUs small 3D convolutions use one thread far better than two; results
            equal one process's up to float rounding).
    """

    init_filters: int = 8
    blocks_down: Sequence[int] = (1, 2, 2, 4)
    downsample: int = 2
    steps: int = 300
    batch_size: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seeds: Sequence[int] = (0, 1, 2)
    labels: Sequence[int] = SEGMENTATION_LABELS
    workers: int = 1

    def __post_init__(self) -> None:
        for key in ("downsample", "steps", "batch_size", "workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"segmentation.{key} must be >= 1, got {getattr(self, key)}")
        if len(self.seeds) == 0:
            raise ValueError("segmentation.seeds must name at least one seed")
        if len(self.labels) == 0 or 0 in self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"segmentation.labels must be distinct non-zero codes, got {list(self.labels)}")

    def train(self, data: MaskedVolumes, seed: int) -> Segmenter:
        """A segmenter trained on `data` from a seeded initialisation, batch order and flips."""
        if len(data.volumes) == 0:
            raise ValueError("a segmentation training set needs at least one volume, got none")
        targets = class_indices(data.masks, self.labels).float()
        torch.manual_seed(seed)  # the initialisation
        network = Segmenter(data.volumes.shape[1], self.labels, self.init_filters, self.blocks_down, self.downsample)
        # batch=True: Dice over the whole batch, so a label missing from one volume leaves no 0/0 term
        loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        optimiser = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=self.lr, total_steps=self.steps)
        generator = torch.Generator().manual_seed(seed)
        order = torch.empty(0, dtype=torch.long)
        network.train()
        for _ in range(self.steps):
            while len(order) < self.batch_size:
                order = torch.cat([order, torch.randperm(len(targets), generator=generator)])
            index, order = order[: self.batch_size], order[self.batch_size :]
            pair = random_flips(torch.cat([data.volumes[index].float(), targets[index]], dim=1), generator)
            loss = loss_function(network(pair[:, :-1]), pair[:, -1:].long())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        return network.eval()

    def dice(self, network: nn.Module, data: MaskedVolumes) -> dict[str, torch.Tensor]:
        """Dice per volume of `network`'s predictions on `data` per region (`dice_per_volume`)."""
        predicted = predict_masks(network, data.volumes, self.labels, self.batch_size)
        return dice_per_volume(predicted, data.masks, self.labels)

    def test(self, network: nn.Module, test: MaskedVolumes) -> dict[str, float]:
        """Mean Dice over the held-out volumes per region, NaNs left out (NaN if every volume's is NaN)."""
        return {region: _nanmean(values) for region, values in self.dice(network, test).items()}

    def segmenters(self, train: MaskedVolumes | Sequence[MaskedVolumes]) -> list[Segmenter]:
        """One trained segmenter per seed, in the order of `seeds`.

        Args:
            train: one training set for every seed, or one per seed (the i-th is trained with
                seeds[i]): independent synthetic draws, so the spread covers draws and seeds.
        """
        sets = [train] * len(self.seeds) if isinstance(train, MaskedVolumes) else list(train)
        if len(sets) != len(self.seeds):
            raise ValueError(f"got {len(sets)} training sets for {len(self.seeds)} seeds {list(self.seeds)}: "
                             "pass one set, or one per seed")
        jobs = list(zip(sets, self.seeds, strict=True))
        workers = min(self.workers, len(jobs))
        if workers == 1:
            return [self.train(data, seed) for data, seed in jobs]
        single = replace(self, workers=1)
        threads = max(1, torch.get_num_threads() // workers)
        with multiprocessing.get_context("spawn").Pool(workers, initializer=torch.set_num_threads,
                                                       initargs=(threads,)) as pool:
            return pool.starmap(single.train, jobs)

    def runs(self, train: MaskedVolumes | Sequence[MaskedVolumes], test: MaskedVolumes) -> list[dict[str, float]]:
        """Mean Dice per region (`test`) of one segmenter per seed (`segmenters`) on held-out `test`."""
        return [self.test(network, test) for network in self.segmenters(train)]

    def evaluate(self, train_sets: Mapping[str, MaskedVolumes | Sequence[MaskedVolumes]],
                 test: MaskedVolumes) -> dict[str, dict[str, Estimate]]:
        """Per training set (e.g. `utility_train_sets`) and region: mean, std and t-interval over the seeds."""
        return {name: summarise(self.runs(train, test)) for name, train in train_sets.items()}


def utility_train_sets(real: MaskedVolumes, synthetic: MaskedVolumes | Sequence[MaskedVolumes]
                       ) -> dict[str, MaskedVolumes | Sequence[MaskedVolumes]]:
    """The three training sets of `TRAIN_SETS`; real + synthetic adds the real pairs to each synthetic draw."""
    both = real + synthetic if isinstance(synthetic, MaskedVolumes) else [real + draw for draw in synthetic]
    return dict(zip(TRAIN_SETS, (real, synthetic, both), strict=True))


def summarise(runs: Sequence[Mapping[str, float]]) -> dict[str, Estimate]:
    """Mean, std and t-quantile 95 % interval over the runs (seeds) of each region's mean Dice."""
    if not runs:
        raise ValueError("no segmentation runs to summarise: the protocol needs at least one seed")
    return {region: mean_t_ci([run[region] for run in runs]) for region in runs[0]}


def segmentation_records(runs: Sequence[Mapping[str, float]], train_set: str, seeds: Sequence[int], num_test: int,
                         num_train: int) -> list[dict[str, Any]]:
    """`segmentation/dice` per region (`label`): mean and t-interval over seeds, and each seed's value.

    Args:
        runs: each seed's mean Dice per region on the held-out real volumes (`SegmentationProtocol.runs`).
        train_set: "real", "synthetic" or "real+synthetic".
        seeds: the segmenters' seeds (recorded; a comparison pairs seed s with seed s).
        num_test: held-out real volumes (recorded as num_real, as utility does).
        num_train: training pairs per seed (recorded as num_generated).
    """
    return [record(SEGMENTATION_METRIC, estimate, extractor=None, view="3d", train_set=train_set, label=region,
                   **{"class": "all"}, num_real=num_test, num_generated=num_train, seeds=list(seeds),
                   per_seed=[float(run[region]) for run in runs])
            for region, estimate in summarise(runs).items()]


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if len(finite) else float("nan")
