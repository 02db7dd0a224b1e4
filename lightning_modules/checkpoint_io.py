"""Reading checkpoints safely: tensors and plain data only, never code (`weights_only=True`)."""

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
