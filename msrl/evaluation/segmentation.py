"""Segmentation utility: train a 3D segmenter on real / synthetic / real + synthetic pairs, test on held-out real.

The mask-conditioned counterpart of the classification utility (msrl/evaluation/utility.py): a
generator drawn from lesion masks is useful when a segmenter trained on its (volume, mask) pairs,
alone or added to the real ones, segments real volumes it has never seen. Masks carry BraTS's
labels (1 necrotic core, 2 oedema, 4 enhancing rim; datamodules/template.py, datamodules/brats.py),
one class each beside background 0. Each training set is trained with several seeds; a seed's
number is the mean Dice over the held-out volumes per label and for the whole tumour (every label
> 0), reported as mean, std and t-quantile 95 % interval over the seeds (`mean_t_ci`).

The segmenter (msrl/evaluation/segmenter.py, where Dice is defined) is trained here from scratch: no reward network's
weights enter it, so the evaluation does not measure what a reward was trained to see.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.multiprocessing as multiprocessing
from monai.losses import DiceCELoss
from torch import nn

from lightning_modules.critics.networks import random_flips
from msrl.evaluation.metrics import Estimate, mean_t_ci
from msrl.evaluation.scores import record
from msrl.evaluation.segmenter import (
    NORMS,
    SEGMENTATION_LABELS,
    MaskedVolumes,
    Segmenter,
    class_indices,
    dice_per_volume,
    predict_masks,
)

SEGMENTATION_METRIC = "segmentation/dice"
TRAIN_SETS = ("real", "synthetic", "real+synthetic")


@dataclass
class SegmentationProtocol:
    """How each segmenter is trained: `Segmenter`, MONAI's DiceCELoss, AdamW with a one-cycle schedule, random flips.

    Args:
        init_filters: the segmenter's first width.
        blocks_down: residual blocks per encoder scale.
        downsample: average-pooling factor of the volumes before the segmenter.
        norm: the segmenter's normalisation, "batch" or "group" (`Segmenter`).
        steps: optimiser steps, whatever the training set's size (batches cycle through shuffled passes).
        batch_size: volumes per step.
        lr: AdamW peak learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        seeds: one segmenter per seed and training set.
        labels: the label codes segmented, one class each.
        lesions_per_batch: volumes with a lesion in every batch (the rest have none; all of a batch
            when the set has only one kind): a batch without a lesion gives the Dice of every label a
            0/… term that pushes the label out.
        crop: train on random crops of this side (`lesion_crops`), None for whole volumes. A multiple of the
            segmenter's stride (downsample × 2^(scales − 1)) and no larger than the volumes. The segmenter is
            convolutional and is tested on whole volumes either way; a crop's step costs a fraction of a
            whole volume's.
        crop_lesion_share: the share of crops of volumes with a lesion that are centred on one of its voxels;
            the others, and every crop of a volume without one, lie anywhere. Crops off the lesion show more
            of the brain, where a segmenter that never sees it may draw lesions, and fewer lesions.
        workers: processes that train the seeds' segmenters side by side, each with an equal share of
            torch's threads (on CPUs small 3D convolutions use one thread far better than two; results
            equal one process's up to float rounding).
    """

    init_filters: int = 16
    blocks_down: Sequence[int] = (1, 2, 2)
    downsample: int = 2
    norm: str = "batch"
    steps: int = 300
    batch_size: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seeds: Sequence[int] = (0, 1, 2)
    labels: Sequence[int] = SEGMENTATION_LABELS
    lesions_per_batch: int = 2
    crop: int | None = None
    crop_lesion_share: float = 1.0
    workers: int = 1

    def __post_init__(self) -> None:
        for key in ("downsample", "steps", "batch_size", "lesions_per_batch", "workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"segmentation.{key} must be >= 1, got {getattr(self, key)}")
        if len(self.seeds) == 0:
            raise ValueError("segmentation.seeds must name at least one seed")
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"segmentation.crop must be >= 1 or null (whole volumes), got {self.crop}")
        if not 0 <= self.crop_lesion_share <= 1:
            raise ValueError(f"segmentation.crop_lesion_share must be in [0, 1], got {self.crop_lesion_share}")
        if self.norm not in NORMS:
            raise ValueError(f"segmentation.norm must be one of {sorted(NORMS)}, got {self.norm!r}")
        if len(self.labels) == 0 or 0 in self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"segmentation.labels must be distinct non-zero codes, got {list(self.labels)}")

    def train(self, data: MaskedVolumes, seed: int) -> Segmenter:
        """A segmenter trained on `data` from a seeded initialisation, batch order and flips."""
        if len(data.volumes) == 0:
            raise ValueError("a segmentation training set needs at least one volume, got none")
        targets = class_indices(data.masks, self.labels).float()
        torch.manual_seed(seed)  # the initialisation
        network = Segmenter(data.volumes.shape[1], self.labels, self.init_filters, self.blocks_down, self.downsample,
                            self.norm)
        sides = tuple(data.volumes.shape[2:])
        if self.crop is not None and (self.crop % network.stride or self.crop > min(sides)):
            raise ValueError(f"segmentation.crop must be a multiple of the segmenter's stride {network.stride} "
                             f"(downsample × 2^(scales − 1)) and at most the volume sides {sides}, got {self.crop}")
        lesion_voxels = [torch.nonzero(mask[0] > 0) for mask in data.masks] if self.crop is not None else []
        # batch=True: Dice over the whole batch, so a label missing from one volume leaves no 0/0 term
        loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        optimiser = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=self.lr, total_steps=self.steps)
        generator = torch.Generator().manual_seed(seed)
        lesion = (data.masks.flatten(1) > 0).any(1)
        network.train()
        for index in batch_indices(lesion, self.steps, self.batch_size, self.lesions_per_batch, generator):
            pair = torch.cat([data.volumes[index].float(), targets[index]], dim=1)
            if self.crop is not None:
                pair = lesion_crops(pair, [lesion_voxels[i] for i in index.tolist()], self.crop,
                                    self.crop_lesion_share, generator)
            pair = random_flips(pair, generator)
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


def batch_indices(lesion: torch.Tensor, steps: int, batch_size: int, lesions_per_batch: int,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches of volume indices, each with `lesions_per_batch` of the volumes whose `lesion` is True.

    The two kinds are drawn from their own shuffled passes; a set of one kind fills every batch with it.
    """
    pools = [torch.nonzero(lesion).flatten(), torch.nonzero(~lesion).flatten()]
    orders = [torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)]
    with_lesion = min(lesions_per_batch, batch_size) if len(pools[1]) else batch_size
    counts = (with_lesion, batch_size - with_lesion) if len(pools[0]) else (0, batch_size)
    for _ in range(steps):
        taken = []
        for kind, count in enumerate(counts):
            while len(orders[kind]) < count:
                orders[kind] = torch.cat([orders[kind], pools[kind][torch.randperm(len(pools[kind]),
                                                                                 generator=generator)]])
            taken.append(orders[kind][:count])
            orders[kind] = orders[kind][count:]
        yield torch.cat(taken)


def lesion_crops(volumes: torch.Tensor, lesion_voxels: Sequence[torch.Tensor], size: int, lesion_share: float,
                 generator: torch.Generator) -> torch.Tensor:
    """One random crop [C, size, size, size] of each volume [N, C, S, S, S], stacked.

    With probability `lesion_share` a crop is centred on a random voxel of its volume's lesion
    (`lesion_voxels[i]`, [K, 3] indices; shifted inwards at the border); otherwise, and always where
    K is 0, it lies anywhere in the volume, with every position equally likely.
    """
    sides = torch.tensor(volumes.shape[2:])
    if len(lesion_voxels) != len(volumes) or size > int(sides.min()):
        raise ValueError(f"need one lesion-voxel list per volume and a crop of at most {sides.tolist()}, got "
                         f"{len(lesion_voxels)} lists for {len(volumes)} volumes and crop {size}")
    crops = []
    for volume, voxels in zip(volumes, lesion_voxels, strict=True):
        if len(voxels) and torch.rand(1, generator=generator).item() < lesion_share:
            centre = voxels[torch.randint(len(voxels), (1,), generator=generator)].squeeze(0)
            start = (centre - size // 2).clamp(min=0).minimum(sides - size)
        else:
            start = (torch.rand(3, generator=generator) * (sides - size + 1)).long()
        x, y, z = start.tolist()
        crops.append(volume[:, x:x + size, y:y + size, z:z + size])
    return torch.stack(crops)


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
