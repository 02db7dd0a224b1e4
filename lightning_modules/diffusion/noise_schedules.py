"""msrl's default training noise schedule, and rebuilding a schedule from the betas a checkpoint stores."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

# The one place msrl's training noise schedule is written (configs leave it out; `msrl pretrain
# --print_config` shows it): T = 1000, LDM's scaled-linear betas from 0.0015 to 0.0195 (Rombach et
# al. 2022), v-prediction (Salimans & Ho 2022), no clipping while training.
DEFAULT_NOISE_SCHEDULER = {
    "class_path": "monai.networks.schedulers.DDPMScheduler",
    "init_args": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "prediction_type": "v_prediction",
                  "clip_sample": False},
    "dict_kwargs": {"beta_start": 0.0015, "beta_end": 0.0195},  # arguments of the beta schedule function
}


def default_noise_scheduler() -> DDPMScheduler:
    """A fresh scheduler as `DEFAULT_NOISE_SCHEDULER` describes (never shared between modules)."""
    return DDPMScheduler(**DEFAULT_NOISE_SCHEDULER["init_args"], **DEFAULT_NOISE_SCHEDULER["dict_kwargs"])


def schedule_from_betas(betas: torch.Tensor, prediction_type: str) -> DDPMScheduler:
    """A DDPMScheduler over exactly these betas (whatever schedule produced them)."""
    scheduler = DDPMScheduler(num_train_timesteps=len(betas), prediction_type=prediction_type, clip_sample=False)
    scheduler.betas = betas.float().clone()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler

