"""Reward backpropagation: `RewardBackpropModule` (DRaFT-K / AlignProp through the last K sampler steps)."""

from lightning_modules.backprop.module import RewardBackpropModule

__all__ = ["RewardBackpropModule"]
