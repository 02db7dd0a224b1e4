"""3D diffusion: `DiffusionModule`, DDIM sampling with log-probabilities, noise schedules, the latent space, LoRA."""

from lightning_modules.diffusion.latent import LatentSpace
from lightning_modules.diffusion.lora import AdapterEMA, add_lora, merge_adapters
from lightning_modules.diffusion.module import DIFFUSION_KEY, DiffusionModule
from lightning_modules.diffusion.sampling import Trajectory, ddim_step_with_logprob, sample

__all__ = ["DIFFUSION_KEY", "AdapterEMA", "DiffusionModule", "LatentSpace", "Trajectory", "add_lora",
           "ddim_step_with_logprob", "merge_adapters", "sample"]
