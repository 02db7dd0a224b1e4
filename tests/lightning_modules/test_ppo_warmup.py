"""PPO's learning-rate warm-up: the first iterations step with lr·i/k, later ones with lr."""

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_modules.ppo.module import PPOFinetuneModule


class MeanReward(torch.nn.Module):
    """Brighter is better."""

    name = "mean"

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return volumes.float().mean(dim=(1, 2, 3, 4))


def test_optimiser_steps_with_the_warmed_up_lr(pretrained_checkpoint: Path) -> None:
    module = PPOFinetuneModule(str(pretrained_checkpoint), MeanReward(), num_steps=2, samples_per_iteration=4,
                               micro_batch_size=2, iterations_per_epoch=2, lr=1e-3, lr_warmup_iterations=2)
    seen: list[float] = []

    class Spy(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.optimizers[0].register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()])
    trainer.fit(module)
    # two optimiser steps per iteration (4 samples, micro-batches of 2): iteration 1 at lr/2, iteration 2 at lr
    assert seen == pytest.approx([5e-4, 5e-4, 1e-3, 1e-3])
    assert float(trainer.logged_metrics["ppo/lr"]) == pytest.approx(1e-3)


@pytest.mark.parametrize("warmup, expected", [(0, [1.0, 1.0, 1.0, 1.0, 1.0]), (4, [0.25, 0.5, 0.75, 1.0, 1.0])])
def test_lr_ramps_linearly_then_stays(pretrained_checkpoint: Path, warmup: int, expected: list[float]) -> None:
    module = PPOFinetuneModule(str(pretrained_checkpoint), MeanReward(), lr=2e-4, lr_warmup_iterations=warmup)
    lrs = []
    for iteration in range(5):
        module.iteration.fill_(iteration)  # iterations done so far; the next one is iteration + 1
        lrs.append(module.current_lr())
    assert lrs == pytest.approx([2e-4 * e for e in expected])


def test_negative_warmup_is_refused(pretrained_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="lr_warmup_iterations must be >= 0"):
        PPOFinetuneModule(str(pretrained_checkpoint), MeanReward(), lr_warmup_iterations=-1)
