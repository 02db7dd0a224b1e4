"""The clipped-PPO update of one iteration (docs/design.md §3), a part of `PPOFinetuneModule`.

Log-probabilities of the stored denoising steps are recomputed with the current policy; gradients of
every chosen step of a micro-batch accumulate into one optimiser step. Before the first optimiser step
of an iteration the policy is the one that rolled out, so the ratio must be 1: its statistics on that
first micro-batch are logged as `ppo/first_ratio/max_abs_dev` (max |r − 1|) and
`ppo/first_ratio/clipfrac`, a check on every run that rollout and update compute the same density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from lightning_modules.diffusion.sampling import Trajectory, ddim_step_mean, gaussian_log_prob
from lightning_modules.ppo.advantages import clipped_surrogate

TIMESTEP_WEIGHTINGS = ("none", "equal")


def equal_gradient_weights(scheduler: DDIMScheduler, timesteps: Sequence[int], eta: float) -> torch.Tensor:
    """Per-timestep loss weights that give every step's log-probability the same gradient scale.

    ∂ log p(x_{t'} | x_t) / ∂ε̂ = (x_{t'} − μ)/σ_t² · ∂μ/∂ε̂ with x_{t'} − μ = σ_t·z, so a step's gradient
    scales with |∂μ/∂ε̂| / σ_t: far larger at the last stochastic step (the smallest σ_t) than at t = 999, so
    unweighted that step decides every update alone (docs/studies.md#timestep-weighting-and-fraction). The
    weights are σ_t / |∂μ/∂ε̂| (∂μ/∂ε̂ taken from `ddim_step_mean` itself, so any prediction type), scaled to
    mean 1 over `timesteps`.
    """
    zero = torch.zeros(1, dtype=torch.float64)
    delta = torch.full((1,), 1e-3, dtype=torch.float64)
    scales = []
    for t in timesteps:
        moved, std, _ = ddim_step_mean(scheduler, delta, int(t), zero, eta)
        still, _, _ = ddim_step_mean(scheduler, zero, int(t), zero, eta)
        scales.append(float(((moved - still) / delta).abs()) / float(std))
    weights = 1.0 / torch.tensor(scales, dtype=torch.float64)
    return (weights / weights.mean()).float()


class PPOUpdate:
    """`update` and its per-step loss; mixed into `PPOFinetuneModule` (whose `FinetuneBase` owns policy,
    optimiser, hparams, `predict`, `frozen_base` and `clip_and_step`)."""

    policy: Any
    reference: nn.Module | None
    hparams: Any

    def update(self, trajectory: Trajectory, labels: torch.Tensor | None, advantages: torch.Tensor,
               condition: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`num_inner_epochs` clipped-PPO passes; one optimiser step per micro-batch of samples.

        `condition`: the rollouts' masks as the ControlNet reads them [B, K, …] (None without masks).
        """
        hp = self.hparams
        optimizer = self.optimizers()
        self.scheduler.set_timesteps(hp.num_steps)
        steps = torch.nonzero(trajectory.stochastic).flatten()  # σ_t > 0 only: the final DDIM step is excluded
        count = max(1, math.ceil(hp.timestep_fraction * len(steps)))
        generator = torch.Generator().manual_seed(hash((hp.seed, int(self.iteration), self.global_rank, 1)) % 2**62)
        totals: dict[str, list[torch.Tensor]] = {}
        first: dict[str, list[torch.Tensor]] = {"max_abs_dev": [], "clipfrac": []}
        lr = self.current_lr()
        for group in optimizer.optimizer.param_groups:
            group["lr"] = lr
        for epoch in range(hp.num_inner_epochs):
            order = torch.randperm(len(advantages), generator=generator)
            chosen = steps[torch.randperm(len(steps), generator=generator)[:count]]
            weights = self._timestep_weights(trajectory, chosen.tolist())
            for start in range(0, len(order), hp.micro_batch_size):
                index = order[start : start + hp.micro_batch_size].to(self.device)
                for position, step in enumerate(chosen.tolist()):
                    last = position == len(chosen) - 1
                    with optimizer.toggle_model(sync_grad=last):
                        loss, stats = self._step_loss(trajectory, labels, advantages, index, step, condition)
                        self.manual_backward(loss * weights[position] / len(chosen))
                    deviation = stats.pop("ratio_max_abs_dev")
                    if epoch == 0 and start == 0:  # no optimiser step yet in this iteration: r must be 1
                        first["max_abs_dev"].append(deviation)
                        first["clipfrac"].append(stats["clipfrac"])
                    for key, value in {**stats, "loss": loss.detach()}.items():
                        totals.setdefault(key, []).append(value)
                grad_norm = self.clip_and_step(optimizer)
                if grad_norm is not None:
                    totals.setdefault("grad_norm", []).append(grad_norm)
        stats = {key: torch.stack(values).float().mean() for key, values in totals.items()}
        stats["first_ratio/max_abs_dev"] = torch.stack(first["max_abs_dev"]).max()
        stats["first_ratio/clipfrac"] = torch.stack(first["clipfrac"]).float().mean()
        stats["skipped_steps"] = self.skipped_steps.float()
        stats["lr"] = torch.tensor(lr)
        return stats

    def _timestep_weights(self, trajectory: Trajectory, chosen: list[int]) -> list[float]:
        """The loss weight of each chosen step: 1, or equal gradient scales (`timestep_weighting: equal`)."""
        if self.hparams.timestep_weighting == "none":
            return [1.0] * len(chosen)
        timesteps = [int(trajectory.timesteps[step]) for step in chosen]
        return equal_gradient_weights(self.scheduler, timesteps, self.hparams.eta).tolist()

    def _step_loss(self, trajectory: Trajectory, labels: torch.Tensor | None, advantages: torch.Tensor,
                   index: torch.Tensor, step: int, condition: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped-PPO loss (+ KL to the pretrained model) of one denoising step of a micro-batch; the
        masks' `condition` is indexed like the labels, so policy and reference see each sample's own mask."""
        hp = self.hparams
        x_t, x_prev = trajectory.latents[index, step], trajectory.latents[index, step + 1]
        t = int(trajectory.timesteps[step])
        timesteps = torch.full((len(index),), t, device=self.device)
        batch_labels = None if labels is None else labels[index]
        batch_condition = None if condition is None else condition[index]
        prediction = self.predict(self.policy.unet, x_t, timesteps, batch_labels, batch_condition)
        mean, std, _ = ddim_step_mean(self.scheduler, prediction, t, x_t, hp.eta)
        log_prob = gaussian_log_prob(x_prev, mean, std, hp.logprob_reduction)
        loss, stats = clipped_surrogate(log_prob, trajectory.log_probs[index, step], advantages[index], hp.clip_range)
        if hp.kl_coef > 0:
            with torch.no_grad(), self.frozen_base() as reference:
                prediction = self.predict(reference, x_t, timesteps, batch_labels, batch_condition)
                ref_mean, _, _ = ddim_step_mean(self.scheduler, prediction, t, x_t, hp.eta)
            # KL between two Gaussians of equal σ: ||μ − μ_ref||² / 2σ², reduced like the log-prob.
            kl = ((mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)).flatten(1)
            kl = kl.sum(1) if hp.logprob_reduction == "sum" else kl.mean(1)
            loss = loss + hp.kl_coef * kl.mean()
            stats["kl_to_pretrained"] = kl.detach().mean()
        return loss, stats
