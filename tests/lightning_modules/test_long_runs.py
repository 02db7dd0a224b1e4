"""Long PPO runs keep their memory: nothing (trajectories, images, graphs) accumulates."""

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_modules.ppo.module import PPOFinetuneModule
from tests.lightning_modules.test_ppo import BrightnessReward


def _resident_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    import os

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Memory(L.Callback):
    def __init__(self) -> None:
        self.after: dict[int, int] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: PPOFinetuneModule, *args) -> None:
        self.after[int(module.iteration)] = _resident_bytes()


@pytest.mark.slow
def test_memory_after_50_iterations_stays_within_10_percent_of_5(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    module = PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), num_steps=6, samples_per_iteration=2,
                               iterations_per_epoch=10, image_every_n_iterations=2, lr=1e-4)
    memory = _Memory()
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=TensorBoardLogger(tmp_path), callbacks=[memory],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert memory.after[50] <= 1.10 * memory.after[5], {k: v // 2**20 for k, v in memory.after.items()}
