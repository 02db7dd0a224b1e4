"""What every reward fine-tuner shares: `FinetuneBase` (policy, rollout, scoring, logs, checkpoint records),
the reward contract (`Reward`, raw scores, differentiability), balanced labels and running statistics."""

from lightning_modules.finetune.base import (
    FINETUNE_KEY,
    ROLLOUT_KEY,
    FinetuneBase,
    algorithm_names,
    finetune_tags,
    metric_prefixes,
)
from lightning_modules.finetune.reward import (
    REWARD_KEY,
    Reward,
    mask_reading_parts,
    non_differentiable_parts,
    raw_reward_scores,
    reward_networks,
    score_components,
)
from lightning_modules.finetune.running import RunningMoments

DEFAULT_FINETUNER = "lightning_modules.PPOFinetuneModule"  # what `msrl finetune` builds when a config names no class

__all__ = ["DEFAULT_FINETUNER", "FINETUNE_KEY", "REWARD_KEY", "ROLLOUT_KEY", "FinetuneBase", "Reward", "RunningMoments",
           "algorithm_names", "finetune_tags", "mask_reading_parts", "metric_prefixes", "non_differentiable_parts",
           "raw_reward_scores", "reward_networks", "score_components"]
