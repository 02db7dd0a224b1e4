"""`msrl sample`: volumes from a pretrained or fine-tuned checkpoint, or from lesion masks by a ControlNet.

A diffusion checkpoint writes `sample_<index>.nii.gz`, `manifest.csv` and `slices.png` into `--out`. A
ControlNet checkpoint (`msrl train-controlnet`) draws from masks: `--mask` (a NIfTI file or a folder of them,
repeatable) writes each volume beside its mask as `<stem>_sample_<k>.nii.gz` with the mask's affine and header,
listed in the folder's `samples.csv`; `--masks-from-split test --data CONFIG` writes a split's cached masks
(`<subject>_seg.nii.gz`) into `--out` and their volumes beside them. Every mask is checked before anything
is drawn (msrl.samples.MaskRules). A checkpoint fine-tuned under a ControlNet (`msrl_masks`) draws from masks
the same way, with the recorded ControlNet's residuals on its own UNet (the ControlNet file checked by its
SHA-256); without masks it draws as a plain diffusion model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from datamodules.atomic import atomic_folder
from datamodules.base import VolumeDataModule
from msrl.commands.data import data_argv
from msrl.commands.parsing import command_parser
from msrl.samples import (
    check_label,
    check_split_masks,
    controlnet_record,
    draw_batches,
    draw_volumes,
    generator_kind,
    load_checkpoint,
    load_mask_generator,
    mask_paths,
    mask_rules,
    plan_draws,
    split_masks,
    write_beside,
    write_samples,
    write_split_masks,
)

CONTROLNET_NEEDS_MASKS = ("is a ControlNet (msrl train-controlnet): it draws volumes for lesion masks; pass --mask "
                          "seg.nii.gz (a file or a folder, repeatable) or --masks-from-split test --data CONFIG "
                          "(`msrl data masks` writes a data set's masks)")


def build_parser() -> ArgumentParser:
    """Options of `msrl sample` (each also readable from a YAML given with -c)."""
    parser = command_parser("msrl sample", "Draw volumes from a DiffusionModule checkpoint, or from lesion masks "
                                           "with a ControlNet checkpoint.")
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="a .ckpt written by msrl pretrain or finetune, or by msrl train-controlnet (with masks); "
                             "one fine-tuned under a ControlNet draws from masks with it, or without them as usual")
    parser.add_argument("--num-samples", "--num_samples", type=int | None, default=None,
                        help="volumes to draw (default 8); with masks: volumes per mask (default 1)")
    parser.add_argument("--label", type=int | None, default=None,
                        help="class of every sample; omitted: labels alternate 0, 1, …, and with masks each mask's "
                             "own: 1 if it holds a lesion voxel, else 0 (the template cohort's rule; BraTS: pass it)")
    parser.add_argument("--mask", type=list[str], default=[],
                        help="ControlNet (or fine-tuned under one): a NIfTI lesion mask or a folder of *.nii.gz "
                             "masks (repeatable); volumes are written beside each mask")
    parser.add_argument("--masks-from-split", "--masks_from_split", type=str | None, default=None,
                        help="ControlNet: draw from the cached masks of this split (train, val, test) of --data; "
                             "masks and volumes go into --out")
    parser.add_subclass_arguments(VolumeDataModule, "data", required=False,
                                  help="with --masks-from-split: a data config file, a training config (its data:), "
                                       "or class_path + init_args")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic, 1 DDPM-like)")
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=1.0,
                        help="classifier-free guidance weight (1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise and step noise")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=4, help="volumes per forward pass")
    parser.add_argument("--out", type=str | None, default=None,
                        help="output folder (default samples); not with --mask, whose volumes go beside the masks")
    parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', …")
    parser.add_argument("--no-ema", "--no_ema", type=bool, default=False, help="use the raw weights, not EMA")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace an existing output folder, or volumes already drawn beside masks")
    return parser


def normalise_argv(argv: list[str]) -> list[str]:
    """A repeated `--mask X` appends; `--data RUN_CONFIG` reads the training config's `data:`."""
    out: list[str] = []
    for arg in argv:
        flag, _, value = arg.partition("=")
        out += (["--mask+", value] if value else ["--mask+"]) if flag == "--mask" else [arg]
    return data_argv(out)


def main(argv: list[str]) -> None:
    """Parse the options, refuse what cannot be drawn (checkpoint kind, masks, outputs), then draw and write."""
    parser = build_parser()
    args = parser.parse_args(normalise_argv(argv))
    if (args.num_samples is not None and args.num_samples < 1) or args.steps < 1 or args.batch_size < 1:
        raise ValueError("--num-samples, --steps and --batch-size must be >= 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.data is not None and args.masks_from_split is None:
        raise ValueError("--data is read only with --masks-from-split")
    if not args.mask and args.masks_from_split is None:
        sample_plain(args, device)
        return
    kind, checkpoint = generator_kind(args.checkpoint)
    if kind == "diffusion":
        raise ValueError(f"checkpoint {args.checkpoint} is a diffusion model without mask conditioning: --mask and "
                         "--masks-from-split need a ControlNet checkpoint (msrl train-controlnet --model."
                         "base_checkpoint on this one) or a model fine-tuned under one (msrl finetune with "
                         "controlnet_checkpoint)")
    if args.mask and args.masks_from_split is not None:
        raise ValueError("pass either --mask or --masks-from-split, not both")
    if args.mask:
        sample_beside_masks(args, checkpoint, device)
    else:
        sample_split(parser, args, checkpoint, device)


def sample_plain(args: Namespace, device: torch.device) -> None:
    """Draw from a diffusion model: `sample_<index>.nii.gz`, `manifest.csv`, `slices.png` in `--out`."""
    num_samples, out = args.num_samples or 8, Path(args.out or "samples")
    try:
        model = load_checkpoint(args.checkpoint, device)
    except ValueError:
        if generator_kind(args.checkpoint)[0] == "controlnet":  # read again only to say what it is
            raise ValueError(f"checkpoint {args.checkpoint} {CONTROLNET_NEEDS_MASKS}") from None
        raise
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    num_classes = model.hparams.num_classes
    if args.label is not None and not 0 <= args.label < max(num_classes, 1):
        raise ValueError(f"--label {args.label}: this checkpoint has {num_classes} classes (0..{num_classes - 1})")
    if num_classes == 0:
        labels = None
    elif args.label is None:
        labels = torch.arange(num_samples) % num_classes
    else:
        labels = torch.full((num_samples,), args.label)
    volumes, seeds = draw_volumes(model, num_samples, labels, steps=args.steps, eta=args.eta,
                                  guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                                  use_ema=not args.no_ema)
    write_samples(volumes, labels, out, seeds=seeds, checkpoint=str(args.checkpoint))
    print(f"wrote {num_samples} volumes, manifest.csv and slices.png to {out}")


def _sampler(args: Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance_scale, "seed": args.seed,
            "batch_size": args.batch_size, "use_ema": not args.no_ema}


def sample_beside_masks(args: Namespace, checkpoint: dict[str, Any], device: torch.device) -> None:
    """`--mask`: check every mask, then draw `--num-samples` volumes per mask and write them beside it."""
    if args.out is not None:
        raise ValueError("--out is not used with --mask: each volume is written beside its mask "
                         "(<mask>_sample_<k>.nii.gz); copy the masks where the volumes should go")
    masks = mask_rules(checkpoint).read_all(mask_paths(args.mask))
    num_classes = int(controlnet_record(checkpoint)["hparams"]["num_classes"])
    draws = plan_draws(masks, args.num_samples or 1, args.label, num_classes, overwrite=args.overwrite)
    model = load_mask_generator(args.checkpoint, device)
    manifests = write_beside(draws, draw_batches(model, draws, **_sampler(args)), str(args.checkpoint))
    print(f"wrote {len(draws)} volumes beside {len(masks)} masks, listed in {', '.join(manifests)}")


def sample_split(parser: ArgumentParser, args: Namespace, checkpoint: dict[str, Any], device: torch.device) -> None:
    """`--masks-from-split`: a split's cached masks and their volumes, written together into `--out`."""
    if args.data is None:
        raise ValueError("--masks-from-split needs --data: a data config such as configs/data/template.yaml, or the "
                         "training config whose data: holds it")
    out, split = Path(args.out or "samples"), args.masks_from_split
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    rules, num_classes = mask_rules(checkpoint), int(controlnet_record(checkpoint)["hparams"]["num_classes"])
    check_label(args.label, num_classes)
    masks = split_masks(parser.instantiate_classes(args).data, split)
    check_split_masks(masks, rules, split)
    model = load_mask_generator(args.checkpoint, device)
    with atomic_folder(out) as staging:
        written = rules.read_all(str(path) for path in write_split_masks(masks, staging, split))
        draws = plan_draws(written, args.num_samples or 1, args.label, num_classes)
        write_beside(draws, draw_batches(model, draws, **_sampler(args)), str(args.checkpoint))
    print(f"wrote {len(masks)} masks of the {split} split, {len(draws)} volumes beside them, masks.csv and "
          f"samples.csv to {out}")
