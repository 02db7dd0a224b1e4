"""Helpers shared by the loaders of public releases: finding the release folder, the root setting."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def resolve_root(root: str | Path | None, env_var: str, dataset: str, example: str) -> Path:
    """The data set's folder from the setting, else from `env_var`; a clear error if neither.

    Args:
        root: the configured folder, or None.
        env_var: environment variable read when `root` is None (e.g. MSRL_BRATS2019_ROOT).
        dataset: name used in the message.
        example: what the folder usually is called, for the message.
    """
    value = root if root is not None else os.environ.get(env_var)
    if not value:
        raise ValueError(f"{dataset}: root is not set: pass --data.init_args.root /path/to/{example} "
                         f"or set {env_var}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: root {path} is not a folder (from "
                                f"{'the root setting' if root is not None else env_var})")
    return path


def find_release_folder(root: Path, holds: Callable[[Path], bool], depth: int, expected: str) -> Path:
    """`root` or the first folder below it (breadth-first, `depth` levels) for which `holds` is true.

    Users unpack archives into an extra folder of the same name; this finds the real one.
    """
    level = [root]
    for _ in range(depth + 1):
        for folder in level:
            if holds(folder):
                return folder
        level = sorted(child for folder in level for child in folder.iterdir() if child.is_dir())
    raise FileNotFoundError(f"{root}: found no folder holding {expected} in it or up to {depth} levels below")
