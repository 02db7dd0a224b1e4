"""Generated volumes drawn from a model, and the folder `msrl sample` writes.

A sample folder holds `sample_<index>.nii.gz` (1 mm affine), `manifest.csv` (file, label, seed,
checkpoint) and `slices.png`; `msrl evaluate` and `msrl report` read such folders back.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from datamodules.atomic import atomic_folder
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.visualize import save_slices_png


def load_checkpoint(path: str | Path, device: torch.device) -> DiffusionModule:
    """The diffusion model of a pretraining or fine-tuning checkpoint, read with `weights_only=True`."""
    try:
        model = DiffusionModule.from_msrl_checkpoint(path, map_location="cpu")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} could not be read as an msrl checkpoint: {exc}") from exc
    return model.to(device).eval()


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
