"""`msrl merge-lora`: a LoRA PPO checkpoint → a plain checkpoint with the adapters merged into the base weights.

A LoRA checkpoint needs its base checkpoint at the recorded path with the recorded SHA-256; the merged
one stands alone (raw and EMA weights, the rollout sampler and the reward kept), samples like the LoRA
checkpoint and is read by `msrl sample`, `evaluate` and PPO's `init_checkpoint` like a pretraining one.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from datamodules.atomic import atomic_save
from datamodules.digest import sha256_of
from lightning_modules.checkpoint_io import load_weights
from lightning_modules.diffusion.lora import LORA_KEY
from lightning_modules.diffusion.module import DIFFUSION_KEY, DiffusionModule
from lightning_modules.finetune import REWARD_KEY, ROLLOUT_KEY
from msrl.commands.parsing import command_parser

KEPT = (ROLLOUT_KEY, REWARD_KEY)  # what evaluation reads from a fine-tuned checkpoint besides the weights


def build_parser() -> ArgumentParser:
    """Options of `msrl merge-lora` (each also readable from a YAML given with -c)."""
    parser = command_parser("msrl merge-lora", "Merge a LoRA PPO checkpoint's adapters into a plain checkpoint.")
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="a .ckpt of msrl finetune with --model.lora_rank > 0")
    parser.add_argument("--out", type=str, required=True, help="the plain checkpoint to write")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing --out file")
    return parser


def main(argv: list[str]) -> None:
    """Rebuild base + adapters (refusing a missing or changed base), merge, write `--out`."""
    args = build_parser().parse_args(argv)
    source, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite true or choose another --out")
    checkpoint = load_weights(source)
    if not isinstance(checkpoint, dict) or LORA_KEY not in checkpoint:
        raise ValueError(f"{source} holds no LoRA adapters (no {LORA_KEY}): it is a plain checkpoint already")
    model = DiffusionModule.from_msrl_checkpoint(source)
    merged = {DIFFUSION_KEY: model.diffusion_spec(), "state_dict": model.state_dict(),
              "msrl_merged_from": {**checkpoint[LORA_KEY], "checkpoint": str(source.resolve()),
                                   "sha256": sha256_of(source)}}
    merged.update({key: checkpoint[key] for key in KEPT if key in checkpoint})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(merged, out)
    print(f"wrote {out}: the adapters of {source} (rank {checkpoint[LORA_KEY]['rank']}) merged into "
          f"{checkpoint[LORA_KEY]['base_checkpoint']}")
