"""3D diffusion: `DiffusionModule`, DDIM sampling with log-probabilities, noise schedules, the latent space."""

from lightning_modules.diffusion.latent import LatentSpace
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.diffusion.sampling import Trajectory, ddim_step_with_logprob, sample

__all__ = ["DiffusionModule", "LatentSpace", "Trajectory", "ddim_step_with_logprob", "sample"]
