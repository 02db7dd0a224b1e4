"""The global random generators' state: read, restore, and leave untouched around work that varies.

Python's, NumPy's and torch's (CPU and CUDA) global generators drive weight initialisation,
dropout, noise and shuffles. Work whose amount depends on what exists on disk (preprocessing a
cold cache, sampling volumes that are not cached yet) runs inside `unchanged_random_state()`, so
a run draws the same numbers whether or not the cache was there (docs/design.md §1). The same
states go into checkpoints, so that a resumed run continues the interrupted one's streams.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def random_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain data."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def restore_random_states(states: dict[str, Any]) -> None:
    """Undo `random_states()`: the noise, timesteps and shuffles continue as if never interrupted."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype("uint32"), numpy["position"], numpy["has_gauss"],
                         numpy["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


@contextmanager
def unchanged_random_state() -> Iterator[None]:
    """Run the body, then put every global generator back where it was (also when the body raises)."""
    states = random_states()
    try:
        yield
    finally:
        restore_random_states(states)
