"""SLURM preemption at a step boundary, so that the requeued job continues bit for bit.

Lightning's SLURM connector saves `hpc_ckpt_<n>.ckpt` and requeues the job from inside its SIGUSR1
handler, which Python runs between any two bytecodes of the training loop: in the middle of
AdamW's update of the parameter list, between the optimiser step and the EMA update, or inside a
PPO iteration. A checkpoint taken there mixes two steps. `StepBoundaryRequeue` holds the signal
and hands it to Lightning's own handler after the step (or the validation) in which it arrived,
when weights, optimiser, EMA, counters, RNG and the data-loader position describe the same step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class StepBoundaryRequeue(Callback):
    """Defers Lightning's SIGUSR1 save-and-requeue to the end of the current training step.

    Inactive unless Lightning installed a SIGUSR1 handler (a SLURM job with auto-requeue). Under
    DDP the ranks agree at every step whether any of them got the signal, so all of them save the
    same step (one boolean all-reduce per step, only in SLURM jobs).
    """

    def __init__(self) -> None:
        self._lightning_handler: Callable[[int, FrameType | None], Any] | None = None
        self._pending = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the holding handler in front of Lightning's (installed by now, in `Trainer._run`)."""
        handler = signal.getsignal(signal.SIGUSR1)
        if not callable(handler) or handler == self._hold:
            return
        self._lightning_handler = handler
        signal.signal(signal.SIGUSR1, self._hold)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._pending = True
        log.info("SIGUSR1 received: the checkpoint and requeue follow at the end of this step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After the optimiser step, the EMA update and the loop's counters: the state of one step."""
        self._release(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal during a long validation is served when it ends, not a whole step later."""
        if not trainer.sanity_checking:
            self._release(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Give SIGUSR1 back to Lightning (its teardown then restores the original handler)."""
        if self._lightning_handler is not None and signal.getsignal(signal.SIGUSR1) == self._hold:
            signal.signal(signal.SIGUSR1, self._lightning_handler)
        self._lightning_handler = None

    def _release(self, trainer: L.Trainer) -> None:
        if self._lightning_handler is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._pending, all=False):
            return
        self._pending = False
        self._lightning_handler(signal.SIGUSR1, None)
