"""Rewards for PPO fine-tuning: the contract, rule-based rewards and (later) learned critics."""

from rewards.base import Reward, score_components
from rewards.rules import InterSliceContinuityReward

__all__ = ["InterSliceContinuityReward", "Reward", "score_components"]
