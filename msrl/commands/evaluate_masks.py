"""The masks of `msrl evaluate`: which held-out mask each drawn volume gets, segmentation utility, mask fidelity.

Segmentation runs when a ControlNet checkpoint is evaluated on data that serves lesion masks (`seg`),
unless `--skip-segmentation true`; `--skip-segmentation false` asks for it with plain checkpoints
alone (their "no mask conditioning" rows). The segmenters (msrl/evaluation/segmentation.py) train
on the real training split's pairs, one per seed, and are tested on the held-out split (the
utility's: `--real-split` when val or test, else test); the same real-trained segmenters then judge
every set of volumes that carries masks (msrl/evaluation/mask_fidelity.py), the held-out real volumes
with their own masks first (the ceiling).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from datamodules.base import VolumeDataModule
from msrl.commands.evaluate_sources import Heldout, Sampler, SourceVolumes, assign_masks, real_masks, real_volumes
from msrl.evaluation.mask_fidelity import mask_fidelity_records
from msrl.evaluation.segmentation import SegmentationProtocol, segmentation_records
from msrl.evaluation.segmenter import MaskedVolumes, Segmenter
from msrl.evaluation.utility import LabelledVolumes

log = logging.getLogger(__name__)


def segmentation_wanted(skip: bool | None, controlnets: bool, serves_masks: bool) -> bool:
    """Whether segmentation runs: `--skip-segmentation` when given, else exactly when a ControlNet meets masks."""
    if skip is False and not serves_masks:
        raise ValueError("--skip-segmentation false: segmentation needs lesion masks, and the data serves none "
                         "(no 'seg' key); data sets with masks: the template cohort, BraTS")
    return (not skip) if skip is not None else (controlnets and serves_masks)


def build_heldout(data: VolumeDataModule, split: str, heldout: LabelledVolumes, num_samples: int,
                  pair_draws: int) -> Heldout:
    """The masks checkpoints draw from: volume i of every checkpoint gets held-out mask `assign_masks` picks.

    Args:
        data: the real data (its `seg`).
        split: the held-out split ("val" or "test").
        heldout: that split's volumes and classes.
        num_samples: volumes drawn per checkpoint (labels alternate over the classes, as without masks).
        pair_draws: independent draws a ControlNet makes from the training masks.
    """
    masks, train_masks = real_masks(data, split), real_masks(data, "train")
    if masks is None or train_masks is None:
        raise ValueError(f"a ControlNet checkpoint draws from lesion masks, and {type(data).__name__} serves none "
                         "(no 'seg' key): evaluate it on data with masks (the template cohort, BraTS)")
    labels = torch.arange(num_samples) % max(data.num_classes, 1) if data.num_classes else None
    train = real_volumes(data, "train")
    return Heldout(masks, assign_masks(labels, heldout.labels, num_samples), MaskedVolumes(train.volumes, train_masks),
                   train.labels, pair_draws)


class SegmentationJudge:
    """The real-trained segmenters (one per seed) and every segmentation record they produce.

    Args:
        protocol: how each segmenter is trained (`--segmentation`).
        heldout: the masks (`build_heldout`) and the training pairs.
        test: the held-out real volumes (the masks' split, in the same order).
        batch_size: volumes per forward pass.
        seed: seed of the bootstrap over volumes.
    """

    def __init__(self, protocol: SegmentationProtocol, heldout: Heldout, test: LabelledVolumes, batch_size: int,
                 seed: int) -> None:
        self.protocol, self.heldout, self.batch_size, self.seed = protocol, heldout, batch_size, seed
        self.test = MaskedVolumes(test.volumes, heldout.masks)
        self.segmenters: list[Segmenter] = []

    def real_records(self) -> list[dict[str, Any]]:
        """Segmentation utility trained on real pairs, and mask fidelity of the held-out real volumes (the ceiling)."""
        print(f"msrl evaluate: training {len(self.protocol.seeds)} segmenters on "
              f"{len(self.heldout.train.volumes)} real pairs", flush=True)
        self.segmenters = self.protocol.segmenters(self.heldout.train)
        runs = [self.protocol.test(network, self.test) for network in self.segmenters]
        rows = segmentation_records(runs, "real", self.protocol.seeds, len(self.test.volumes),
                                    len(self.heldout.train.volumes))
        return rows + self.fidelity(self.test)

    def utility_records(self, pairs: list[MaskedVolumes]) -> list[dict[str, Any]]:
        """Segmentation utility of synthetic pairs (one draw per seed, cycled) and of real + synthetic."""
        sets = [pairs[i % len(pairs)] for i in range(len(self.protocol.seeds))]
        rows = []
        for train_set, train in (("synthetic", sets), ("real+synthetic", [self.heldout.train + s for s in sets])):
            print(f"msrl evaluate: segmentation utility ({train_set})", flush=True)
            runs = self.protocol.runs(train, self.test)
            rows += segmentation_records(runs, train_set, self.protocol.seeds, len(self.test.volumes),
                                         len(train[0].volumes))
        return rows

    def fidelity(self, data: MaskedVolumes) -> list[dict[str, Any]]:
        """`mask_fidelity/dice` of volumes against the masks they were drawn from (or are judged against)."""
        return mask_fidelity_records(self.segmenters, data, self.protocol.seeds, len(self.heldout.train.volumes),
                                     self.protocol.labels, self.batch_size, self.seed)


def contour_panels(sources: list[SourceVolumes], heldout: Heldout, test: LabelledVolumes, evaluation: Sampler,
                   count: int = 3) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The rows of mask_contours.png: {"real": held-out volumes, source: its volumes drawn from the same masks}.

    Up to `count` distinct held-out masks with a lesion, in the order checkpoints drew them; a row
    per checkpoint at the evaluation sampler (mask-conditioned or not) and per reconstruction.
    Returns the rows and the masks [K, 1, S, S, S], or None when no drawn volume's mask has a lesion.
    """
    lesion = (heldout.masks.flatten(1) > 0).any(1)
    picks: dict[int, int] = {}  # held-out index -> drawn volume index
    for volume, index in enumerate(heldout.index.tolist()):
        if lesion[index] and index not in picks and len(picks) < count:
            picks[index] = volume
    if not picks:
        return None
    chosen = torch.tensor(list(picks))
    rows = {"real": test.volumes[chosen]}
    for source in sources:
        if source.masks is None or (source.sampler is not None and source.sampler != evaluation):
            continue
        if source.kind == "autoencoder":  # reconstructions are in held-out order
            rows[f"{source.key} (reconstruction)"] = source.volumes.volumes[chosen]
        else:
            conditioned = "mask-conditioned" if source.info.get("mask_conditioned") else "class label only"
            rows[f"{source.key} ({conditioned})"] = source.volumes.volumes[torch.tensor(list(picks.values()))]
    return rows, heldout.masks[chosen]
