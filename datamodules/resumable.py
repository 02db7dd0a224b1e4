"""Training loaders that a mid-epoch checkpoint can restore to the exact batch.

Lightning saves the `state_dict()` of every training loader that has one into the checkpoint
(`_FitLoop.on_save_checkpoint`) and hands it back before the resumed run iterates
(`load_state_dict`); without it, resuming from a checkpoint written inside an epoch (SLURM's
SIGUSR1, `every_n_train_steps`) starts that epoch over in a new order. `ResumableLoader` records
(epoch, batches handed out) and, on resume, skips the batches already trained on as index lists,
without reading their volumes.

The order of an epoch is a function of (seed, epoch) only, as in `DistributedSampler` (which
Lightning puts in its place under DDP), and the loader draws its workers' seeds from its own
generator: iterating a loader never moves the global RNG that the restored training continues on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler


class ResumableBatchSampler(BatchSampler):
    """A `BatchSampler` whose next epoch can start part-way: `skip` batches are dropped as indices.

    The constructor is `BatchSampler`'s, so Lightning can rebuild it around a `DistributedSampler`.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        batches = super().__iter__()
        for _ in range(skip):
            next(batches, None)
        yield from batches


class ResumableLoader(DataLoader):
    """A `DataLoader` with `state_dict`/`load_state_dict` for Lightning's mid-epoch restore.

    Args:
        dataset: a map-style data set.
        batch_size: items per batch.
        shuffle: a new order every epoch, drawn from (seed, epoch).
        seed: seed of the order and of the workers' base seeds; None: `seed_everything`'s
            (PL_GLOBAL_SEED, as Lightning gives the `DistributedSampler` it uses under DDP).
        sampler: only for Lightning's re-instantiation; leave None.
        batch_sampler: only for Lightning's re-instantiation (under DDP); leave None.
        drop_last: drop a last, smaller batch.
        **kwargs: any other `DataLoader` argument (num_workers, persistent_workers, collate_fn, …).
    """

    def __init__(self, dataset: Any, batch_size: int = 1, shuffle: bool = False, seed: int | None = None,
                 sampler: Sampler[int] | None = None, batch_sampler: BatchSampler | None = None,
                 drop_last: bool = False, **kwargs: Any) -> None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        if batch_sampler is None:
            if sampler is None:  # one process: the same seed+epoch order that DistributedSampler gives
                sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
            batch_sampler = ResumableBatchSampler(sampler, batch_size, drop_last)
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._position: list[int] | None = None  # [epoch, batches handed out in it]
        self._resume: tuple[int, int] | None = None

    def _epoch(self) -> int:
        return int(getattr(self.batch_sampler.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:
        # The workers start (and read the sampler's epoch) at the first batch, not here: Lightning
        # creates the iterator before it calls `set_epoch` for a resumed epoch.
        def batches() -> Iterator[Any]:
            epoch, skip = self._epoch(), 0
            if self._resume is not None and self._resume[0] == epoch:
                skip = self._resume[1]
            self._resume = None
            self.batch_sampler.skip = skip
            self._position = [epoch, skip]
            for batch in DataLoader.__iter__(self):
                self._position[1] += 1
                yield batch

        return batches()

    def state_dict(self) -> dict[str, int]:
        """Where training is: the epoch and how many of its batches were handed out."""
        if self._position is not None:
            epoch, consumed = self._position
        else:
            epoch, consumed = self._resume if self._resume is not None else (self._epoch(), 0)
        if consumed >= len(self.batch_sampler):
            epoch, consumed = epoch + 1, 0  # a finished epoch: the next one starts from its beginning
        return {"epoch": epoch, "batches": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at `state`'s batch when that epoch is iterated next (a later epoch starts at 0)."""
        missing = {"epoch", "batches"} - set(state)
        if missing:
            raise ValueError(f"the checkpoint's data-loader state lacks {sorted(missing)}; it has {sorted(state)}")
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self._position = None
        sampler = self.batch_sampler.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self._resume[0])
