"""The networks behind learned rewards (realism critics, downstream classifier, lesion segmenter), their training
and data."""

from lightning_modules.critics.networks import (
    ClassifierModule,
    PooledConvNet,
    RealismCriticModule,
    RewardNetworkModule,
    random_flips,
)
from lightning_modules.critics.realism_data import RealismDataModule, mri_artefacts
from lightning_modules.critics.segmenter import SEGMENTER_HOW_TO, SegmenterModule, one_hot_masks, soft_dice

__all__ = ["SEGMENTER_HOW_TO", "ClassifierModule", "PooledConvNet", "RealismCriticModule", "RealismDataModule",
           "RewardNetworkModule", "SegmenterModule", "mri_artefacts", "one_hot_masks", "random_flips", "soft_dice"]
