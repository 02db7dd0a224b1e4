"""DDIM sampling that keeps what fine-tuning needs: every x_t, timestep and per-step log-probability,
or the autograd graph of the last K steps.

MONAI's `DDIMScheduler.step` returns neither the Gaussian's mean nor its log-density, and
`DiffusionInferer.sample` keeps no trajectory. `ddim_step_with_logprob` re-implements that one
step (docs/design.md §2; Song et al. 2021, eq. 12 and 16) with the same arithmetic in the same order,
so that with η = 0 it reproduces MONAI bit for bit, and adds log p(x_{t'} | x_t). PPO reads the
log-probabilities; reward backpropagation (DRaFT-K, Clark et al. 2024) keeps the graph of the last
`grad_steps` steps instead (`sample(..., grad_steps=K)`).

The steps' noise comes from one generator, or from one generator per sample (a list): then a sample's
noise depends on its own seed only, not on the batch it is drawn in (a DDP rank's share of a batch
samples what one process with the whole batch would).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.schedulers import DDIMScheduler
from tqdm.auto import tqdm

Reduction = Literal["mean", "sum"]
Generators = torch.Generator | Sequence[torch.Generator] | None


def gaussian_noise(shape: Sequence[int], generator: Generators, device: torch.device | str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [B, ...]: from one generator, or sample b's from `generator[b]` (a list of B)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), dtype=dtype, generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), dtype=dtype, generator=g, device=device) for g in generator])


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] → [B, 1, ..., 1] so a per-sample scalar broadcasts over a volume of `ndim` dims."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def _alphas(scheduler: DDIMScheduler, timestep: int | torch.Tensor, ndim: int, device: torch.device,
            ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """ᾱ_t, ᾱ_{t'} and t' for an int timestep (0-dim tensors, as MONAI) or a [B] tensor."""
    prev_timestep = timestep - scheduler.num_train_timesteps // scheduler.num_inference_steps
    cumprod = scheduler.alphas_cumprod.to(device)
    final = scheduler.final_alpha_cumprod.to(device)
    if not torch.is_tensor(timestep):
        alpha_prev = cumprod[prev_timestep] if prev_timestep >= 0 else final
        return cumprod[timestep], alpha_prev, prev_timestep
    timestep = timestep.to(device)
    prev_timestep = prev_timestep.to(device)
    alpha_t = cumprod[timestep]
    alpha_prev = torch.where(prev_timestep >= 0, cumprod[prev_timestep.clamp(min=0)], final)
    return _per_sample(alpha_t, ndim), _per_sample(alpha_prev, ndim), prev_timestep


def ddim_step_mean(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean μ and σ_t of the DDIM step's Gaussian (DDIM eq. 12 and 16), in MONAI's arithmetic.

    Returns:
        mean: μ, [B, C, D, H, W].
        std_dev_t: σ_t = η·√variance (0-dim for an int timestep, [B, 1, 1, 1, 1] for a tensor).
        variance: the η = 1 variance, as MONAI uses it to scale the noise.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    alpha_prod_t, alpha_prod_t_prev, _ = _alphas(scheduler, timestep, sample.ndim, sample.device)
    beta_prod_t = 1 - alpha_prod_t
    # Predicted x0 and ε, exactly as MONAI's DDIMScheduler.step computes them.
    if scheduler.prediction_type == "epsilon":
        pred_original_sample = (sample - (beta_prod_t**0.5) * model_output) / (alpha_prod_t**0.5)
        pred_epsilon = model_output
    elif scheduler.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - (alpha_prod_t**0.5) * pred_original_sample) / (beta_prod_t**0.5)
    elif scheduler.prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.prediction_type!r}")
    if scheduler.clip_sample:
        pred_original_sample = torch.clamp(pred_original_sample, *scheduler.clip_sample_values)
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
    mean = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    return mean, std_dev_t, variance


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: Generators = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t → x_{t'} and its log-probability under the step's Gaussian.

    Args:
        scheduler: a MONAI `DDIMScheduler` after `set_timesteps`.
        model_output: the network's prediction (ε, v or x0, as the scheduler's prediction_type).
        timestep: t, an int or a [B] tensor (one per batch element).
        sample: x_t, [B, C, D, H, W].
        eta: η, the weight of the step's noise (0: deterministic DDIM, 1: DDPM-like).
        prev_sample: x_{t'} to score instead of drawing one (PPO recomputes old actions).
        generator: random generator for the noise, drawn exactly as MONAI draws it (or one per sample).
        reduction: "sum" (the exact log-density of the whole volume) or "mean" over elements
            (ddpo-pytorch's choice; 1/numel of the sum, which changes what a PPO clip range means).

    Returns:
        prev_sample: x_{t'}, [B, C, D, H, W].
        log_prob: [B], log N(x_{t'}; μ, σ_t² I) reduced over elements. Where σ_t = 0 (η = 0, or the
            last step with `set_alpha_to_one`) the step is deterministic and carries no
            probability: log_prob is 0 there, and such steps must not be trained on by PPO.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mean, std_dev_t, variance = ddim_step_mean(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        prev_sample = mean
        if eta > 0:
            noise = gaussian_noise(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = mean + variance**0.5 * eta * noise
    log_prob = gaussian_log_prob(prev_sample, mean, std_dev_t, reduction)
    return prev_sample, log_prob


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float,
                      reduction: Reduction) -> torch.Tensor:
    """log N(x; mean, std²) per element, reduced over all but the batch dim; 0 where std = 0.

    Computed in float32 at least: bf16/fp16 log-densities overflow (docs/design.md §3).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean = x.to(dtype), mean.to(dtype)
    # σ stays 0-dim or [B, 1, ..., 1] and broadcasts: the same values as expanding it, in fewer full-volume ops.
    std = torch.as_tensor(std, dtype=dtype, device=x.device)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    element = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    element = torch.where(stochastic, element, element.new_zeros(()))
    dims = tuple(range(1, x.ndim))
    return element.sum(dims) if reduction == "sum" else element.mean(dims)


@dataclass
class Trajectory:
    """A sampled denoising trajectory.

    Attributes:
        latents: [B, N + 1, C, D, H, W], x_T … x_0 (the states before and after every step).
        log_probs: [B, N], log p(x_{t'} | x_t) of every step taken.
        timesteps: [N], the t of every step.
        stochastic: [N] bool, whether a step had σ_t > 0 (only those carry a log-probability).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    stochastic: torch.Tensor


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def guided_prediction(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                      labels: torch.Tensor | None, guidance_scale: float, null_class: int | None) -> torch.Tensor:
    """The network's prediction, with classifier-free guidance when `guidance_scale` ≠ 1.

    ε̂ = ε_∅ + w (ε_y − ε_∅) (Ho & Salimans 2022); conditional and null passes share one batch.
    """
    timesteps = t.expand(x.shape[0]) if t.ndim == 0 else t
    if labels is None or guidance_scale == 1.0:
        return model(x, timesteps, labels)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the model's null class")
    null = torch.full_like(labels, null_class)
    both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([labels, null]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def sample(
    model: Callable[..., torch.Tensor],
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_steps: int = 50,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    generator: Generators = None,
    return_trajectory: bool = False,
    reduction: Reduction = "mean",
    progress: bool = False,
    grad_steps: int = 0,
) -> tuple[torch.Tensor, Trajectory | None]:
    """Run DDIM from `noise` (x_T) down to x_0 with `ddim_step_with_logprob`.

    Every step runs without gradients except the last `grad_steps`, whose autograd graph is kept
    (DRaFT-K, Clark et al. 2024): x_0's gradient then reaches the model through those steps only, and
    x_{T−K} enters them as a constant (AlignProp's truncation, Prabhudesai et al. 2023).

    Args:
        model: callable(x, timesteps[B], labels[B] | None) → prediction, e.g. a MONAI UNet.
        scheduler: DDIM scheduler; `set_timesteps(num_steps)` is called on it.
        noise: x_T, [B, C, D, H, W].
        labels: class labels [B] (int64), or None for an unconditional model.
        num_steps: DDIM steps N.
        eta: η of every step.
        guidance_scale: classifier-free guidance weight w (1 = plain conditional).
        null_class: the label meaning "no class" (needed when w ≠ 1).
        generator: random generator of the steps' noise, or one per sample.
        return_trajectory: also return the `Trajectory`.
        reduction: log-probability reduction, see `ddim_step_with_logprob`.
        progress: show a progress bar.
        grad_steps: K, the last steps whose graph is kept (0: none, as for sampling and PPO's rollouts).

    Returns:
        x_0 [B, C, D, H, W] and the trajectory (or None).
    """
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, num_steps={num_steps}], got {grad_steps}")
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    states, log_probs, stochastic = [x], [], []
    first_kept = len(scheduler.timesteps) - grad_steps
    for index, t in enumerate(tqdm(scheduler.timesteps, desc="DDIM", disable=not progress, leave=False)):
        with torch.set_grad_enabled(grad_steps > 0 and index >= first_kept):
            prediction = guided_prediction(model, x, t, labels, guidance_scale, null_class)
            x, log_prob = ddim_step_with_logprob(scheduler, prediction, int(t), x, eta=eta, generator=generator,
                                                 reduction=reduction)
        if return_trajectory:
            states.append(x)
            log_probs.append(log_prob)
            _, alpha_prev, _ = _alphas(scheduler, int(t), x.ndim, x.device)
            stochastic.append(bool(eta > 0 and alpha_prev < 1.0))
    if not return_trajectory:
        return x, None
    trajectory = Trajectory(latents=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1),
                            timesteps=scheduler.timesteps.clone(),
                            stochastic=torch.tensor(stochastic, dtype=torch.bool))
    return x, trajectory


def ddim_from_training_schedule(train_scheduler: torch.nn.Module, clip_sample: bool = True,
                                set_alpha_to_one: bool = True) -> DDIMScheduler:
    """A `DDIMScheduler` over exactly the training scheduler's ᾱ (any beta schedule).

    Args:
        train_scheduler: the MONAI scheduler the model was trained with (DDPM).
        clip_sample: clamp predicted x0 to [-1, 1] (our volumes live there).
        set_alpha_to_one: ᾱ before the first training step is 1 (the last step is then
            deterministic); False uses ᾱ_0 instead and keeps it stochastic.
    """
    ddim = DDIMScheduler(num_train_timesteps=train_scheduler.num_train_timesteps, clip_sample=clip_sample,
                         set_alpha_to_one=set_alpha_to_one, prediction_type=train_scheduler.prediction_type)
    ddim.betas = train_scheduler.betas.detach().cpu().clone()
    ddim.alphas = train_scheduler.alphas.detach().cpu().clone()
    ddim.alphas_cumprod = train_scheduler.alphas_cumprod.detach().cpu().clone()
    ddim.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else ddim.alphas_cumprod[0]
    return ddim
