"""The networks behind learned rewards (realism critics, downstream classifier), their training and data."""

from lightning_modules.critics.networks import (
    ClassifierModule,
    PooledConvNet,
    RealismCriticModule,
    RewardNetworkModule,
    random_flips,
)
from lightning_modules.critics.realism_data import RealismDataModule, mri_artefacts

__all__ = ["ClassifierModule", "PooledConvNet", "RealismCriticModule", "RealismDataModule", "RewardNetworkModule",
           "mri_artefacts", "random_flips"]
