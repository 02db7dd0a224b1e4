"""`msrl sample`: volumes from a pretrained or fine-tuned checkpoint, written as NIfTI with a manifest."""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from msrl.commands.parsing import command_parser
from msrl.samples import draw_volumes, load_checkpoint, write_samples


def build_parser() -> ArgumentParser:
    """Options of `msrl sample` (each also readable from a YAML given with -c)."""
    parser = command_parser("msrl sample", "Draw volumes from a DiffusionModule checkpoint.")
    parser.add_argument("--checkpoint", type=str, required=True, help="a .ckpt written by msrl pretrain")
    parser.add_argument("--num-samples", "--num_samples", type=int, default=8, help="volumes to draw")
    parser.add_argument("--label", type=int | None, default=None,
                        help="class of every sample; omitted: labels alternate 0, 1, …")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic, 1 DDPM-like)")
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=1.0,
                        help="classifier-free guidance weight (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise and step noise")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=4, help="volumes per forward pass")
    parser.add_argument("--out", type=str, default="samples", help="output folder")
    parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', …")
    parser.add_argument("--no-ema", "--no_ema", type=bool, default=False, help="use the raw weights, not EMA")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing output folder")
    return parser


def main(argv: list[str]) -> None:
    """Parse the options, draw the volumes, write `sample_<index>.nii.gz`, `manifest.csv`, `slices.png`."""
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.steps < 1 or args.batch_size < 1:
        raise ValueError("--num-samples, --steps and --batch-size must be >= 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    model = load_checkpoint(args.checkpoint, device)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    num_classes = model.hparams.num_classes
    if args.label is not None and not 0 <= args.label < max(num_classes, 1):
        raise ValueError(f"--label {args.label}: this checkpoint has {num_classes} classes (0..{num_classes - 1})")
    if num_classes == 0:
        labels = None
    elif args.label is None:
        labels = torch.arange(args.num_samples) % num_classes
    else:
        labels = torch.full((args.num_samples,), args.label)
    volumes, seeds = draw_volumes(model, args.num_samples, labels, steps=args.steps, eta=args.eta,
                                  guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                                  use_ema=not args.no_ema)
    write_samples(volumes, labels, out, seeds=seeds, checkpoint=str(args.checkpoint))
    print(f"wrote {args.num_samples} volumes, manifest.csv and slices.png to {out}")


