"""The `msrl` console script: one verb per job, listed in one table.

Every verb is a module in `msrl.commands` with `main(argv)`. The training verbs are LightningCLI
runs of YAML configs (`-c` repeatable, `--print_config`); the others parse their options with
`msrl.commands.command_parser`, whose `-c` likewise reads a YAML of the verb's options.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from importlib.metadata import version

# verb: (module:function run with the verb's arguments, one line of help)
VERBS: dict[str, tuple[str, str]] = {
    "pretrain": ("msrl.commands.training:run_pretrain", "pretrain a 3D DiffusionModule (LightningCLI fit)"),
    "train-autoencoder": ("msrl.commands.training:run_train_autoencoder",
                          "train the 3D VQ-GAN (or KL) first stage of latent diffusion (LightningCLI fit)"),
    "train-reward": ("msrl.commands.training:run_train_reward",
                     "train a reward network: realism critics, classifier, segmenter (LightningCLI fit)"),
    "train-extractor": ("msrl.commands.training:run_train_extractor",
                        "train the self-supervised 3D encoder of the in-domain FID, no labels (LightningCLI fit)"),
    "train-controlnet": ("msrl.commands.training:run_train_controlnet",
                         "lesion-mask conditioning (ControlNet) of a frozen pretrained model (LightningCLI fit)"),
    "finetune": ("msrl.commands.training:run_finetune",
                 "PPO or reward backpropagation of a pretrained model against a reward (LightningCLI fit)"),
    "sample": ("msrl.commands.sample:main",
               "draw volumes (with a ControlNet: volumes for lesion masks) into NIfTI files"),
    "evaluate": ("msrl.commands.evaluate:main",
                 "paired FID/KID/MMD, utility, fidelity, segmentation -> metrics.json/.md"),
    "report": ("msrl.commands.report:main", "PNG figures + report.md/.html from runs and evaluations"),
    "data": ("msrl.commands.data:main",
             "data check|masks --data CONFIG: every problem of a data set; its lesion masks as NIfTI"),
    "study": ("msrl.commands.study:main",
              "arms x seeds: fine-tuning runs, paired evaluations, claims -> results.md/.json, figures"),
    "export": ("msrl.commands.export:main", "a generator or ControlNet checkpoint -> a MONAI bundle with a model card"),
    "merge-lora": ("msrl.commands.merge_lora:main",
                   "a LoRA fine-tuned checkpoint -> a plain checkpoint (adapters merged into the base weights)"),
}


def usage() -> str:
    """The top-level help text: one table, a line per verb."""
    lines = ["usage: msrl VERB [options]   (msrl VERB --help: the verb's options; -c FILE: options from YAML)",
             "       msrl --version", "", "verbs:"]
    lines += [f"  {name:<18} {text}" for name, (_, text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `msrl` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        # The installed package's version (pyproject.toml's, the newest entry of CHANGELOG.md).
        print(f"msrl {version('msrl')}")
        return
    verb, rest = argv[0], argv[1:]
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # Lightning 2.6 on torch 2.13, harmless
    if verb not in VERBS:
        print(f"msrl: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, _, function = VERBS[verb][0].partition(":")
    try:
        getattr(importlib.import_module(module_name), function)(rest)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        if os.environ.get("MSRL_DEBUG"):
            raise
        print(f"msrl {verb}: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
