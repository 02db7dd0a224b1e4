"""First stages of latent diffusion: the shared `FirstStageModule`, the VQ-GAN and the KL autoencoder."""

from lightning_modules.first_stage.base import FirstStageModule
from lightning_modules.first_stage.kl import KLAutoencoderModule
from lightning_modules.first_stage.vqgan import AutoencoderModule

__all__ = ["AutoencoderModule", "FirstStageModule", "KLAutoencoderModule"]
