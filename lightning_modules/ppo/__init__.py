"""PPO fine-tuning: `PPOFinetuneModule`, its advantages and clipped update (the reward contract is in finetune/)."""

from lightning_modules.ppo.advantages import ClassAdvantageNormaliser, clipped_surrogate
from lightning_modules.ppo.module import PPOFinetuneModule

__all__ = ["ClassAdvantageNormaliser", "PPOFinetuneModule", "clipped_surrogate"]
