"""First stages of latent diffusion: `FirstStageModule`, the VQ-GAN, the KL autoencoder, their training settings."""

from lightning_modules.first_stage.base import AUTOENCODER_KEY, FirstStageModule
from lightning_modules.first_stage.kl import KLAutoencoderModule
from lightning_modules.first_stage.settings import FirstStageTraining
from lightning_modules.first_stage.tiling import TiledDecoding
from lightning_modules.first_stage.vqgan import AutoencoderModule

__all__ = ["AUTOENCODER_KEY", "AutoencoderModule", "FirstStageModule", "FirstStageTraining", "KLAutoencoderModule",
           "TiledDecoding"]
