"""`VolumeDataModule`: what every data set shares — preprocessing, on-disk cache, splits, items.

A data set states only what differs: which subjects exist (`list_subjects`) and how to read one
into a TorchIO subject (`load_subject`). The base preprocesses every subject once (DESIGN.md §1),
caches the tensors under `cache_dir`, splits deterministically by `seed` with stratification by
label, and serves items `{"image": float32 [C, D, H, W] in [-1, 1], "label": int64 [],
"subject_id": str}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.preprocessing import preprocess_subject
from datamodules.splits import stratified_split

log = logging.getLogger(__name__)
PREPROCESSING_VERSION = 1  # bump when preprocessing changes, so old caches are not reused


@dataclass(frozen=True)
class SubjectRecord:
    """One subject of a data set: its id, its label and where it comes from (for errors)."""

    subject_id: str
    label: int
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class CachedVolumeDataset(Dataset):
    """Items read from the preprocessed cache, one `.pt` file per subject."""

    def __init__(self, files: list[Path], records: list[SubjectRecord]) -> None:
        self.files, self.records = files, records

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = torch.load(self.files[index], map_location="cpu", weights_only=True)["image"]
        return {"image": image, "label": torch.tensor(record.label, dtype=torch.int64),
                "subject_id": record.subject_id}


class _PreprocessJobs(Dataset):
    """Runs `load_subject` + preprocessing per subject, so DataLoader workers can parallelise it."""

    def __init__(self, module: VolumeDataModule, records: list[SubjectRecord]) -> None:
        self.module, self.records = module, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[str, dict[str, torch.Tensor]]:
        record = self.records[index]
        try:
            subject = self.module.load_subject(record)
            image, mask = preprocess_subject(subject, self.module.channel_names, self.module.spatial_size)
        except Exception as exc:  # re-raised with the subject named: the file is what the user fixes
            where = f" ({record.source})" if record.source else ""
            raise RuntimeError(f"subject {record.subject_id}{where}: {exc}") from exc
        if not torch.isfinite(image).all():
            raise ValueError(f"subject {record.subject_id}{record.source and ' (' + record.source + ')'}: "
                             "non-finite voxels after preprocessing")
        return record.subject_id, {"image": image.to(self.module.cache_dtype), "mask": mask}


class VolumeDataModule(L.LightningDataModule):
    """Base LightningDataModule for 3D volumes: subclasses list and read subjects, nothing else.

    Args:
        spatial_size: side of the cubic volumes (16 in tests, 32 demo, 64/128 on GPUs).
        cache_dir: folder for preprocessed tensors; a sub-folder per data-set configuration.
        batch_size: volumes per batch and per device.
        num_workers: DataLoader workers (also used to preprocess in parallel).
        val_fraction: share of each label held out for validation.
        test_fraction: share of each label held out for testing.
        seed: seed of the split (and of anything random in the data set itself).
    """

    cache_dtype = torch.float32

    def __init__(self, spatial_size: int = 32, cache_dir: str | Path = "data/cache", batch_size: int = 2,
                 num_workers: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0) -> None:
        super().__init__()
        if spatial_size < 8:
            raise ValueError(f"spatial_size must be >= 8, got {spatial_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spatial_size, self.cache_dir, self.batch_size = spatial_size, Path(cache_dir), batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.datasets: dict[str, CachedVolumeDataset] = {}

    # What a data set states --------------------------------------------------------------------
    @property
    @abstractmethod
    def channel_names(self) -> list[str]:
        """Names of the subject's images, in channel order."""

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of class labels (0 for an unlabelled data set)."""

    @abstractmethod
    def list_subjects(self) -> list[SubjectRecord]:
        """Every subject of the data set, in a stable order."""

    @abstractmethod
    def load_subject(self, record: SubjectRecord) -> tio.Subject:
        """A TorchIO subject with one ScalarImage per channel and a `brain` LabelMap (optional)."""

    def cache_fields(self) -> dict[str, Any]:
        """The parameters that decide the preprocessed content (they name the cache folder)."""
        return {}

    # Shared behaviour --------------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        """Channels of every item's image."""
        return len(self.channel_names)

    @property
    def cache_path(self) -> Path:
        """Folder of this configuration's cache: data-set name + hash of what decides the content."""
        fields = {"dataset": type(self).__name__, "spatial_size": self.spatial_size,
                  "channels": self.channel_names, "preprocessing": PREPROCESSING_VERSION, **self.cache_fields()}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return self.cache_dir / f"{type(self).__name__}-{self.spatial_size}-{digest}"

    def prepare_data(self) -> None:
        """Preprocess every subject missing from the cache (local rank 0 only, once per node)."""
        records = self.list_subjects()
        if not records:
            raise ValueError(f"{type(self).__name__}: no subjects found")
        ids = [r.subject_id for r in records]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"{type(self).__name__}: duplicate subject ids {twice}")
        self.cache_path.mkdir(parents=True, exist_ok=True)
        todo = [r for r in records if not self._file(r.subject_id).exists()]
        if todo:
            log.info("preprocessing %d subjects into %s", len(todo), self.cache_path)
            jobs = DataLoader(_PreprocessJobs(self, todo), batch_size=None, num_workers=self.num_workers)
            for subject_id, tensors in tqdm(jobs, total=len(todo), desc="preprocess", leave=False):
                _atomic_save(tensors, self._file(subject_id))
        index = [{"subject_id": r.subject_id, "label": r.label, "source": r.source} for r in records]
        _atomic_write_text(json.dumps(index, indent=1), self.cache_path / "index.json")

    def setup(self, stage: str | None = None) -> None:
        """Read the cache index and build the train/val/test datasets."""
        index_file = self.cache_path / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file} does not exist: run prepare_data() first")
        records = [SubjectRecord(**row) for row in json.loads(index_file.read_text())]
        split = stratified_split([r.label for r in records], self.val_fraction, self.test_fraction, self.seed)
        for name, indices in split.items():
            chosen = [records[i] for i in indices]
            self.datasets[name] = CachedVolumeDataset([self._file(r.subject_id) for r in chosen], chosen)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"the {split} split is not set up: call setup() first")
        if len(self.datasets[split]) == 0:
            raise ValueError(f"the {split} split is empty: raise num_subjects or the {split}_fraction")
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=False)

    def _file(self, subject_id: str) -> Path:
        return self.cache_path / f"{subject_id}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: a killed run never leaves a half file."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    """Write text through a temporary file and a rename."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
