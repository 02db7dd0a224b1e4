"""PPO fine-tuning: `PPOFinetuneModule`, the reward contract it owns, advantages and running statistics."""

from lightning_modules.ppo.advantages import ClassAdvantageNormaliser, clipped_surrogate
from lightning_modules.ppo.module import PPOFinetuneModule
from lightning_modules.ppo.reward import Reward, score_components
from lightning_modules.ppo.running import RunningMoments

__all__ = ["ClassAdvantageNormaliser", "PPOFinetuneModule", "Reward", "RunningMoments", "clipped_surrogate",
           "score_components"]
