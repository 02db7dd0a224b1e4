"""The pretraining pair: a `DiffusionModule` step through Lightning's Trainer against a hand-written loop.

Also the pieces every benchmark shares: the device's autocast and synchronisation, a quiet
Trainer, a callback that stamps training batches, and batches of random volumes.

The hand-written loop is what a researcher would write without msrl for the same training: the
same MONAI UNet (same weights at the start), batch, AdamW, warm-up schedule, EMA, v-prediction
target and label dropout, in the same precision. What msrl adds on top (the Trainer's loop and
hooks, logging, the non-finite-loss check) is what the ratio measures.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from benchmarks.settings import BenchConfig, Device, Net, Precision
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.diffusion.noise_schedules import default_noise_scheduler

NUM_CLASSES = 2  # every benchmark model is class-conditional with two classes, as the demo's


def autocast(device: Device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16-mixed" (what Lightning's precision plugin does), else nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchroniser(device: Device) -> Callable[[], None]:
    """A function that waits for the device's queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def diffusion_module(net: Net, **overrides: Any) -> DiffusionModule:
    """A class-conditional `DiffusionModule` of this size, previews off."""
    return DiffusionModule(in_channels=1, spatial_size=net.spatial_size, num_classes=NUM_CLASSES,
                           preview_every_n_epochs=0, **net.module_kwargs(), **overrides)


class RandomVolumes(Dataset):
    """`count` fixed random volumes [1, S, S, S] in [-1, 1] with alternating labels, as a data module yields them."""

    def __init__(self, spatial_size: int, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand((count, 1, spatial_size, spatial_size, spatial_size), generator=generator) * 2 - 1
        self.labels = torch.arange(count) % NUM_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def volume_loader(net: Net, batch_size: int) -> DataLoader:
    """Shuffled batches {"image": [B, 1, S, S, S], "label": [B]} of four batches' worth of volumes."""
    return DataLoader(RandomVolumes(net.spatial_size, 4 * batch_size), batch_size=batch_size, shuffle=True,
                      drop_last=True)


def quiet_trainer(config: BenchConfig, callbacks: list[L.Callback], **limits: Any) -> L.Trainer:
    """A Trainer as a run would use it, minus console and disk output (no logger, bar, checkpoints)."""
    return L.Trainer(accelerator="gpu" if config.device == "cuda" else "cpu", devices=1, precision=config.precision,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **limits)


class BatchStamps(L.Callback):
    """Wall-clock stamps at the start of every training batch and at the end of the last one."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.starts: list[float] = []
        self.end = math.nan

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.sync()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.sync()
        self.end = time.perf_counter()

    def seconds_from(self, batch: int) -> float:
        """Seconds from the start of batch `batch` to the end of the last batch."""
        return self.end - self.starts[batch]


def lightning_steps(module: DiffusionModule, config: BenchConfig) -> Callable[[], float]:
    """A: one fit of 1 + `pretrain_steps` steps; seconds per step after the first.

    The first step of a fit (AdamW's state, the data loader's first batch) is left out, as are
    the fit's set-up and tear-down: what a long run pays per step is the loop's steady state.
    """
    loader = volume_loader(module_net(module), config.pretrain_batch)

    def run() -> float:
        stamps = BatchStamps(synchroniser(config.device))
        quiet_trainer(config, [stamps], max_steps=1 + config.pretrain_steps).fit(module, loader)
        return stamps.seconds_from(1) / config.pretrain_steps

    return run


def module_net(module: DiffusionModule) -> Net:
    """The `Net` a `DiffusionModule` was built with."""
    hp = module.hparams
    return Net(hp.spatial_size, tuple(hp.channels), tuple(hp.attention_levels), hp.norm_num_groups,
               hp.num_head_channels, hp.num_res_blocks)


class HandWrittenTraining:
    """B: the plain PyTorch + MONAI loop of the same training (see the module docstring).

    Args:
        module: the `DiffusionModule` whose UNet architecture and initial weights to copy.
        config: device, precision, batch and the steps per repetition.
        warmup_steps: linear learning-rate warm-up, as `DiffusionModule`'s default.
    """

    def __init__(self, module: DiffusionModule, config: BenchConfig, warmup_steps: int = 100) -> None:
        hp, net = module.hparams, module_net(module)
        self.config = config
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=1, out_channels=1, channels=net.channels,
            attention_levels=net.attention_levels, num_res_blocks=net.num_res_blocks,
            num_head_channels=net.num_head_channels, norm_num_groups=net.norm_num_groups,
            num_class_embeds=NUM_CLASSES + 1).to(config.device)
        self.unet.load_state_dict(module.unet.state_dict())
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(hp.ema_decay), use_buffers=True)
        self.scheduler = default_noise_scheduler()
        self.cfg_dropout = hp.cfg_dropout
        self.batches = self._forever(volume_loader(net, config.pretrain_batch))

    @staticmethod
    def _forever(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
        for _ in itertools.count():
            yield from loader

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """One optimiser step of the DDPM v-prediction loss."""
        device = self.config.device
        images, labels = batch["image"].to(device), batch["label"].to(device)
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (images.shape[0],), device=device)
        noisy = self.scheduler.add_noise(images, noise, timesteps)
        target = self.scheduler.get_velocity(images, noise, timesteps)
        drop = torch.rand(images.shape[0], device=device) < self.cfg_dropout
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)  # the null class
        with autocast(device, self.config.precision):
            prediction = self.unet(noisy, timesteps, class_labels=labels)
        loss = F.mse_loss(prediction.float(), target.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.ema.update_parameters(self.unet)

    def __call__(self) -> float:
        """`pretrain_steps` steps; seconds per step."""
        sync = synchroniser(self.config.device)
        sync()
        start = time.perf_counter()
        for _ in range(self.config.pretrain_steps):
            self.step(next(self.batches))
        sync()
        return (time.perf_counter() - start) / self.config.pretrain_steps
