"""Trainer callbacks that every training verb needs: SLURM preemption served at a step boundary."""

from lightning_modules.callbacks.preemption import StepBoundaryRequeue

__all__ = ["StepBoundaryRequeue"]
