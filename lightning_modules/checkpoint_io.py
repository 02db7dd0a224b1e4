"""Checkpoint contents: safe reading (tensors and plain data only, never code), rebuilding a module, RNG states.

Every msrl model that is read back from a checkpoint (the diffusion model in `msrl sample` and PPO,
the frozen first stage, the reward networks) goes through `load_weights` and `rebuild_module`.
"""

from __future__ import annotations

import importlib
import pickle
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from datamodules.random_state import random_states, restore_random_states
from lightning_modules.lightning_internals import own_hyperparameters

ModuleType = TypeVar("ModuleType", bound=nn.Module)

# Dotted class names that checkpoints written before the layers of docs/design.md name, and the
# public names that replace them (first-stage checkpoints record their class; the rest are kept so
# that any recorded name resolves).
MOVED_CLASSES = {
    "lightning_modules.autoencoder.AutoencoderModule": "lightning_modules.AutoencoderModule",
    "lightning_modules.autoencoder_kl.KLAutoencoderModule": "lightning_modules.KLAutoencoderModule",
    "lightning_modules.first_stage.FirstStageModule": "lightning_modules.FirstStageModule",
    "lightning_modules.diffusion.DiffusionModule": "lightning_modules.DiffusionModule",
    "lightning_modules.ppo.PPOFinetuneModule": "lightning_modules.PPOFinetuneModule",
    "lightning_modules.critics.RewardNetworkModule": "lightning_modules.RewardNetworkModule",
    "lightning_modules.critics.RealismCriticModule": "lightning_modules.RealismCriticModule",
    "lightning_modules.critics.ClassifierModule": "lightning_modules.ClassifierModule",
    "datamodules.realism.RealismDataModule": "lightning_modules.RealismDataModule",
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects that only a full unpickler could build (and might run code)."""


def not_a_checkpoint(path: Path) -> str | None:
    """What the file is when it cannot be a `torch.save` file (None when it may be one).

    torch.save writes a zip archive (b"PK") or, before PyTorch 1.6 and in many released weight files,
    a pickle (b"\\x80"); anything else would otherwise surface as a confusing unpickling error.
    """
    with open(path, "rb") as handle:
        head = handle.read(348)
    if not head:
        return "an empty file"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return None
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data (a NIfTI .nii.gz image?)"
    if len(head) == 348 and int.from_bytes(head[:4], "little") == 348:
        return "a NIfTI image"
    return "binary data of an unknown format" if b"\x00" in head else "a text file"


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with errors that name the file and say what happened.

    A file that asks for anything beyond tensors and plain containers (a crafted pickle, or a
    checkpoint holding whole Python objects) is refused before any of it is built.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    what = not_a_checkpoint(path)
    if what is not None:
        raise ValueError(f"{path} is not a checkpoint: it is {what} (expected a .ckpt/.pt/.pth written by "
                         "torch.save, e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data, which "
            f"loading would have to execute (weights_only=True). Only load files you trust; "
            f"msrl writes none of these. Detail: {str(exc).splitlines()[0]}") from exc
    except (EOFError, RuntimeError, OSError) as exc:
        raise ValueError(f"checkpoint {path} could not be read (truncated or not a checkpoint): {exc}") from exc


RANDOM_STATES_KEY = "msrl_rng"  # where a checkpoint keeps `random_states()`
VERSION_KEY = "msrl_version"  # the msrl release that wrote a checkpoint (msrl --version, CHANGELOG.md)


def save_random_states(checkpoint: dict[str, Any]) -> None:
    """Put this process's RNG states and msrl's version into a checkpoint (an `on_save_checkpoint` hook's job)."""
    checkpoint[RANDOM_STATES_KEY] = random_states()
    checkpoint[VERSION_KEY] = msrl_version()


def msrl_version() -> str:
    """The installed msrl release (CHANGELOG.md), "unknown" when the package is not installed."""
    try:
        return metadata.version("msrl")
    except metadata.PackageNotFoundError:
        return "unknown"


def resume_random_states(checkpoint: dict[str, Any]) -> None:
    """Restore the RNG states a checkpoint carries, if it carries any (an `on_load_checkpoint` hook's job)."""
    if RANDOM_STATES_KEY in checkpoint:
        restore_random_states(checkpoint[RANDOM_STATES_KEY])


def resolve_class(class_path: Any, base: type[ModuleType], path: str | Path) -> type[ModuleType]:
    """The class a checkpoint names (old names through `MOVED_CLASSES`), refused unless it is a `base`."""
    module_name, _, name = MOVED_CLASSES.get(str(class_path), str(class_path)).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name, None) if module_name else None
    except ImportError:
        found = None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ValueError(f"checkpoint {path} names class {class_path!r}, which is not a {base.__name__} "
                         "(or subclass of it) that this installation provides")
    return found


def public_class_path(model_class: type) -> str:
    """`lightning_modules.<Name>` where the package exports the class (checkpoints record it), else its module path."""
    package = importlib.import_module("lightning_modules")
    if getattr(package, model_class.__name__, None) is model_class:
        return f"lightning_modules.{model_class.__name__}"
    return f"{model_class.__module__}.{model_class.__qualname__}"


def rebuild_module(model_class: type[ModuleType], arguments: dict[str, Any], state_dict: dict[str, torch.Tensor],
                   prefix: str = "") -> ModuleType:
    """`model_class(**arguments)` with the weights under `prefix` of a checkpoint's state dict loaded.

    The module records its own arguments even when built inside another one while LightningCLI
    instantiates that (`own_hyperparameters`).
    """
    with own_hyperparameters():
        model = model_class(**arguments)
    model.load_state_dict({key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)})
    return model
