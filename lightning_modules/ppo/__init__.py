"""PPO fine-tuning: `PPOFinetuneModule`, the reward contract it owns (and raw scores), advantages, statistics."""

from lightning_modules.ppo.advantages import ClassAdvantageNormaliser, clipped_surrogate
from lightning_modules.ppo.module import PPOFinetuneModule
from lightning_modules.ppo.reward import Reward, raw_reward_scores, reward_networks, score_components
from lightning_modules.ppo.running import RunningMoments

__all__ = ["ClassAdvantageNormaliser", "PPOFinetuneModule", "Reward", "RunningMoments", "clipped_surrogate",
           "raw_reward_scores", "reward_networks", "score_components"]
