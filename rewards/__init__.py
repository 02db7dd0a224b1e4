"""Rewards for PPO fine-tuning: the multi-scale composite, rule-based and learned rewards.

They build on the reward contract that PPO owns (`Reward`, `raw_reward_scores`,
lightning_modules/ppo/reward.py), re-exported here for reward authors and evaluation, which also
rebuilds the reward a fine-tuned checkpoint records (`reward_from_checkpoint`, rewards/loading.py).
"""

from lightning_modules.ppo.reward import Reward, raw_reward_scores, reward_networks, score_components
from rewards.clinical import ClassifierReward
from rewards.loading import check_network_files, check_reward_networks, reward_from_checkpoint, reward_from_config
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
           "check_network_files", "check_reward_networks", "raw_reward_scores", "reward_from_checkpoint",
           "reward_from_config", "reward_networks", "score_components"]
