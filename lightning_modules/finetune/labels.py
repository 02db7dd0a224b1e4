"""Class labels of PPO rollouts: every class equally often in every rank's batch (docs/design.md §3).

Advantages are normalised per class (`ClassAdvantageNormaliser`); a class with 0 or 1 rollouts in an
iteration gets advantages of 0 or ±1 whatever its rewards, as labels drawn at random (8 rollouts,
2 classes) gave in ~7 % of iterations. A fixed, balanced label vector never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def labels_per_class(samples_per_iteration: int, num_classes: int) -> int:
    """Rollouts of each class in one rank's iteration, `samples_per_iteration / num_classes`.

    Raises:
        ValueError: `samples_per_iteration` is not a positive multiple of `num_classes` (≥ 1).
    """
    if num_classes < 1:
        raise ValueError(f"balanced labels need a class-conditional model (num_classes >= 1), got {num_classes}")
    if samples_per_iteration < num_classes or samples_per_iteration % num_classes:
        raise ValueError(f"samples_per_iteration must be a positive multiple of the model's {num_classes} classes "
                         f"(every rank rolls out each class equally often), got {samples_per_iteration}; "
                         f"e.g. {num_classes * max(1, round(samples_per_iteration / num_classes))}")
    return samples_per_iteration // num_classes


def balanced_labels(samples_per_iteration: int, num_classes: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Labels [samples_per_iteration]: 0, 1, …, K−1, 0, 1, … — each class `samples_per_iteration / K` times.

    Interleaved, so each micro-batch of the update and the logged slice grid hold every class. The
    vector depends on nothing else: the same on every rank and iteration, and after a resume.
    """
    return torch.arange(num_classes, device=device).repeat(labels_per_class(samples_per_iteration, num_classes))


def check_legacy_class_probs(class_probs: Sequence[float] | None, num_classes: int) -> None:
    """Accept the retired `class_probs` only where it asks for what balanced batches give: None or uniform.

    Configs and checkpoints written before batches were balanced carry it (`[0.5, 0.5]` or null).

    Raises:
        ValueError: `class_probs` is set and not `num_classes` equal probabilities.
    """
    if class_probs is None:
        return
    uniform = [1.0 / num_classes] * num_classes if num_classes > 0 else []
    if len(class_probs) != len(uniform) or any(abs(p - u) > 1e-6 for p, u in zip(class_probs, uniform, strict=True)):
        raise ValueError(f"class_probs is retired: every rollout batch holds samples_per_iteration / num_classes "
                         f"volumes of each of the {num_classes} classes, so it may only be null or uniform "
                         f"({uniform}), got {list(class_probs)}; remove it from the config")
