"""The preprocessed cache's index: what `index.json` records of each cache file, and the checks against it.

Atomic writes (datamodules/atomic.py) keep a cache whole while msrl writes it, not afterwards: a copy
cut short, a full quota or a flaky network file system leaves a truncated `.pt` file that fails only
when an epoch reaches it, hours in, on one rank. So the index records each cache file's size and
SHA-256 when it is written, `VolumeDataModule.prepare_data` rebuilds what fails the check, `setup`
refuses what is still damaged (in every process, before the first step), and `load_entry` names the
file and the subject of anything damaged later still.

An index written before these checks (rows without "size") is read, not refused: its files are
checked by loading each one fully (a truncated or garbled file fails to load), and the next
`prepare_data` records their sizes and checksums.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import Dataset

from datamodules.atomic import atomic_write_text
from datamodules.digest import sha256_of
from datamodules.problems import Problem

log = logging.getLogger(__name__)

# "size" catches truncated and empty files at no cost; "checksum" (the default) also catches damage that
# keeps the size (a garbled block), for reading each file once per process: less than one epoch reads.
VerifyCache = Literal["size", "checksum"]
ENTRY_KEYS = ("cache_file", "size", "sha256")  # what an index row holds beyond the subject's record


class Subject(Protocol):
    """What the index needs of a subject's record (`datamodules.base.SubjectRecord`)."""

    subject_id: str
    label: int
    files: tuple[str, ...]
    meta: dict[str, Any]


class DamagedCacheError(RuntimeError):
    """A cache file that cannot be read; the message names the file and the subject."""


def first_sentence(exc: BaseException) -> str:
    """An error's first sentence (PyTorch's zip errors go on to call a damaged cache file a checkpoint)."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


@dataclass(frozen=True)
class CacheEntry:
    """One subject's cache file and what it was when written (None: an index older than the checks)."""

    path: Path
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def written(cls, path: Path) -> CacheEntry:
        """The entry of a file as it is now on disk (just written, or just checked by loading)."""
        return cls(path, path.stat().st_size, sha256_of(path))

    @classmethod
    def from_row(cls, folder: Path, row: dict[str, Any]) -> CacheEntry:
        """The entry of an index row (its `ENTRY_KEYS`); an old row has only `cache_file`."""
        if "cache_file" not in row:
            raise ValueError(f"{folder / 'index.json'}: a row without 'cache_file' ({row}); expected the rows "
                             "prepare_data writes: delete index.json and run again to rewrite it")
        return cls(folder / row["cache_file"], row.get("size"), row.get("sha256"))

    @property
    def recorded(self) -> bool:
        """Whether the index holds this file's size and checksum."""
        return self.size is not None and self.sha256 is not None

    def row(self) -> dict[str, Any]:
        """The entry's part of an index row."""
        return {"cache_file": self.path.name, "size": self.size, "sha256": self.sha256}


def load_entry(path: Path, subject_id: str) -> dict[str, torch.Tensor]:
    """The tensors of one cache file (`image`, `mask`, `seg` where lesions are labelled), weights only.

    Raises:
        DamagedCacheError: naming the file and the subject, instead of PyTorch's "failed finding
            central directory ... your checkpoint file is corrupted".
    """
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError: all mean unreadable
        raise DamagedCacheError(f"{path}: the cached volume of subject {subject_id} cannot be read "
                                f"({first_sentence(exc)}). "
                                "It was damaged after the run checked it; run again: prepare_data rebuilds it "
                                "from its source.") from None  # its first sentence is all the user needs
    if not isinstance(tensors, dict) or not isinstance(tensors.get("image"), torch.Tensor):
        raise DamagedCacheError(f"{path}: the cached volume of subject {subject_id} holds no 'image' tensor; "
                                "delete it and run again: prepare_data rebuilds it from its source.")
    return tensors


class CachedVolumeDataset(Dataset):
    """Items read from the preprocessed cache, one `.pt` file per subject (a damaged one is named)."""

    def __init__(self, files: list[Path], records: list[Subject]) -> None:
        self.files, self.records = files, records

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        tensors = load_entry(self.files[index], record.subject_id)
        item = {"image": tensors["image"].float(), "label": torch.tensor(record.label, dtype=torch.int64),
                "subject_id": record.subject_id}
        if "seg" in tensors:  # the lesion's labels where the data set has them (BraTS, the template cohort)
            item["seg"] = tensors["seg"].to(torch.uint8)  # [1, D, H, W]
        if record.meta:
            item["meta"] = record.meta
        return item


class CacheVerifier:
    """Checks cache files against their index entries, each file once per process while it is unchanged.

    `prepare_data` and `setup` run in one process on local rank 0: the second check of a file that
    passed the first, with the same size and modification time, costs a `stat`.

    Args:
        verify: "size" or "checksum" (see `VerifyCache`).
    """

    def __init__(self, verify: VerifyCache = "checksum") -> None:
        if verify not in ("size", "checksum"):
            raise ValueError(f"verify_cache must be 'size' or 'checksum', got {verify!r}")
        self.verify = verify
        self._passed: dict[Path, tuple[int, int, VerifyCache]] = {}  # size, mtime and check of files that passed

    def damage(self, entry: CacheEntry, subject_id: str, verify: VerifyCache | None = None) -> str | None:
        """What is wrong with the entry's file ("is missing", "has 1000 bytes, ..."), or None when usable.

        Args:
            verify: overrides the verifier's setting for this check.
        """
        try:
            stat = entry.path.stat()
        except FileNotFoundError:
            return "is missing"
        verify = verify or self.verify
        passed = self._passed.get(entry.path)
        if passed is not None and passed[:2] == (stat.st_size, stat.st_mtime_ns) and verify in ("size", passed[2]):
            return None
        if not entry.recorded:  # an index older than the checks: only a full load tells
            try:
                load_entry(entry.path, subject_id)
            except DamagedCacheError as exc:
                return f"is unreadable ({first_sentence(exc.__context__ or exc)})"
        elif stat.st_size != entry.size:
            return f"has {stat.st_size} bytes, the index records {entry.size}"
        elif verify == "checksum" and sha256_of(entry.path) != entry.sha256:
            return "differs from the SHA-256 the index records"
        self._passed[entry.path] = (stat.st_size, stat.st_mtime_ns, verify if entry.recorded else "checksum")
        return None


class CacheIndex:
    """`index.json` of one cache folder: a row per subject, its record's fields and its file's entry.

    Args:
        folder: the cache folder of one data-set configuration (`VolumeDataModule.cache_path`).
        verifier: the data module's (it remembers the files that passed in this process).
    """

    def __init__(self, folder: Path, verifier: CacheVerifier) -> None:
        self.folder, self.file, self.verifier = folder, folder / "index.json", verifier

    def read(self) -> list[tuple[dict[str, Any], CacheEntry]]:
        """Each row's record fields and cache entry, in the index's order.

        Raises:
            FileNotFoundError: prepare_data has not written the index yet.
            ValueError: the index is not one prepare_data writes (damaged, or edited).
        """
        if not self.file.exists():
            raise FileNotFoundError(f"{self.file} does not exist: run prepare_data() first")
        try:
            rows = json.loads(self.file.read_text())
            return [({k: v for k, v in row.items() if k not in ENTRY_KEYS}, CacheEntry.from_row(self.folder, row))
                    for row in rows]
        except (ValueError, TypeError, AttributeError) as exc:  # bad JSON, or rows that are not dicts
            raise ValueError(f"{self.file} is unreadable ({exc}); expected the index prepare_data writes: "
                             "delete it and run again to rewrite it") from exc

    def write(self, rows: list[tuple[dict[str, Any], CacheEntry]]) -> None:
        """Replace the index (atomically) with these record fields and entries."""
        index = [{**fields, **entry.row()} for fields, entry in rows]
        atomic_write_text(json.dumps(index, indent=1, default=str), self.file)

    def triage(self, files: dict[str, Path]) -> tuple[dict[str, CacheEntry], dict[str, Path]]:
        """Sort the subjects' cache files (subject id -> file) before prepare_data builds what is missing.

        Returns:
            usable: the entries of files that pass the check (recorded now where the index had not).
            damaged: files the index lists that are missing or fail the check, one warning each.
            Files never built (a cold cache, a new subject) are in neither.
        """
        try:
            indexed = {entry.path.name: entry for _, entry in self.read()}
        except FileNotFoundError:
            indexed = {}
        except ValueError as exc:
            log.warning("%s; checking every cache file by loading it", exc)
            indexed = {}
        usable, damaged = {}, {}
        for subject_id, file in files.items():
            if file.name not in indexed and not file.exists():
                continue
            entry = indexed.get(file.name, CacheEntry(file))
            reason = self.verifier.damage(entry, subject_id)
            if reason is None:
                usable[subject_id] = entry if entry.recorded else CacheEntry.written(file)
            else:
                log.warning("subject %s: %s %s; rebuilding it from its source", subject_id, file, reason)
                damaged[subject_id] = file
        return usable, damaged

    def problems(self, subjects: list[tuple[Subject, CacheEntry]], verify: VerifyCache | None = None
                 ) -> list[Problem]:
        """Every listed cache file that is missing or damaged, and what to do about it.

        A warning where the subject's source is still there (the next prepare_data rebuilds the
        file; synthesised subjects have no files, so always), an error where it is gone.
        """
        problems = []
        for subject, entry in subjects:
            reason = self.verifier.damage(entry, subject.subject_id, verify)
            if reason is None:
                continue
            if all(Path(name).is_file() for name in subject.files):
                problems.append(Problem(subject.subject_id, str(entry.path),
                                        f"cache file {reason}; the next run rebuilds it from its source", "warning"))
            else:
                problems.append(Problem(subject.subject_id, str(entry.path),
                                        f"cache file {reason}, and its source files are gone: restore them, or this "
                                        "file from an intact copy of the cache"))
        return problems
