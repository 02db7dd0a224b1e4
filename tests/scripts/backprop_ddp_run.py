"""Reward backpropagation for tests/lightning_modules/test_backprop_distributed.py: 2 DDP processes, or 1 with
the whole batch; Lightning's launcher re-runs this file.

Usage: python backprop_ddp_run.py PRETRAINED_CKPT OUT_FILE DEVICES. Rank 0 saves the UNet's weights and the
first iteration's gradients (as DDP averaged them, before the optimiser step).
"""

import sys

import lightning as L
import torch

from lightning_modules.backprop.module import RewardBackpropModule
from tests.lightning_modules.test_ppo import BrightnessReward


class RecordingBackprop(RewardBackpropModule):
    """Keeps the gradients of the first optimiser step."""

    def clip_and_step(self, optimizer):
        if not hasattr(self, "first_gradients"):
            self.first_gradients = {n: p.grad.clone() for n, p in self.policy.unet.named_parameters()
                                    if p.grad is not None}
        return super().clip_and_step(optimizer)


if __name__ == "__main__":
    checkpoint, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = RecordingBackprop(checkpoint, BrightnessReward(), samples_per_iteration=4 // devices, num_steps=3,
                                  backprop_steps=2, iterations_per_epoch=2, lr=1e-3, max_grad_norm=100.0,
                                  image_every_n_iterations=0)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module)
    if trainer.global_rank == 0:
        torch.save({"weights": module.policy.unet.state_dict(), "gradients": module.first_gradients,
                    "iteration": int(module.iteration)}, out)
