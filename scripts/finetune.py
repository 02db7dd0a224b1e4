"""Entry script of `msrl finetune` for launchers that start one process per device.

    fabric run --accelerator cuda --devices 8 scripts/finetune.py -c configs/finetune/base.yaml \
        -c configs/finetune/brats2019.yaml …
    torchrun --nproc_per_node 8 scripts/finetune.py -c …

`fabric run` (Lightning's successor of `lightning run model`) starts the processes through
torchrun; the Trainer joins that world through Lightning's TorchElastic environment instead of
spawning its own. This script turns the launcher's settings (LOCAL_WORLD_SIZE, WORLD_SIZE and
fabric's LT_ACCELERATOR) into the matching Trainer options, unless they are given explicitly.
"""

import os
import sys

from msrl.cli import main


def launcher_options(argv: list[str]) -> list[str]:
    """Trainer options that match the processes the launcher started."""
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return []
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ.get("WORLD_SIZE", "1"))
    given = " ".join(argv)
    # no strategy: the config's (DDP with its process-group timeout), or Lightning's DDP for "auto"
    options = {"--trainer.devices": str(local), "--trainer.num_nodes": str(max(world // local, 1))}
    accelerator = os.environ.get("LT_ACCELERATOR")
    if accelerator:
        options["--trainer.accelerator"] = {"cuda": "gpu"}.get(accelerator, accelerator)
    return [item for key, value in options.items() if key not in given for item in (key, value)]


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(["finetune", *arguments, *launcher_options(arguments)])
