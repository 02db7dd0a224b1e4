"""Mask fidelity: does a segmenter trained on real volumes find, in a generated volume, the mask it was drawn from?

A mask-conditioned generator can match the real distribution (FID) and still ignore its mask: a
lesion drawn elsewhere, or none. The judges are the segmentation utility's segmenters trained on the
real training split (msrl/evaluation/segmentation.py, train set "real"), one per seed, reused here
as class fidelity reuses the utility classifiers (msrl/evaluation/fidelity.py). A volume's value
per label and for the whole tumour is its Dice against its mask, averaged over the segmenters.

A region's row holds only the volumes whose mask has that region: their Dice is always defined
(|M| > 0), and two checkpoints sampled from the same masks then judge the same volumes, so
comparison.py's `paired_records` pairs them volume by volume like class fidelity. A lesion drawn
where the mask has none is not counted here. On held-out real volumes with their own masks the same
number is the ceiling, on autoencoder reconstructions the floor a latent generator can reach.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from msrl.evaluation.metrics import bootstrap_mean_estimate
from msrl.evaluation.scores import record
from msrl.evaluation.segmenter import SEGMENTATION_LABELS, WHOLE_TUMOUR, MaskedVolumes, dice_per_volume, predict_masks

log = logging.getLogger(__name__)

MASK_FIDELITY_METRIC = "mask_fidelity/dice"
SEGMENTER_TRAIN_SET = "real"  # the records' train_set: the judges were trained on the real training split


def mask_dice(segmenters: Sequence[nn.Module], data: MaskedVolumes, labels: Sequence[int] = SEGMENTATION_LABELS,
              batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Dice of each segmenter's prediction on each volume against its mask: {region: [K segmenters, N volumes]}.

    Args:
        segmenters: networks mapping volumes [B, C, S, S, S] to logits [B, len(labels) + 1, S, S, S]
            (background, then `labels` in order).
        data: the judged volumes with the masks they were drawn from.
        labels: the label codes of the segmenters' classes.
        batch_size: volumes per forward pass.
    """
    if not segmenters:
        raise ValueError("mask fidelity needs at least one segmenter (one per segmentation seed), got none")
    per_segmenter = [dice_per_volume(predict_masks(network, data.volumes, labels, batch_size), data.masks, labels)
                     for network in segmenters]
    return {region: torch.stack([dice[region] for dice in per_segmenter]) for region in per_segmenter[0]}


def mask_fidelity_records(segmenters: Sequence[nn.Module], data: MaskedVolumes, seeds: Sequence[int],
                          num_train: int, labels: Sequence[int] = SEGMENTATION_LABELS, batch_size: int = 4,
                          seed: int = 0) -> list[dict[str, Any]]:
    """`mask_fidelity/dice` per region (`label`): mean over volumes, bootstrap interval, per volume.

    Args:
        segmenters: the real-trained segmenters, one per segmentation seed (in the order of `seeds`).
        data: the judged volumes (generated, reconstructed or held-out real) with their masks.
        seeds: the seeds the segmenters were trained with (recorded).
        num_train: real training pairs the segmenters saw (recorded as num_real).
        labels: the label codes of the segmenters' classes.
        batch_size: volumes per forward pass.
        seed: seed of the bootstrap over volumes.

    Returns:
        One record per region whose mask is non-empty in at least one volume; `per_volume` holds
        the Dice of each such volume averaged over the segmenters (what paired comparisons
        resample), `volumes` their indices in `data`, `per_segmenter` each segmenter's mean Dice.
    """
    dice = mask_dice(segmenters, data, labels, batch_size)
    masks = data.masks.flatten(1)
    present = {str(label): (masks == label).any(1) for label in labels}
    present[WHOLE_TUMOUR] = (masks > 0).any(1)
    rows = []
    for region, values in dice.items():
        subset = values[:, present[region]]
        if subset.shape[1] == 0:
            log.warning("mask fidelity: no mask has region %s; no record", region)
            continue
        per_volume = subset.mean(0).numpy()
        rows.append(record(MASK_FIDELITY_METRIC, bootstrap_mean_estimate(per_volume, seed),
                           extractor=None, view="3d", train_set=SEGMENTER_TRAIN_SET,
                           label=region, **{"class": "all"}, num_real=num_train, num_generated=len(per_volume),
                           seeds=list(seeds), per_segmenter=[float(v) for v in subset.mean(1)],
                           volumes=present[region].nonzero().flatten().tolist(),
                           per_volume=[float(v) for v in per_volume]))
    return rows
