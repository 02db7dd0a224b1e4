"""Overwrite one file with ~64 MB checkpoints forever, the way msrl writes (for tests/test_atomic.py).

Usage: python write_forever.py PATH {lightning,cache}
"""

import sys
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import _atomic_save as lightning_save

from datamodules.base import _atomic_save as cache_save

if __name__ == "__main__":
    path, writer = Path(sys.argv[1]), sys.argv[2]
    save = {"lightning": lambda obj: lightning_save(obj, path), "cache": lambda obj: cache_save(obj, path)}[writer]
    version = 0
    while True:
        version += 1
        save({"version": version, "weights": torch.full((16 * 1024 * 1024,), float(version))})
