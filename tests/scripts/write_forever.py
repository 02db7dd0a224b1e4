"""Overwrite one file with ~64 MB checkpoints forever, the way msrl writes (for tests/datamodules/test_atomic.py).

Usage: python write_forever.py PATH {lightning,cache,folder}
("folder": PATH is an output folder of metrics.json + a volume, written like `msrl evaluate` does.)
"""

import json
import sys
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import _atomic_save as lightning_save

from datamodules.atomic import atomic_folder
from datamodules.atomic import atomic_save as cache_save


def folder_save(obj: dict, out: Path) -> None:
    """A volume, then the metrics.json that describes it (msrl evaluate's order), all or nothing."""
    with atomic_folder(out) as staging:
        torch.save(obj["weights"], staging / "volume.pt")
        (staging / "metrics.json").write_text(json.dumps({"version": obj["version"], "records": [0.5] * 100000}))


if __name__ == "__main__":
    path, writer = Path(sys.argv[1]), sys.argv[2]
    save = {"lightning": lambda obj: lightning_save(obj, path), "cache": lambda obj: cache_save(obj, path),
            "folder": lambda obj: folder_save(obj, path)}[writer]
    version = 0
    while True:
        version += 1
        save({"version": version, "weights": torch.full((16 * 1024 * 1024,), float(version))})
