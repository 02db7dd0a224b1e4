"""The models of msrl: LightningModules and what they alone need.

`DiffusionModule` (pretraining, DDIM sampling with log-probabilities) in `diffusion/`; the first
stages of latent diffusion (`FirstStageModule`, the VQ-GAN `AutoencoderModule`, the
`KLAutoencoderModule`) in `first_stage/`; what the reward fine-tuners share (`FinetuneBase`, the
reward contract `Reward`) in `finetune/`, `PPOFinetuneModule` in `ppo/`, `RewardBackpropModule` in
`backprop/`; the reward networks and their data in `critics/`; the preemption callback in
`callbacks/`; mask conditioning (`ControlNetModule`, a ControlNet on a frozen pretrained
model) in `controlnet/`. Configs and checkpoints name classes by these exported names.
"""

import datamodules  # noqa: F401  # first: imports MONAI without `transformers` (datamodules/monai_import.py)
from lightning_modules.backprop import RewardBackpropModule
from lightning_modules.callbacks import StepBoundaryRequeue
from lightning_modules.checkpoint_io import UnsafeCheckpointError, load_weights
from lightning_modules.controlnet import ControlNetModule
from lightning_modules.critics import (
    ClassifierModule,
    PooledConvNet,
    RealismCriticModule,
    RealismDataModule,
    RewardNetworkModule,
    SegmenterModule,
)
from lightning_modules.diffusion import DiffusionModule, LatentSpace
from lightning_modules.finetune import FinetuneBase, Reward, finetune_tags, score_components
from lightning_modules.first_stage import (
    AutoencoderModule,
    FirstStageModule,
    FirstStageTraining,
    KLAutoencoderModule,
)
from lightning_modules.ppo import PPOFinetuneModule
from lightning_modules.slices import PLANES, SliceSampler

__all__ = ["PLANES", "AutoencoderModule", "ClassifierModule", "ControlNetModule", "DiffusionModule", "FinetuneBase",
           "FirstStageModule", "FirstStageTraining", "KLAutoencoderModule", "LatentSpace", "PPOFinetuneModule",
           "PooledConvNet", "RealismCriticModule", "RealismDataModule", "Reward", "RewardBackpropModule",
           "RewardNetworkModule", "SegmenterModule", "SliceSampler", "StepBoundaryRequeue", "UnsafeCheckpointError",
           "finetune_tags",
           "load_weights", "score_components"]
