"""`msrl export`: a pretrained, fine-tuned or ControlNet generator → a MONAI bundle with a model card, runnable
without msrl (the bundle of a ControlNet, or of a model fine-tuned under one, takes a lesion mask and writes each
volume with the mask's affine)."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser

from msrl.commands.parsing import command_parser
from msrl.export import Sampler, export_bundle


def build_parser() -> ArgumentParser:
    """Options of `msrl export` (each also readable from a YAML given with -c)."""
    parser = command_parser("msrl export", "Write a MONAI bundle (configs, weights, sampler, model card) of a "
                                           "DiffusionModule or ControlNet checkpoint.")
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="a .ckpt of msrl pretrain, finetune or train-controlnet (fine-tuned under a ControlNet: "
                             "its bundle takes masks and carries the recorded ControlNet)")
    parser.add_argument("--out", type=str, required=True, help="the bundle folder")
    parser.add_argument("--metrics", type=str | None, default=None,
                        help="metrics.json of msrl evaluate: its numbers and intervals go into the model card")
    parser.add_argument("--data-config", "--data_config", type=str | None, default=None,
                        help="a data YAML naming the training data (default: the run's config.yaml by checkpoints/)")
    parser.add_argument("--num-samples", "--num_samples", type=int, default=1,
                        help="the bundle's default volumes per requested class (a bundle taking masks: per mask)")
    parser.add_argument("--classes", type=list[int] | None, default=None,
                        help="the bundle's default classes to draw (default: every class; not for a bundle taking "
                             "masks, whose class is each mask's own or --label at run time)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default of the bundle)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic)")
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=1.0,
                        help="classifier-free guidance weight (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch k: seed + k·batch_size)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=4, help="volumes per forward pass")
    parser.add_argument("--no-ema", "--no_ema", type=bool, default=False, help="export the raw weights, not EMA")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing bundle folder")
    return parser


def main(argv: list[str]) -> None:
    """Parse the options, refuse what cannot be exported, write the bundle atomically."""
    args = build_parser().parse_args(argv)
    if min(args.num_samples, args.steps, args.batch_size) < 1 or args.eta < 0:
        raise ValueError("--num-samples, --steps and --batch-size must be >= 1 and --eta >= 0")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    sampler = Sampler(steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale, seed=args.seed,
                      batch_size=args.batch_size, num_samples=args.num_samples, classes=args.classes)
    export_bundle(args.checkpoint, out, sampler, use_ema=not args.no_ema, metrics_path=args.metrics,
                  data_config=args.data_config)
    masks = "mask" in json.loads((out / "configs" / "inference.json").read_text())
    print(f"wrote the MONAI bundle to {out}; run it (torch, monai, nibabel, fire; no msrl) with:\n  "
          f"python -m monai.bundle run --config_file {out}/configs/inference.json "
          + ("--mask seg.nii.gz" if masks else "--output_dir samples"))
