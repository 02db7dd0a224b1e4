"""The fine-tuned run's reward on evaluated volumes: raw scores in batches, with the masks the volumes were drawn from.

A reward part that reads masks (`needs_masks`, e.g. `rewards.MaskFidelityReward`) scores each volume against
its own mask. Volumes drawn from masks (a ControlNet, a model fine-tuned under one) carry them, and so do the
volumes judged against masks (a plain checkpoint's "no mask conditioning" row, the held-out real volumes);
volumes that carry none (a `--generated` folder, a real split other than the masks') are scored by the other
parts of a `MultiScaleReward` only, without the weighted total, which would leave parts out, and a note is
logged: an evaluation does not fail because one of its sources has no masks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rewards import MultiScaleReward, mask_reading_parts, raw_reward_scores, score_components

log = logging.getLogger(__name__)


def parts_without_masks(reward: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, part) of a reward that read no masks: the reward itself, else a composite's other components."""
    if not mask_reading_parts(reward):
        return [(getattr(reward, "name", type(reward).__name__), reward)]
    if isinstance(reward, MultiScaleReward):
        return [(name, part) for name, part in zip(reward.names, reward.components, strict=True)
                if not mask_reading_parts(part)]
    return []


@torch.no_grad()
def reward_scores(reward: nn.Module, volumes: torch.Tensor, labels: torch.Tensor | None, masks: torch.Tensor | None,
                  batch_size: int, device: torch.device, what: str = "this source") -> dict[str, torch.Tensor]:
    """Raw reward scores ({component: [N]} and "total", on the CPU) of volumes [N, C, S, S, S], scored in batches.

    Args:
        reward: the rebuilt reward.
        volumes: the volumes in [-1, 1].
        labels: their classes [N] (None: unconditional).
        masks: the lesion masks [N, 1, S, S, S] they were drawn from or are judged against (None: none).
        batch_size: volumes per forward pass.
        device: where the reward runs.
        what: whose volumes these are, for the note logged when parts are skipped for want of masks.
    """
    needing = mask_reading_parts(reward)
    parts = None if masks is not None or not needing else parts_without_masks(reward)
    if parts is not None:
        log.warning("the volumes of %s carry no lesion masks: reward parts %s, which read them, are not scored%s", what,
                    ", ".join(needing), "" if not parts else
                    f" (only {', '.join(name for name, _ in parts)}, without the weighted total)")
        if not parts:
            return {}
    scores: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(volumes), batch_size):
        chunk = volumes[start : start + batch_size].to(device)
        chunk_labels = None if labels is None else labels[start : start + batch_size].to(device)
        if parts is None:
            chunk_masks = None if masks is None else masks[start : start + batch_size].to(device)
            batch = raw_reward_scores(reward, chunk, chunk_labels, chunk_masks)
        else:  # each part as MultiScaleReward scores its components: its own total
            batch = {name: score_components(part, chunk, chunk_labels)[0] for name, part in parts}
        for component, values in batch.items():
            scores.setdefault(component, []).append(values.detach().float().cpu())
    return {component: torch.cat(values) for component, values in scores.items()}
