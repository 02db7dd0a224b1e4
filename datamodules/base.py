"""`VolumeDataModule`: what every data set shares — preprocessing, on-disk cache, splits, items.

A data set states only what differs: which subjects exist and what is wrong with the listing
(`scan`), and how to read one subject into a TorchIO subject (`load_subject`). The base applies the
`on_bad_subject` policy, preprocesses every subject once (docs/design.md §1) into a cache keyed by the
preprocessing settings and by each source file's path, size and mtime, checks that cache before a run
reads it (datamodules/cache_index.py), splits deterministically by `seed` with stratification by label,
and serves items `{"image": float32 [C, D, H, W] in [-1, 1], "label": int64 [], "subject_id": str}`
(plus `"seg"`: uint8 [1, D, H, W] lesion labels, and `"meta"`, where the data set has them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.atomic import atomic_save
from datamodules.cache_index import CachedVolumeDataset, CacheEntry, CacheIndex, CacheVerifier, VerifyCache
from datamodules.preprocessing import FOREGROUND_THRESHOLD, Preprocessed, foreground_histogram, preprocess_volume
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
            image, mask, lesion = self.module.preprocess(self.module.load_subject(record))
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
        verify_cache: how every process checks each cache file against the index before the first
            step: "size" (truncated files) or "checksum" (any damage; reads each file once).
    """

    cache_dtype = torch.float32
    lesion_key: str | None = None  # a LabelMap of lesion voxels left out of the intensity percentiles
    intensity_window: tuple[float, float] | None = None  # a known intensity scale instead of per-volume percentiles

    def __init__(self, spatial_size: int = 32, cache_dir: str | Path = "data/cache", batch_size: int = 2,
                 num_workers: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0, on_bad_subject: Literal["error", "skip"] = "error", healthy_upper: float = 1.0,
                 verify_cache: VerifyCache = "checksum") -> None:
        super().__init__()
        self.verify_cache, self._verifier = verify_cache, CacheVerifier(verify_cache)
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

    def preprocess(self, subject: tio.Subject) -> Preprocessed:
        """One subject through the shared preprocessing with this data set's size and intensity settings."""
        return preprocess_volume(subject, self.channel_names, self.spatial_size, lesion_key=self.lesion_key,
                                 healthy_upper=self.healthy_upper, window=self.intensity_window)

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
        """Preprocess every subject missing from the cache, rebuild damaged files (local rank 0, once per node).

        How much work this is depends on the cache, so it leaves the global random generators as it
        found them: a run with a cold cache draws what a run with a warm one draws.
        """
        with unchanged_random_state():
            self._preprocess_missing()

    def _preprocess_missing(self) -> None:
        """Preprocess the subjects not cached yet, rebuild damaged cache files, write the index.

        A file the index lists that is missing or fails the check (`verify_cache`) is rebuilt, with a
        warning naming the subject and the file. A damaged file whose rebuild fails stops the run
        whatever `on_bad_subject` says, naming the file; deleting it makes the subject a new one.
        """
        records = self.list_subjects()
        self.cache_path.mkdir(parents=True, exist_ok=True)
        entries, damaged = self.cache.triage({r.subject_id: self._file(r) for r in records})
        problems = self._preprocess([r for r in records if r.subject_id not in entries], entries)
        refused = [Problem(p.subject_id, str(damaged[p.subject_id]), f"damaged, and rebuilding it failed: {p.message}")
                   for p in problems if p.subject_id in damaged]
        if refused:
            raise DataError(type(self).__name__, refused, hint=(
                "Restore the subjects' source files, or these cache files from an intact copy of the cache, and run "
                "again; or delete them: the subjects are then preprocessed anew, as on_bad_subject says."))
        records = self._apply_policy(records, problems)
        self.cache.write([(asdict(r), entries[r.subject_id]) for r in records])

    def _preprocess(self, todo: list[SubjectRecord], entries: dict[str, CacheEntry]) -> list[Problem]:
        """Preprocess `todo` into the cache (one atomic write each), adding their entries; the failures."""
        if not todo:
            return []
        log.info("preprocessing %d subjects into %s", len(todo), self.cache_path)
        by_id, problems = {r.subject_id: r for r in todo}, []
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global one
        jobs = DataLoader(_PreprocessJobs(self, todo), batch_size=None, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))
        for subject_id, tensors, problem in tqdm(jobs, total=len(todo), desc="preprocess", leave=False):
            if problem is None:
                file = self._file(by_id[subject_id])
                atomic_save(tensors, file)
                entries[subject_id] = CacheEntry.written(file)
            else:
                problems.append(problem)
        return problems

    @property
    def cache(self) -> CacheIndex:
        """The index of this configuration's cache folder, checked as `verify_cache` says."""
        return CacheIndex(self.cache_path, self._verifier)

    def read_index(self) -> list[tuple[SubjectRecord, CacheEntry]]:
        """The subjects of the cache index and their cache files (raises when there is no index yet)."""
        try:
            return [(SubjectRecord(**{**fields, "files": tuple(fields.get("files", ()))}), entry)
                    for fields, entry in self.cache.read()]
        except TypeError as exc:  # a row whose fields are not a SubjectRecord's
            raise ValueError(f"{self.cache.file} is unreadable ({exc}); expected the index prepare_data writes: "
                             "delete it and run again to rewrite it") from exc

    def cache_problems(self, verify: VerifyCache | None = None) -> list[Problem]:
        """Every cache file the index lists that is missing or damaged ([] without an index); see `CacheIndex`."""
        return self.cache.problems(self.read_index(), verify) if self.cache.file.exists() else []

    def setup(self, stage: str | None = None) -> None:
        """Check every file of the cache index (`verify_cache`), then build the train/val/test datasets.

        Every process checks, before the first step; only prepare_data (local rank 0) mends, so what
        is still damaged here stops the run, the files named. All splits are checked whatever the
        stage: callers that set up "fit" read the test split too (msrl evaluate).
        """
        pairs = self.read_index()
        problems = [replace(p, severity="error") for p in self.cache.problems(pairs)]
        if problems:
            raise DataError(type(self).__name__, problems, hint=(
                "These cache files were damaged after prepare_data checked them (it mends on local rank 0 "
                "only): run again."))
        files, records = [entry.path for _, entry in pairs], [record for record, _ in pairs]
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
            try:
                return torch.load(file, weights_only=True)
            except Exception as exc:  # torch raises several types for a damaged file; it is computed again
                log.warning("%s is unreadable (%s): computing the histogram again", file, type(exc).__name__)
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
