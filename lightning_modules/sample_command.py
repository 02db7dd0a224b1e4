"""`msrl sample`: volumes from a pretrained checkpoint, written as NIfTI with a manifest."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_modules.atomic_output import atomic_folder
from lightning_modules.diffusion import DiffusionModule
from lightning_modules.visualize import save_slices_png


def build_parser() -> ArgumentParser:
    """Options of `msrl sample` (each also readable from a YAML given with -c)."""
    parser = ArgumentParser(prog="msrl sample", description="Draw volumes from a DiffusionModule checkpoint.")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML with any of these options")
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


def load_checkpoint(path: str | Path, device: torch.device) -> DiffusionModule:
    """The diffusion model of a pretraining or fine-tuning checkpoint, read with `weights_only=True`."""
    try:
        model = DiffusionModule.from_msrl_checkpoint(path, map_location="cpu")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} could not be read as an msrl checkpoint: {exc}") from exc
    return model.to(device).eval()


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


def draw_volumes(model: DiffusionModule, num_samples: int, labels: torch.Tensor | None, steps: int = 50,
                 eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 4,
                 use_ema: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Draw `num_samples` volumes [N, C, S, S, S] on the CPU in batches; batch k is seeded `seed + k·batch_size`.

    Returns the volumes and, per volume, the seed of its batch (what reproduces it).
    """
    volumes, seeds = [], []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        batch_labels = None if labels is None else labels[start : start + count]
        volumes.append(model.generate(count, batch_labels, num_steps=steps, eta=eta, guidance_scale=guidance_scale,
                                      seed=seed + start, use_ema=use_ema, progress=True).cpu())
        seeds += [seed + start] * count
    return torch.cat(volumes), seeds


def read_samples(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Volumes [N, C, S, S, S] and labels [N] (None if unlabelled) of a folder written by `msrl sample`."""
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: expected a folder written by msrl sample "
                                "(sample_*.nii.gz + manifest.csv)")
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "file" not in rows[0]:
        raise ValueError(f"{manifest} lists no volumes (expected columns file,label,…)")
    volumes = []
    for row in rows:
        data = np.asarray(nib.load(folder / row["file"]).dataobj, dtype=np.float32)
        volumes.append(torch.from_numpy(data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)))
    shapes = {tuple(v.shape) for v in volumes}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: volumes have different shapes {sorted(shapes)}")
    labelled = all(row.get("label", "") != "" for row in rows)
    labels = torch.tensor([int(row["label"]) for row in rows]) if labelled else None
    return torch.stack(volumes), labels


def write_samples(volumes: torch.Tensor, labels: torch.Tensor | None, out: Path, seeds: list[int],
                  checkpoint: str) -> None:
    """Write the volumes (1 mm affine), manifest and slice PNG into `out`, all or nothing.

    `seeds[i]` is the seed of the batch that drew volume i (its noise and step noise).
    """
    with atomic_folder(out) as staging:
        rows = []
        for index, volume in enumerate(volumes):
            name = f"sample_{index:04d}.nii.gz"
            data = volume.permute(1, 2, 3, 0).numpy().astype(np.float32)  # [D, H, W, C] for NIfTI
            nib.save(nib.Nifti1Image(data[..., 0] if data.shape[-1] == 1 else data, np.eye(4)), staging / name)
            rows.append({"file": name, "label": "" if labels is None else int(labels[index]), "seed": seeds[index],
                         "checkpoint": checkpoint})
        with open(staging / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "label", "seed", "checkpoint"])
            writer.writeheader()
            writer.writerows(rows)
        shown = volumes[:8]
        titles = None if labels is None else [f"label {int(label)}" for label in labels[:8]]
        save_slices_png(shown, staging / "slices.png", titles)
