"""Learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                           total_steps: float | int | Callable[[], float | int] | None,
                           min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up to the optimiser's lr, then cosine decay to `min_lr_ratio`·lr at `total_steps`.

    With no finite `total_steps` (an open-ended run) the rate stays at its peak after warm-up.
    `total_steps` may be a function, asked once when warm-up ends: `trainer.estimated_stepping_batches`
    read inside `configure_optimizers` sets up the training loader before a resumed run has restored
    its position (Lightning issue #20550), so the position would be lost.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    resolved: list[float | int | None] = []

    def total() -> float | int | None:
        if not resolved:
            resolved.append(total_steps() if callable(total_steps) else total_steps)
        return resolved[0]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step == warmup_steps:
            return 1.0  # the peak, whatever the length (also LambdaLR's first call when warmup_steps is 0)
        end = total()
        if end is None or not math.isfinite(end) or end <= warmup_steps:
            return 1.0
        progress = min((step - warmup_steps) / (end - warmup_steps), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
