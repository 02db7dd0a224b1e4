"""Two-process DDP PPO run for tests/lightning_modules/test_ppo_distributed.py; Lightning's launcher re-runs this file.

Usage: python ppo_ddp_run.py PRETRAINED_CKPT OUT_DIR. Each rank saves what it computed.
"""

import sys

import lightning as L
import torch

from lightning_modules.ppo.module import PPOFinetuneModule
from rewards import MultiScaleReward
from tests.lightning_modules.test_ppo import BrightnessReward


class RecordingPPO(PPOFinetuneModule):
    """Keeps every iteration's local rewards, labels and advantages."""

    def compute_advantages(self, rewards: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        advantages = super().compute_advantages(rewards, labels)
        self.records.append({"rewards": rewards.cpu(), "labels": labels.cpu(), "advantages": advantages.cpu()})
        return advantages


if __name__ == "__main__":
    checkpoint, out = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    reward = MultiScaleReward([BrightnessReward()])  # normalised by statistics over both ranks
    module = RecordingPPO(checkpoint, reward, num_steps=5, samples_per_iteration=4,
                          iterations_per_epoch=2, lr=1e-3)
    module.records = []
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    torch.save({"records": module.records, "weights": module.policy.unet.state_dict(),
                "reward_statistics": module.reward.running.state_dict(),
                "iteration": int(module.iteration)}, f"{out}/rank{trainer.global_rank}.pt")
