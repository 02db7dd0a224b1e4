"""Pretraining then PPO under torchrun, for tests/lightning_modules/test_multinode.py.

Usage: torchrun … multinode_run.py CACHE_DIR OUT_DIR NUM_NODES DEVICES_PER_NODE

torchrun sets RANK/WORLD_SIZE/MASTER_ADDR; Lightning's TorchElasticEnvironment joins that world,
so the same file runs as 2 nodes × 1 process or 1 node × 2 processes. Each rank saves the UNet
weights after pretraining and the policy's after PPO to OUT_DIR/rank<global rank>.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from datamodules import TemplateCohortDataModule
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.ppo.module import PPOFinetuneModule
from rewards import MultiScaleReward
from tests.conftest import TINY_MODEL
from tests.lightning_modules.test_ppo import BrightnessReward


def trainer(num_nodes: int, devices: int, **limits: int) -> L.Trainer:
    """A CPU DDP trainer (gloo) joining torchrun's world."""
    return L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes,
                     strategy=DDPStrategy(process_group_backend="gloo"), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **limits)


if __name__ == "__main__":
    cache, out, num_nodes, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = DiffusionModule(in_channels=1, spatial_size=16, num_classes=2, preview_every_n_epochs=0, lr=1e-3,
                            **TINY_MODEL)
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, batch_size=2,
                                    val_fraction=0.25, test_fraction=0.0)
    pretraining = trainer(num_nodes, devices, max_steps=2)
    pretraining.fit(model, data)
    pretrained = out / "pretrained.ckpt"
    pretraining.save_checkpoint(pretrained)  # every rank calls it; rank 0 writes
    pretraining.strategy.barrier()
    ppo = PPOFinetuneModule(str(pretrained), MultiScaleReward([BrightnessReward()]), num_steps=4,
                            samples_per_iteration=2, iterations_per_epoch=2, lr=1e-3)
    finetuning = trainer(num_nodes, devices, max_epochs=1)
    finetuning.fit(ppo)
    torch.save({"world_size": finetuning.world_size, "node_rank": finetuning.node_rank,
                "pretrained": model.unet.state_dict(), "policy": ppo.policy.unet.state_dict(),
                "iteration": int(ppo.iteration)}, out / f"rank{finetuning.global_rank}.pt")
