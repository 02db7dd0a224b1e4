"""Volumes drawn from lesion masks by a ControlNet checkpoint, written beside the masks, and a data set's masks.

Two checkpoints draw from masks: a ControlNet (`msrl train-controlnet`, `msrl_controlnet`) on its frozen base,
and a model fine-tuned under a frozen ControlNet (`msrl finetune` with `controlnet_checkpoint`, `msrl_masks`),
which draws with the recorded ControlNet's residuals on its own UNet, as its rollouts were drawn
(`MaskFinetuned`; the ControlNet file is checked by its SHA-256).

`msrl sample --mask` reads every mask first (`MaskRules.read_all`: refusals name each file), plans one
draw per mask and sample (`plan_draws`), draws them in batches like `draw_volumes` (batch k seeded
`seed + k·batch_size` over the flattened list of draws), and moves the volumes into place together
(`write_beside`). `split_masks` reads the cached `seg` of a data split for `msrl data masks` and
`msrl sample --masks-from-split`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from datamodules.base import VolumeDataModule
from datamodules.digest import check_recorded_file
from lightning_modules import ControlNetModule, DiffusionModule, load_weights
from lightning_modules.controlnet import CONTROLNET_KEY
from lightning_modules.diffusion import DIFFUSION_KEY
from lightning_modules.finetune.masks import MASKS_KEY
from msrl.samples.folder import load_checkpoint
from msrl.samples.mask_files import (
    Mask,
    MaskRules,
    StagedFiles,
    auto_label,
    label_map_image,
    sample_path,
    update_manifest,
    volume_image,
)

GeneratorKind = Literal["controlnet", "mask-finetuned", "diffusion"]
SPLITS = ("train", "val", "test")


def generator_kind(path: str | Path) -> tuple[GeneratorKind, dict[str, Any]]:
    """Whether a checkpoint is a ControlNet, a model fine-tuned under one, or a diffusion model; and the checkpoint."""
    checkpoint = load_weights(path)
    if isinstance(checkpoint, dict) and CONTROLNET_KEY in checkpoint:
        return "controlnet", checkpoint
    if isinstance(checkpoint, dict) and MASKS_KEY in checkpoint:
        return "mask-finetuned", checkpoint
    if isinstance(checkpoint, dict) and DIFFUSION_KEY in checkpoint:
        return "diffusion", checkpoint
    raise ValueError(f"checkpoint {path} was written neither by msrl pretrain/finetune (no msrl_diffusion) nor by "
                     f"msrl train-controlnet (no {CONTROLNET_KEY}): it draws no volumes")


def controlnet_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The `msrl_controlnet` record of a ControlNet checkpoint, or of the ControlNet a model was fine-tuned under."""
    return checkpoint[CONTROLNET_KEY] if CONTROLNET_KEY in checkpoint else checkpoint[MASKS_KEY]["controlnet"]


def mask_rules(checkpoint: dict[str, Any]) -> MaskRules:
    """The masks a checkpoint drawing from masks accepts: its volume side and label channels (`controlnet_record`)."""
    record = controlnet_record(checkpoint)
    channels = record["label_channels"]
    return MaskRules(int(record["hparams"]["spatial_size"]), [int(c["label"]) for c in channels],
                     [str(c["meaning"]) for c in channels])


def load_controlnet(path: str | Path, device: torch.device) -> ControlNetModule:
    """The ControlNet of a checkpoint with its base (refused if missing or changed), in eval mode on `device`."""
    return ControlNetModule.from_msrl_checkpoint(path, map_location="cpu").to(device).eval()


class MaskFinetuned:
    """A model fine-tuned under a frozen ControlNet, drawing from masks as its rollouts were drawn.

    The ControlNet's EMA residuals (what fine-tuning added) on the fine-tuned model's EMA UNet (`use_ema`),
    through `ControlNetModule.generate(model=...)`; `generate` has the ControlNet's signature.

    Args:
        model: the fine-tuned diffusion model.
        controlnet: the ControlNet it was fine-tuned under (its base's architecture is checked when drawing).
        controlnet_path: that ControlNet's file.
    """

    def __init__(self, model: DiffusionModule, controlnet: ControlNetModule, controlnet_path: str | Path) -> None:
        self.model, self.controlnet, self.controlnet_path = model, controlnet, Path(controlnet_path)

    @property
    def hparams(self) -> Any:
        """The fine-tuned model's hyperparameters (classes, volume side)."""
        return self.model.hparams

    def generate(self, seg: torch.Tensor, labels: torch.Tensor | None = None, num_steps: int = 50, eta: float = 0.0,
                 guidance_scale: float = 1.0, seed: int = 0, use_ema: bool = True) -> torch.Tensor:
        """Volumes [N, C, S, S, S] in [-1, 1] under label maps `seg` [N, 1, S, S, S], seeded as a ControlNet's."""
        return self.controlnet.generate(seg, labels, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
                                        seed=seed, use_ema=True, model=self.model, model_ema=use_ema)


def recorded_controlnet(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """The ControlNet file a checkpoint's `msrl_masks` names, refused (naming both files) if missing or changed."""
    record = checkpoint[MASKS_KEY]
    return check_recorded_file(record["controlnet_checkpoint"], record["controlnet_sha256"], "ControlNet checkpoint",
                               f"fine-tuned checkpoint {path}",
                               "restore the original file, or run from the directory the fine-tuning ran in")


def load_mask_generator(path: str | Path, device: torch.device) -> ControlNetModule | MaskFinetuned:
    """What draws from masks for a checkpoint: a ControlNet with its base, or a fine-tuned model with its ControlNet.

    Raises:
        ValueError: a diffusion checkpoint fine-tuned without masks, or a changed ControlNet (or base) file.
        FileNotFoundError: a missing ControlNet (or base) file.
    """
    kind, checkpoint = generator_kind(path)
    if kind == "controlnet":
        return load_controlnet(path, device)
    if kind == "diffusion":
        raise ValueError(f"checkpoint {path} is a diffusion model without mask conditioning: drawing from masks needs "
                         "a ControlNet checkpoint (msrl train-controlnet --model.base_checkpoint on this one) or a "
                         "model fine-tuned under one (msrl finetune with controlnet_checkpoint)")
    controlnet = recorded_controlnet(path, checkpoint)
    return MaskFinetuned(load_checkpoint(path, device), load_controlnet(controlnet, device), controlnet)


@dataclass(frozen=True)
class MaskDraw:
    """One volume to draw: its mask, its index among the mask's volumes, its class label, its file."""

    mask: Mask
    index: int
    label: int | None
    path: str


def check_label(label: int | None, num_classes: int) -> None:
    """Refuse a class label the model does not have (None: each mask's own, always allowed)."""
    if label is not None and num_classes == 0:
        raise ValueError(f"--label {label}: this checkpoint is unconditional (0 classes); leave --label out")
    if label is not None and not 0 <= label < num_classes:
        raise ValueError(f"--label {label}: this checkpoint has {num_classes} classes (0..{num_classes - 1})")


def plan_draws(masks: list[Mask], num_samples: int, label: int | None, num_classes: int,
               overwrite: bool = False) -> list[MaskDraw]:
    """`num_samples` draws per mask, labelled `label` or (None) by the mask: 1 with a lesion, else 0.

    Raises:
        ValueError: `label` is not a class of the model.
        FileExistsError: a volume's file exists and `overwrite` is false (every such file is named).
    """
    check_label(label, num_classes)
    draws = [MaskDraw(mask, k, None if num_classes == 0 else (auto_label(mask) if label is None else label),
                      sample_path(mask.path, k))
             for mask in masks for k in range(num_samples)]
    existing = [draw.path for draw in draws if os.path.exists(draw.path)]
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        raise FileExistsError(f"{len(existing)} volume(s) to draw exist already ({shown}): pass --overwrite true to "
                              "replace them")
    return draws


def draw_batches(model: ControlNetModule | MaskFinetuned, draws: list[MaskDraw], steps: int = 50, eta: float = 0.0,
                 guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 4, use_ema: bool = True
                 ) -> list[tuple[np.ndarray, int]]:
    """Each draw's volume [S, S, S] (or [S, S, S, C]) and the seed of its batch, batch k seeded seed + k·batch_size."""
    out = []
    for start in range(0, len(draws), batch_size):
        batch = draws[start : start + batch_size]
        seg = torch.from_numpy(np.stack([draw.mask.labels for draw in batch]))[:, None]
        labels = None if batch[0].label is None else torch.tensor([draw.label for draw in batch])
        volumes = model.generate(seg, labels, num_steps=steps, eta=eta, guidance_scale=guidance_scale,
                                 seed=seed + start, use_ema=use_ema).cpu()
        for volume in volumes:
            data = volume.permute(1, 2, 3, 0).numpy()  # [D, H, W, C] for NIfTI
            out.append((data[..., 0] if data.shape[-1] == 1 else data, seed + start))
    return out


def write_beside(draws: list[MaskDraw], volumes: list[tuple[np.ndarray, int]], checkpoint: str) -> list[str]:
    """Write each volume beside its mask (the mask's affine and header), all or none; update each `samples.csv`."""
    staged, rows = StagedFiles(), {}
    try:
        for draw, (volume, seed) in zip(draws, volumes, strict=True):
            staged.save(volume_image(volume, draw.mask), draw.path)
            rows.setdefault(os.path.dirname(draw.path), []).append({
                "file": os.path.basename(draw.path), "mask": os.path.basename(draw.mask.path),
                "mask_sha256": draw.mask.sha256, "label": "" if draw.label is None else draw.label, "seed": seed,
                "checkpoint": checkpoint})
        staged.commit()
    finally:
        staged.discard()
    return [update_manifest(folder, folder_rows) for folder, folder_rows in rows.items()]


@dataclass(frozen=True)
class SplitMask:
    """A subject's cached lesion labels [S, S, S] (uint8) and class label."""

    subject_id: str
    labels: np.ndarray
    label: int

    @property
    def file_name(self) -> str:
        """`<subject>_seg.nii.gz`."""
        return f"{self.subject_id}_seg.nii.gz"


def split_masks(data: VolumeDataModule, split: str) -> list[SplitMask]:
    """The cached `seg` of every subject of a split (`prepare_data` builds a missing cache first)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data.prepare_data()
    data.setup("fit")
    dataset = data.datasets[split]
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {type(data).__name__} is empty")
    masks = []
    for index in range(len(dataset)):
        item = dataset[index]
        if "seg" not in item:
            raise ValueError(f"{type(data).__name__} serves no lesion masks (no 'seg' in its cache, subject "
                             f"{item['subject_id']}): data sets with lesion labels are BraTS and the template cohort")
        masks.append(SplitMask(str(item["subject_id"]), item["seg"][0].numpy().astype(np.uint8), int(item["label"])))
    return masks


def check_split_masks(masks: list[SplitMask], rules: MaskRules, split: str) -> None:
    """Refuse (before anything is written) the split's masks the model cannot take, naming each subject."""
    refused = [f"  {mask.file_name} (subject {mask.subject_id} of the {split} split): " + "; ".join(problems)
               for mask in masks if (problems := rules.problems(mask.labels, np.eye(4)))]
    if refused:
        raise ValueError(f"{len(refused)} mask(s) refused, nothing was drawn:\n" + "\n".join(refused))


def write_split_masks(masks: list[SplitMask], folder: Path, split: str) -> list[Path]:
    """Write each mask as `<subject>_seg.nii.gz` (identity affine, RAS+) and `masks.csv` into `folder`."""
    paths = []
    for mask in masks:
        nib.save(label_map_image(mask.labels), folder / mask.file_name)
        paths.append(folder / mask.file_name)
    with open(folder / "masks.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "subject_id", "label", "split", "lesion_voxels"])
        writer.writeheader()
        writer.writerows({"file": mask.file_name, "subject_id": mask.subject_id, "label": mask.label, "split": split,
                          "lesion_voxels": int(np.count_nonzero(mask.labels))} for mask in masks)
    return paths
