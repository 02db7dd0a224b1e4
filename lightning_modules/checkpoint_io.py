"""Checkpoint contents: safe reading (tensors and plain data only, never code) and RNG states."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects that only a full unpickler could build (and might run code)."""


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with errors that name the file and say what happened.

    A file that asks for anything beyond tensors and plain containers (a crafted pickle, or a
    checkpoint holding whole Python objects) is refused before any of it is built.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data, which "
            f"loading would have to execute (weights_only=True). Only load files you trust; "
            f"msrl writes none of these. Detail: {str(exc).splitlines()[0]}") from exc
    except (EOFError, RuntimeError, OSError) as exc:
        raise ValueError(f"checkpoint {path} could not be read (truncated or not a checkpoint): {exc}") from exc


def random_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain data."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def restore_random_states(states: dict[str, Any]) -> None:
    """Undo `random_states()`: the noise, timesteps and shuffles continue as if never interrupted."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype("uint32"), numpy["position"], numpy["has_gauss"],
                         numpy["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


RANDOM_STATES_KEY = "msrl_rng"  # where a checkpoint keeps `random_states()`


def save_random_states(checkpoint: dict[str, Any]) -> None:
    """Put this process's RNG states into a checkpoint (an `on_save_checkpoint` hook's job)."""
    checkpoint[RANDOM_STATES_KEY] = random_states()


def resume_random_states(checkpoint: dict[str, Any]) -> None:
    """Restore the RNG states a checkpoint carries, if it carries any (an `on_load_checkpoint` hook's job)."""
    if RANDOM_STATES_KEY in checkpoint:
        restore_random_states(checkpoint[RANDOM_STATES_KEY])
