"""Class fidelity: does a classifier trained on real volumes call a generated volume the class it was drawn for?

A conditional generator can match the real distribution (FID) and still ignore its condition: a
class-1 MS volume drawn without a lesion. The judges are the utility protocol's classifiers trained
on the real training split (msrl/evaluation/utility.py; the "real" train set of `msrl evaluate`),
trained once, one per utility seed, and reused here; no other network is trained. A volume's value
is the share of those classifiers that call it its conditioning class (0 or 1 with one seed); per
class the mean is the classifiers' accuracy on that class's volumes (recall), and "all" pools every
volume (with `msrl evaluate`'s balanced labels the mean of the per-class values). Values are per
volume, so two checkpoints sampled with the same seeds are paired volume by volume like the rewards
(msrl/evaluation/comparison.py). On held-out real volumes the same number is the ceiling a
generator that draws the class as the real data does would reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from msrl.evaluation.metrics import bootstrap_mean_estimate
from msrl.evaluation.scores import class_subsets, record
from msrl.evaluation.utility import LabelledVolumes

FIDELITY_METRIC = "class_fidelity/accuracy"
CLASSIFIER_TRAIN_SET = "real"  # the records' train_set: the judges were trained on the real training split


@torch.no_grad()
def correct_calls(classifiers: Sequence[nn.Module], data: LabelledVolumes, batch_size: int = 8) -> torch.Tensor:
    """Whether each classifier's arg-max class is the volume's label: bool [K classifiers, N volumes].

    Args:
        classifiers: networks mapping volumes [B, C, S, S, S] in [-1, 1] to logits [B, num_classes].
        data: the volumes to judge with the class each was drawn for.
        batch_size: volumes per forward pass.
    """
    if not classifiers:
        raise ValueError("class fidelity needs at least one classifier (one per utility seed), got none")
    calls = []
    for network in classifiers:
        network.eval()
        logits = torch.cat([network(chunk.float()) for chunk in data.volumes.split(batch_size)])
        calls.append(logits.argmax(dim=1).cpu() == data.labels.cpu())
    return torch.stack(calls)


def fidelity_records(classifiers: Sequence[nn.Module], data: LabelledVolumes, seeds: Sequence[int], num_train: int,
                     batch_size: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """`class_fidelity/accuracy` per class ("all", "0", "1", …): mean over volumes, bootstrap interval, per volume.

    Args:
        classifiers: the real-trained utility classifiers, one per utility seed (in the order of `seeds`).
        data: the judged volumes (generated, reconstructed or held-out real) with their labels.
        seeds: the utility seeds the classifiers were trained with (recorded).
        num_train: real training volumes the classifiers saw (recorded as num_real).
        batch_size: volumes per forward pass.
        seed: seed of the bootstrap over volumes.

    Returns:
        One record per class subset; `per_volume` holds each volume's share of correct classifiers
        (what paired comparisons resample), `per_classifier` each classifier's accuracy.
    """
    correct = correct_calls(classifiers, data, batch_size).double()
    rows = []
    for name, mask in class_subsets(data.labels.cpu()).items():
        subset = correct if mask is None else correct[:, mask]
        values = subset.mean(0).numpy()
        rows.append(record(FIDELITY_METRIC, bootstrap_mean_estimate(values, seed),
                           extractor=None, view="3d", train_set=CLASSIFIER_TRAIN_SET,
                           **{"class": name}, num_real=num_train, num_generated=len(values), seeds=list(seeds),
                           per_classifier=[float(v) for v in subset.mean(1)],
                           per_volume=[float(v) for v in values]))
    return rows
