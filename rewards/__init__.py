"""Rewards for PPO fine-tuning: the contract, the multi-scale composite, rule-based and learned rewards."""

from rewards.base import Reward, score_components
from rewards.learned import ClassifierReward, SliceCriticReward, VolumeCriticReward
from rewards.multiscale import MultiScaleReward
from rewards.rules import (
                           BrainMaskPlausibilityReward,
                           HemisphericSymmetryReward,
                           IntensityHistogramReward,
                           InterSliceContinuityReward,
)

__all__ = ["BrainMaskPlausibilityReward", "ClassifierReward", "HemisphericSymmetryReward", "IntensityHistogramReward",
           "InterSliceContinuityReward", "MultiScaleReward", "Reward", "SliceCriticReward", "VolumeCriticReward",
           "score_components"]
