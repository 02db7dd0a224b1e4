"""Rewards for fine-tuning (PPO and reward backpropagation): the multi-scale composite, rule-based and learned rewards.

They build on the reward contract both fine-tuners share (`Reward`, `raw_reward_scores`,
`non_differentiable_parts`, lightning_modules/finetune/reward.py), re-exported here for reward authors
and evaluation, which also rebuilds the reward a fine-tuned checkpoint records (`reward_from_checkpoint`,
rewards/loading.py).
"""

from lightning_modules.finetune.reward import (
    Reward,
    mask_reading_parts,
    non_differentiable_parts,
    raw_reward_scores,
    reward_networks,
    score_components,
)
from rewards.clinical import ClassifierReward
from rewards.loading import check_network_files, check_reward_networks, reward_from_checkpoint, reward_from_config
from rewards.mask import MaskFidelityReward
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
           "InterSliceContinuityReward", "MaskFidelityReward", "MultiScaleReward", "Reward", "SliceCriticReward",
           "VolumeCriticReward", "check_network_files", "check_reward_networks", "mask_reading_parts",
           "non_differentiable_parts", "raw_reward_scores", "reward_from_checkpoint", "reward_from_config",
           "reward_networks", "score_components"]
