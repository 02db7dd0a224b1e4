"""Rewards for PPO fine-tuning: the multi-scale composite, rule-based and learned rewards.

They build on the reward contract that PPO owns (`Reward`, lightning_modules/ppo/reward.py),
re-exported here for reward authors.
"""

from lightning_modules.ppo.reward import Reward, score_components
from rewards.clinical import ClassifierReward
from rewards.multiscale import MultiScaleReward
from rewards.rules import (
                           BrainMaskPlausibilityReward,
                           HemisphericSymmetryReward,
                           IntensityHistogramReward,
                           InterSliceContinuityReward,
)
from rewards.slice2d import SliceCriticReward
from rewards.volume3d import VolumeCriticReward

__all__ = ["BrainMaskPlausibilityReward", "ClassifierReward", "HemisphericSymmetryReward", "IntensityHistogramReward",
           "InterSliceContinuityReward", "MultiScaleReward", "Reward", "SliceCriticReward", "VolumeCriticReward",
           "score_components"]
