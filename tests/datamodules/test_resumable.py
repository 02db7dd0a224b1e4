"""Mid-epoch resume: the loader continues at the batch after the checkpoint, the run ends bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from datamodules import TemplateCohortDataModule
from datamodules.resumable import ResumableLoader
from lightning_modules.critics.networks import ClassifierModule
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.first_stage.vqgan import AutoencoderModule
from tests.conftest import TINY_AUTOENCODER, TINY_MODEL, tiny_training


def _epoch(loader: ResumableLoader, epoch: int, stop: int | None = None) -> list[int]:
    loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    seen = []
    for batch in loader:
        seen += batch.tolist()
        if stop is not None and len(seen) >= stop:
            break
    return seen


def test_the_order_depends_on_seed_and_epoch_only() -> None:
    first, second = ResumableLoader(range(10), batch_size=2, shuffle=True, seed=3), ResumableLoader(
        range(10), batch_size=2, shuffle=True, seed=3)
    assert _epoch(first, 0) == _epoch(second, 0) and sorted(_epoch(first, 1)) == list(range(10))
    assert _epoch(first, 0) != _epoch(first, 1)
    assert _epoch(ResumableLoader(range(10), batch_size=2), 4) == list(range(10))  # no shuffle: in order
    before = torch.get_rng_state()
    _epoch(ResumableLoader(range(10), batch_size=2, shuffle=True, num_workers=1), 0)
    assert torch.equal(torch.get_rng_state(), before)  # the training's own random stream is untouched


def test_a_restored_loader_continues_with_the_next_batch_even_twice_in_one_epoch() -> None:
    whole = _epoch(ResumableLoader(range(12), batch_size=3, shuffle=True, seed=1), 2)
    killed = ResumableLoader(range(12), batch_size=3, shuffle=True, seed=1)
    assert _epoch(killed, 2, stop=3) == whole[:3]
    state = killed.state_dict()
    assert state == {"epoch": 2, "batches": 1}
    again = ResumableLoader(range(12), batch_size=3, shuffle=True, seed=1)
    again.load_state_dict(state)
    assert again.state_dict() == state  # a checkpoint written before the first batch keeps the position
    assert _epoch(again, 2, stop=3) == whole[3:6]
    third = ResumableLoader(range(12), batch_size=3, shuffle=True, seed=1)
    third.load_state_dict(again.state_dict())
    assert again.state_dict() == {"epoch": 2, "batches": 2} and _epoch(third, 2) == whole[6:]
    assert third.state_dict() == {"epoch": 3, "batches": 0}  # a finished epoch: the next starts at 0
    assert _epoch(third, 3) == _epoch(ResumableLoader(range(12), batch_size=3, shuffle=True, seed=1), 3)


def test_a_position_from_another_epoch_is_not_applied() -> None:
    loader = ResumableLoader(range(8), batch_size=2)
    loader.load_state_dict({"epoch": 0, "batches": 3})
    assert _epoch(loader, 1) == list(range(8))
    with pytest.raises(ValueError, match="lacks \\['batches'\\]"):
        loader.load_state_dict({"epoch": 0})


class _Record(Callback):
    """A fingerprint of the weights after every step, and an interruption after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.weights: dict[int, float] = {}
        self.stop_after = stop_after

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.weights[trainer.fit_loop.total_batch_idx + 1] = sum(float(p.double().sum()) for p in
                                                                 pl_module.parameters())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.stop_after is not None and trainer.fit_loop.total_batch_idx >= self.stop_after:
            raise _Killed  # after the checkpoint of batch `stop_after` (checkpoint callbacks run last)


class _Killed(Exception):
    """The run stopped from outside, as a node failure or a time limit would."""


def _diffusion() -> L.LightningModule:
    return DiffusionModule(in_channels=1, spatial_size=16, num_classes=2, preview_every_n_epochs=0, lr=1e-3,
                           warmup_steps=2, **TINY_MODEL)


def _autoencoder() -> L.LightningModule:  # random 12³ crops: the restored RNG must replay them
    return AutoencoderModule(training=tiny_training(lr=3e-3, train_crop_size=12), **TINY_AUTOENCODER)


def _classifier() -> L.LightningModule:  # random flips and dropout
    return ClassifierModule(in_channels=1, spatial_size=16, num_classes=2, channels=(8, 8))


def _fit(build: Callable[[], L.LightningModule], cache: Path, root: Path, record: _Record,
         ckpt_path: Path | None = None, checkpoint_every: int | None = None) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    model = build()
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, batch_size=2,
                                    val_fraction=0.25, test_fraction=0.0)
    callbacks: list[Callback] = [record]
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(root, filename="batch{step}", every_n_train_steps=checkpoint_every,
                                         save_top_k=-1, auto_insert_metric_name=False))
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, default_root_dir=root, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("build", [_diffusion, _autoencoder, _classifier],
                         ids=["pretrain", "autoencoder", "classifier"])
def test_training_resumed_inside_an_epoch_ends_as_if_never_stopped(build: Callable[[], L.LightningModule],
                                                                   cohort_cache: Path, tmp_path: Path) -> None:
    whole = _Record()
    reference = _fit(build, cohort_cache, tmp_path / "whole", whole)
    assert sorted(whole.weights) == list(range(1, 10))  # 3 epochs of 3 batches
    killed = _Record(stop_after=5)  # epoch 1, after its second batch
    with pytest.raises(_Killed):
        _fit(build, cohort_cache, tmp_path / "run", killed, checkpoint_every=reference.global_step // 9 * 5)
    (checkpoint,) = (tmp_path / "run").glob("batch*.ckpt")
    resumed = _Record()
    trainer = _fit(build, cohort_cache, tmp_path / "run", resumed, ckpt_path=checkpoint)
    assert sorted(resumed.weights) == list(range(6, 10))  # the rest of epoch 1, then epoch 2
    assert {**killed.weights, **resumed.weights} == whole.weights  # the same trajectory, bit for bit
    for name, tensor in reference.lightning_module.state_dict().items():  # weights, EMA, counters
        torch.testing.assert_close(trainer.lightning_module.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    for after, before in zip(trainer.optimizers, reference.optimizers, strict=True):
        for key, moments in before.state_dict()["state"].items():
            for name, value in moments.items():
                torch.testing.assert_close(after.state_dict()["state"][key][name], value, rtol=0, atol=0)
    assert [c.scheduler.get_last_lr() for c in trainer.lr_scheduler_configs] == [
        c.scheduler.get_last_lr() for c in reference.lr_scheduler_configs]
