"""Real versus not-real volumes, to train the realism critics (docs/design.md §4).

"Not real" is two things: volumes sampled from a pretrained diffusion checkpoint (generated once
and cached), and real volumes degraded on the fly with TorchIO's MRI artefacts — noise, blur,
ghosting, motion, bias field, spike. Items carry `"real"`: 1 or 0.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchio as tio
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from datamodules.atomic import atomic_save
from datamodules.base import VolumeDataModule
from datamodules.random_state import unchanged_random_state
from datamodules.resumable import ResumableLoader


def mri_artefacts() -> tio.Transform:
    """One of TorchIO's MRI artefacts per call, strong enough to be visible at 32³."""
    return tio.OneOf([
        tio.RandomNoise(std=(0.05, 0.2)),
        tio.RandomBlur(std=(0.6, 1.5)),
        tio.RandomGhosting(num_ghosts=(2, 6), intensity=(0.4, 0.9)),
        tio.RandomMotion(degrees=6, translation=6, num_transforms=2),
        tio.RandomBiasField(coefficients=0.6),
        tio.RandomSpike(num_spikes=(1, 3), intensity=(0.3, 0.8)),
    ])


class _Labelled(Dataset):
    """Items of another dataset with `real` set, optionally degraded by an artefact."""

    def __init__(self, items: Dataset, real: int, degrade: bool, seed: int | None = None) -> None:
        self.items, self.real, self.degrade, self.seed = items, real, degrade, seed
        self.artefacts = mri_artefacts()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.items[index])
        if self.degrade:
            with torch.random.fork_rng(devices=[]):
                if self.seed is not None:  # a fixed artefact per item for validation
                    torch.manual_seed(self.seed + index)
                item["image"] = self.artefacts(item["image"]).clamp(-1, 1).float()
        item["real"] = torch.tensor(self.real)
        return {key: item[key] for key in ("image", "label", "real")}


class _Generated(Dataset):
    def __init__(self, volumes: torch.Tensor, labels: torch.Tensor) -> None:
        self.volumes, self.labels = volumes, labels

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.volumes[index], "label": self.labels[index]}


class RealismDataModule(L.LightningDataModule):
    """Real (1) vs generated or artefact-degraded (0) volumes from a `VolumeDataModule`.

    Args:
        data: the real data set; its train/val splits are used.
        generator_checkpoint: a pretrained (or fine-tuned) msrl checkpoint to sample "not real"
            volumes from (None: artefacts only).
        num_generated: volumes to sample; the last `val_fraction` of them are held out.
        generation_steps: DDIM steps per sample.
        artefacts: add an artefact-degraded copy of every real volume as "not real".
        val_fraction: share of the generated volumes held out for validation.
        batch_size: volumes per batch.
        seed: seed of the generation and of the validation artefacts.
    """

    def __init__(self, data: VolumeDataModule, generator_checkpoint: str | None = None, num_generated: int = 32,
                 generation_steps: int = 25, artefacts: bool = True, val_fraction: float = 0.25, batch_size: int = 8,
                 seed: int = 0) -> None:
        super().__init__()
        if generator_checkpoint is None and not artefacts:
            raise ValueError("RealismDataModule needs generator_checkpoint, artefacts, or both: nothing is 'not real'")
        self.data, self.generator_checkpoint, self.num_generated = data, generator_checkpoint, num_generated
        self.generation_steps, self.artefacts, self.val_fraction = generation_steps, artefacts, val_fraction
        self.batch_size, self.seed = batch_size, seed
        self.sets: dict[str, Dataset] = {}

    # The data's shape, for the CLI's links into the model.
    @property
    def num_channels(self) -> int:
        """Channels of the real volumes."""
        return self.data.num_channels

    @property
    def spatial_size(self) -> int:
        """Side of the real volumes."""
        return self.data.spatial_size

    @property
    def num_classes(self) -> int:
        """Classes of the real data set."""
        return self.data.num_classes

    def _generated_file(self) -> Path:
        stat = os.stat(self.generator_checkpoint)
        key = f"{os.path.abspath(self.generator_checkpoint)}-{stat.st_size}-{stat.st_mtime_ns}-" \
              f"{self.num_generated}-{self.generation_steps}-{self.seed}"
        return self.data.cache_path / f"generated-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"

    def prepare_data(self) -> None:
        """Preprocess the real data; sample the generated volumes once (cached beside it).

        Building the generator initialises weights from the global random generators before its
        checkpoint overwrites them; that happens only with a cold cache, so it leaves them as it found them.
        """
        self.data.prepare_data()
        if self.generator_checkpoint is None or self._generated_file().exists():
            return
        with unchanged_random_state():
            self._generate()

    def _generate(self) -> None:
        from lightning_modules.diffusion.module import DiffusionModule

        model = DiffusionModule.from_msrl_checkpoint(self.generator_checkpoint).to(
            "cuda" if torch.cuda.is_available() else "cpu")
        volumes = []
        for start in range(0, self.num_generated, 8):
            count = min(8, self.num_generated - start)
            labels = (torch.arange(start, start + count) % max(model.hparams.num_classes, 1))
            volumes.append(model.generate(count, labels if model.null_class is not None else None,
                                          num_steps=self.generation_steps, seed=self.seed + start).cpu())
        labels = torch.arange(self.num_generated) % max(model.hparams.num_classes, 1)
        atomic_save({"volumes": torch.cat(volumes), "labels": labels}, self._generated_file())

    def setup(self, stage: str | None = None) -> None:
        """Real train/val splits, their degraded copies, and the generated volumes split likewise."""
        self.data.setup(stage)
        parts: dict[str, list[Dataset]] = {"train": [], "val": []}
        for split in parts:
            real = self.data.datasets[split]
            parts[split].append(_Labelled(real, 1, degrade=False))
            if self.artefacts:
                parts[split].append(_Labelled(real, 0, degrade=True, seed=None if split == "train" else self.seed))
        if self.generator_checkpoint is not None:
            generated = torch.load(self._generated_file(), weights_only=True)
            held_out = max(1, int(round(self.val_fraction * len(generated["volumes"]))))
            for split, part in (("train", slice(None, -held_out)), ("val", slice(-held_out, None))):
                items = _Generated(generated["volumes"][part], generated["labels"][part])
                parts[split].append(_Labelled(items, 0, degrade=False))
        self.sets = {split: ConcatDataset(datasets) for split, datasets in parts.items()}

    def train_dataloader(self) -> DataLoader:
        """Shuffled real and not-real volumes."""
        return ResumableLoader(self.sets["train"], batch_size=self.batch_size, shuffle=True,
                               num_workers=self.data.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Held-out real and not-real volumes, fixed artefacts."""
        return ResumableLoader(self.sets["val"], batch_size=self.batch_size, num_workers=self.data.num_workers)
