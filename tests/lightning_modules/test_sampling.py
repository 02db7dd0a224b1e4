"""Tests of `ddim_step_with_logprob` and the trajectory sampler (docs/design.md §2)."""

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from lightning_modules.diffusion.sampling import ddim_from_training_schedule, ddim_step_with_logprob, sample

SHAPE = (3, 2, 6, 6, 6)


def _scheduler(prediction_type: str = "epsilon", clip_sample: bool = True, set_alpha_to_one: bool = True,
               steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", clip_sample=clip_sample,
                              set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_eta_zero_reproduces_monai_bit_for_bit(prediction_type: str, clip_sample: bool) -> None:
    scheduler = _scheduler(prediction_type, clip_sample)
    torch.manual_seed(0)
    for t in scheduler.timesteps.tolist():  # every step, the last one (t' < 0) included
        x, output = torch.randn(SHAPE), torch.randn(SHAPE)
        expected, _ = scheduler.step(output, t, x, eta=0.0)
        ours, log_prob = ddim_step_with_logprob(scheduler, output, t, x, eta=0.0)
        assert torch.equal(ours, expected), t
        assert torch.equal(log_prob, torch.zeros(SHAPE[0]))  # deterministic: no probability mass


def test_per_sample_timesteps_match_monai_step_by_step() -> None:
    scheduler = _scheduler("v_prediction")
    timesteps = scheduler.timesteps[[0, 4, 9]]  # includes the final step, whose t' < 0
    x, output = torch.randn(SHAPE), torch.randn(SHAPE)
    ours, _ = ddim_step_with_logprob(scheduler, output, timesteps, x, eta=0.0)
    for b, t in enumerate(timesteps.tolist()):
        expected, _ = scheduler.step(output[b : b + 1], t, x[b : b + 1], eta=0.0)
        torch.testing.assert_close(ours[b : b + 1], expected, rtol=0, atol=1e-6)


def test_stochastic_step_draws_monai_noise_and_scores_it_with_an_independent_density() -> None:
    scheduler = _scheduler(set_alpha_to_one=False)
    t = int(scheduler.timesteps[3])
    x, output = torch.randn(SHAPE), torch.randn(SHAPE)
    expected, _ = scheduler.step(output, t, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    ours, log_prob_sum = ddim_step_with_logprob(scheduler, output, t, x, eta=1.0, reduction="sum",
                                                generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # Independent check: the Gaussian's mean is MONAI's η = 0 output, its σ from DDIM eq. 16.
    mean, _ = scheduler.step(output, t, x, eta=0.0)
    prev_t = t - 1000 // 10
    a_t, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t]
    sigma_1 = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    # With η = 1 the mean uses √(1 − ᾱ' − σ²); rebuild it from x0̂ rather than trusting our code.
    eps = output
    x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-1, 1)
    mean_eta1 = a_prev**0.5 * x0 + (1 - a_prev - sigma_1**2) ** 0.5 * eps
    density = torch.distributions.Normal(mean_eta1.double(), sigma_1.double()).log_prob(ours.double())
    torch.testing.assert_close(log_prob_sum.double(), density.sum(dim=(1, 2, 3, 4)), rtol=1e-5, atol=1e-3)
    assert not torch.allclose(mean, mean_eta1)  # η changes the mean, so the check above means something
    _, log_prob_mean = ddim_step_with_logprob(scheduler, output, t, x, eta=1.0, prev_sample=ours, reduction="mean")
    numel = torch.tensor(SHAPE[1:]).prod()
    torch.testing.assert_close(log_prob_mean * numel, log_prob_sum, rtol=1e-5, atol=1e-2)


def test_given_prev_sample_is_scored_not_redrawn() -> None:
    scheduler = _scheduler()
    t = int(scheduler.timesteps[2])
    x, output, target = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    returned, log_prob = ddim_step_with_logprob(scheduler, output, t, x, eta=1.0, prev_sample=target)
    assert returned is target
    close, log_prob_close = ddim_step_with_logprob(scheduler, output, t, x, eta=1.0)
    assert (log_prob_close > log_prob).all()  # a draw from the Gaussian beats unrelated noise


def test_bad_arguments_are_rejected() -> None:
    scheduler = _scheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="reduction"):
        ddim_step_with_logprob(scheduler, x, 0, x, reduction="max")
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, x, 0, x, eta=-1.0)


class _ToyModel(torch.nn.Module):
    """A deterministic 'network' whose output depends on x, t and the label."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        shift = 0.0 if labels is None else labels.float().view(-1, 1, 1, 1, 1) * 0.1
        return 0.5 * x + t.float().view(-1, 1, 1, 1, 1) / 2000 + shift


def test_trajectory_is_consistent_with_its_steps() -> None:
    scheduler = ddim_from_training_schedule(DDPMScheduler(num_train_timesteps=1000), set_alpha_to_one=False)
    noise = torch.randn(SHAPE)
    labels = torch.tensor([0, 1, 1])
    final, trajectory = sample(_ToyModel(), scheduler, noise, labels, num_steps=5, eta=1.0,
                               generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert trajectory.latents.shape == (3, 6, *SHAPE[1:])
    assert trajectory.log_probs.shape == (3, 5) and trajectory.timesteps.shape == (5,)
    assert trajectory.stochastic.all()  # set_alpha_to_one=False keeps even the last step stochastic
    assert torch.equal(trajectory.latents[:, 0], noise) and torch.equal(trajectory.latents[:, -1], final)
    for step, t in enumerate(trajectory.timesteps.tolist()):  # PPO recomputes old log-probs this way
        x_t = trajectory.latents[:, step]
        _, again = ddim_step_with_logprob(scheduler, _ToyModel()(x_t, torch.full((3,), t), labels), t, x_t,
                                          eta=1.0, prev_sample=trajectory.latents[:, step + 1])
        torch.testing.assert_close(again, trajectory.log_probs[:, step])


def test_eta_zero_sampling_matches_monai_loop_and_last_step_is_deterministic() -> None:
    scheduler = _scheduler(steps=8)
    noise, labels = torch.randn(SHAPE), torch.tensor([1, 0, 1])
    ours, trajectory = sample(_ToyModel(), scheduler, noise, labels, num_steps=8, eta=1.0, return_trajectory=True,
                              generator=torch.Generator().manual_seed(1))
    assert trajectory.stochastic[:-1].all() and not trajectory.stochastic[-1]  # ᾱ' = 1 at the end
    deterministic, _ = sample(_ToyModel(), scheduler, noise, labels, num_steps=8, eta=0.0)
    x = noise
    for t in scheduler.timesteps:
        x, _ = scheduler.step(_ToyModel()(x, t.expand(3), labels), int(t), x)
    assert torch.equal(deterministic, x)


def test_classifier_free_guidance_combines_both_passes() -> None:
    scheduler = _scheduler(steps=1)
    noise, labels = torch.randn(SHAPE), torch.tensor([1, 1, 0])
    guided, _ = sample(_ToyModel(), scheduler, noise, labels, num_steps=1, guidance_scale=3.0, null_class=2)
    t = scheduler.timesteps[0]
    model = _ToyModel()
    cond, uncond = model(noise, t.expand(3), labels), model(noise, t.expand(3), torch.full((3,), 2))
    expected, _ = scheduler.step(uncond + 3.0 * (cond - uncond), int(t), noise)
    torch.testing.assert_close(guided, expected)
    with pytest.raises(ValueError, match="null class"):
        sample(_ToyModel(), scheduler, noise, labels, num_steps=1, guidance_scale=3.0)
