"""Per-timestep loss weights: with `timestep_weighting: equal` every DDIM step has the same gradient scale."""

from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from lightning_modules.diffusion.sampling import ddim_step_mean, gaussian_log_prob
from lightning_modules.ppo.module import PPOFinetuneModule
from lightning_modules.ppo.update import equal_gradient_weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_weighted_log_prob_gradients_are_equal_across_timesteps(prediction_type: str) -> None:
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(20)
    timesteps = [int(t) for t in scheduler.timesteps[:-1]]  # the stochastic steps (the last one has σ = 0)
    weights = equal_gradient_weights(scheduler, timesteps, eta=1.0)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 1, 4, 4, 4, generator=generator)
    z = torch.randn(2, 1, 4, 4, 4, generator=generator)
    norms = []
    for t in timesteps:
        output = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        mean, std, _ = ddim_step_mean(scheduler, output, t, x_t, eta=1.0)
        x_prev = (mean + std * z).detach()  # the step taken: the same standard-normal draw at every t
        gaussian_log_prob(x_prev, mean, std, "mean").sum().backward()
        norms.append(float(output.grad.norm()))
    raw = torch.tensor(norms)
    weighted = raw * weights
    assert float(raw.max() / raw.min()) > 5  # unweighted, the last stochastic step dominates (10x on this schedule)
    torch.testing.assert_close(weighted, torch.full_like(weighted, float(weighted.mean())), rtol=1e-4, atol=0)
    assert float(weights.mean()) == pytest.approx(1.0)


def test_equal_weighting_changes_the_update_and_bad_values_are_refused(pretrained_checkpoint: Path) -> None:
    import lightning as L

    from tests.lightning_modules.test_ppo import BrightnessReward

    weights = {}
    for weighting in ("none", "equal"):
        torch.manual_seed(0)
        module = PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), num_steps=4, samples_per_iteration=4,
                                   micro_batch_size=4, iterations_per_epoch=1, lr=1e-3, timestep_weighting=weighting)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module)
        weights[weighting] = torch.cat([p.detach().flatten() for p in module.policy.unet.parameters()])
    assert not torch.equal(weights["none"], weights["equal"])  # same rollouts, differently weighted steps
    with pytest.raises(ValueError, match="timestep_weighting"):
        PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), timestep_weighting="sigma")
