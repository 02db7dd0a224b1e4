"""`VolumeDataModule`: what every data set shares — preprocessing, on-disk cache, splits, items.

A data set states only what differs: which subjects exist and what is wrong with the listing
(`scan`), and how to read one subject into a TorchIO subject (`load_subject`). The base applies the
`on_bad_subject` policy, preprocesses every subject once (docs/design.md §1) into a cache keyed by the
preprocessing settings and by each source file's path, size and mtime, splits deterministically by
`seed` with stratification by label, and serves items `{"image": float32 [C, D, H, W] in [-1, 1],
"label": int64 [], "subject_id": str}` (plus `"meta"` where the data set has it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.atomic import atomic_save, atomic_write_text
from datamodules.preprocessing import FOREGROUND_THRESHOLD, foreground_histogram, preprocess_volume
from datamodules.problems import DataError, Problem
from datamodules.random_state import unchanged_random_state
from datamodules.resumable import ResumableLoader
from datamodules.splits import stratified_split

log = logging.getLogger(__name__)
PREPROCESSING_VERSION = 2  # bump when preprocessing changes, so old caches are not reused


@dataclass(frozen=True)
class SubjectRecord:
    """One subject: id, label, where it comes from (for errors), its source files, metadata."""

    subject_id: str
    label: int
    source: str = ""
    files: tuple[str, ...] = ()
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
        item = {"image": image.float(), "label": torch.tensor(record.label, dtype=torch.int64),
                "subject_id": record.subject_id}
        if record.meta:
            item["meta"] = record.meta
        return item


class _PreprocessJobs(Dataset):
    """`load_subject` + preprocessing per subject; DataLoader workers run it in parallel.

    A failure comes back as a `Problem` instead of an exception, so that every bad subject is
    reported at once, in the main process, before training starts.
    """

    def __init__(self, module: VolumeDataModule, records: list[SubjectRecord]) -> None:
        self.module, self.records = module, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[str, dict[str, torch.Tensor] | None, Problem | None]:
        record = self.records[index]
        try:
            subject = self.module.load_subject(record)
            image, mask, lesion = preprocess_volume(subject, self.module.channel_names, self.module.spatial_size,
                                                    lesion_key=self.module.lesion_key,
                                                    healthy_upper=self.module.healthy_upper,
                                                    window=self.module.intensity_window)
        except Exception as exc:  # any failure on one subject is reported with its name, never hidden
            return record.subject_id, None, Problem(record.subject_id, record.source, str(exc))
        if not torch.isfinite(image).all():
            return record.subject_id, None, Problem(record.subject_id, record.source, "non-finite voxels")
        tensors = {"image": image.to(self.module.cache_dtype), "mask": mask}
        if lesion is not None:  # the lesion's labels at the volume's size (BraTS-style `seg`)
            tensors["seg"] = lesion
        return record.subject_id, tensors, None


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
        on_bad_subject: "error" stops with a list of every problem; "skip" leaves the affected
            subjects out, logging each one and the count.
        healthy_upper: where the healthy brain's upper intensity percentile lands on [-1, 1]; below
            1 keeps a lesion brighter than any healthy tissue from being clamped onto it
            (datamodules/preprocessing.py).
    """

    cache_dtype = torch.float32
    lesion_key: str | None = None  # a LabelMap of lesion voxels left out of the intensity percentiles
    intensity_window: tuple[float, float] | None = None  # a known intensity scale instead of per-volume percentiles

    def __init__(self, spatial_size: int = 32, cache_dir: str | Path = "data/cache", batch_size: int = 2,
                 num_workers: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0, on_bad_subject: Literal["error", "skip"] = "error", healthy_upper: float = 1.0) -> None:
        super().__init__()
        if not -1.0 < healthy_upper <= 1.0:
            raise ValueError(f"healthy_upper must be in (-1, 1], got {healthy_upper}")
        self.healthy_upper = healthy_upper
        if spatial_size < 8:
            raise ValueError(f"spatial_size must be >= 8, got {spatial_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_bad_subject not in ("error", "skip"):
            raise ValueError(f"on_bad_subject must be 'error' or 'skip', got {on_bad_subject!r}")
        self.spatial_size, self.cache_dir, self.batch_size = spatial_size, Path(cache_dir), batch_size
        self.num_workers, self.seed, self.on_bad_subject = num_workers, seed, on_bad_subject
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
    def scan(self) -> tuple[list[SubjectRecord], list[Problem]]:
        """Every subject found (stable order) and every problem of the listing itself."""

    @abstractmethod
    def load_subject(self, record: SubjectRecord) -> tio.Subject:
        """A TorchIO subject with one ScalarImage per channel and a `brain` LabelMap (optional)."""

    def cache_fields(self) -> dict[str, Any]:
        """The settings that decide the preprocessed content (they name the cache folder)."""
        return {}

    def inspect_subject(self, record: SubjectRecord) -> list[Problem]:
        """Problems of one subject's files (full read); `msrl data check` runs it on every subject."""
        return []

    # Shared behaviour --------------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        """Channels of every item's image."""
        return len(self.channel_names)

    @property
    def cache_path(self) -> Path:
        """Folder of this configuration's cache: data-set name + hash of what decides the content."""
        fields = {"dataset": type(self).__name__, "spatial_size": self.spatial_size,
                  "channels": self.channel_names, "preprocessing": PREPROCESSING_VERSION,
                  "healthy_upper": self.healthy_upper, "lesion_key": self.lesion_key,
                  "intensity_window": self.intensity_window, **self.cache_fields()}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return self.cache_dir / f"{type(self).__name__}-{self.spatial_size}-{digest}"

    def scan_with_duplicates(self) -> tuple[list[SubjectRecord], list[Problem]]:
        """`scan()`, plus a problem for every subject id found more than once."""
        records, problems = self.scan()
        ids = [r.subject_id for r in records]
        problems += [Problem(i, "", "duplicate subject id") for i in sorted({i for i in ids if ids.count(i) > 1})]
        return records, problems

    def list_subjects(self) -> list[SubjectRecord]:
        """The subjects to use: `scan_with_duplicates()` with the `on_bad_subject` policy applied."""
        records = self._apply_policy(*self.scan_with_duplicates())
        if not records:
            raise DataError(type(self).__name__, [Problem("", "", "no usable subjects found")])
        return records

    def prepare_data(self) -> None:
        """Preprocess every subject missing from the cache (local rank 0 only, once per node).

        How much work this is depends on the cache, so it leaves the global random generators as it
        found them: a run with a cold cache draws what a run with a warm one draws.
        """
        with unchanged_random_state():
            self._preprocess_missing()

    def _preprocess_missing(self) -> None:
        records = self.list_subjects()
        self.cache_path.mkdir(parents=True, exist_ok=True)
        todo = [r for r in records if not self._file(r).exists()]
        problems: list[Problem] = []
        if todo:
            log.info("preprocessing %d subjects into %s", len(todo), self.cache_path)
            by_id = {r.subject_id: r for r in todo}
            # its own generator: a DataLoader otherwise draws its workers' base seed from the global one
            jobs = DataLoader(_PreprocessJobs(self, todo), batch_size=None, num_workers=self.num_workers,
                              generator=torch.Generator().manual_seed(self.seed))
            for subject_id, tensors, problem in tqdm(jobs, total=len(todo), desc="preprocess", leave=False):
                if problem is None:
                    atomic_save(tensors, self._file(by_id[subject_id]))
                else:
                    problems.append(problem)
        records = self._apply_policy(records, problems)
        index = [{**asdict(r), "cache_file": self._file(r).name} for r in records]
        atomic_write_text(json.dumps(index, indent=1, default=str), self.cache_path / "index.json")

    def setup(self, stage: str | None = None) -> None:
        """Read the cache index and build the train/val/test datasets."""
        index_file = self.cache_path / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file} does not exist: run prepare_data() first")
        rows = json.loads(index_file.read_text())
        files = [self.cache_path / row.pop("cache_file") for row in rows]
        records = [SubjectRecord(**{**row, "files": tuple(row["files"])}) for row in rows]
        split = stratified_split([r.label for r in records], self.val_fraction, self.test_fraction, self.seed)
        for name, indices in split.items():
            self.datasets[name] = CachedVolumeDataset([files[i] for i in indices], [records[i] for i in indices])

    def intensity_histogram(self, bins: int = 64, background: float = FOREGROUND_THRESHOLD) -> torch.Tensor:
        """Mean normalised foreground histogram [bins] over [-1, 1] of the training split.

        Computed once and stored with the cache (the intensity-histogram reward compares to it).
        """
        split = f"{self.seed}-{self.val_fraction}-{self.test_fraction}"
        file = self.cache_path / f"histogram-{bins}-{background}-{split}.pt"
        if file.exists():
            return torch.load(file, weights_only=True)
        if not self.datasets:
            self.prepare_data()
            self.setup("fit")
        train = self.datasets["train"]
        histogram = torch.stack([foreground_histogram(train[i]["image"], bins, background)
                                 for i in range(len(train))]).mean(0)
        atomic_save(histogram, file)
        return histogram

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
            raise ValueError(f"the {split} split is empty: raise the number of subjects or the {split}_fraction")
        return ResumableLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _apply_policy(self, records: list[SubjectRecord], problems: list[Problem]) -> list[SubjectRecord]:
        """Log warnings; raise on errors, or (on_bad_subject="skip") drop the subjects they name."""
        for problem in problems:
            if problem.severity == "warning":
                log.warning("%s", problem)
        errors = [p for p in problems if p.severity == "error"]
        if not errors:
            return records
        if self.on_bad_subject == "error" or any(not p.subject_id for p in errors):
            raise DataError(type(self).__name__, errors,
                            hint="Fix or remove these files, or set on_bad_subject: skip to leave the subjects out.")
        bad = {p.subject_id for p in errors}
        for problem in errors:
            log.warning("skipping subject %s: %s", problem.subject_id, problem)
        kept = [r for r in records if r.subject_id not in bad]
        log.warning("skipped %d of %d subjects (on_bad_subject: skip)", len(records) - len(kept), len(records))
        return kept

    def _file(self, record: SubjectRecord) -> Path:
        """Cache file of a subject, named by the path, size and mtime of each of its source files."""
        if not record.files:
            return self.cache_path / f"{record.subject_id}.pt"
        stats = []
        for name in record.files:
            stat = os.stat(name)
            stats.append((os.path.abspath(name), stat.st_size, stat.st_mtime_ns))
        digest = hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:12]
        return self.cache_path / f"{record.subject_id}-{digest}.pt"
