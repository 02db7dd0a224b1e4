"""OASIS-1 cross-sectional data, read as users have it on disk (docs/design.md §1).

```
disc1/OAS1_0001_MR1/PROCESSED/MPRAGE/T88_111/OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.{hdr,img}
...
oasis_cross-sectional.csv      ID, M/F, Hand, Age, Educ, SES, MMSE, CDR, eTIV, nWBV, ASF, Delay
```
The Analyze files carry no usable orientation: they are read with nibabel and given the fixed
LAS 1 mm affine (SimpleITK, TorchIO's default reader, orients them differently). An empty CDR
means "no rating", never 0.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchio as tio

from datamodules.base import SubjectRecord, VolumeDataModule
from datamodules.problems import Problem, inspect_volume, read_volume
from datamodules.release import resolve_root

LAS_1MM = np.diag([-1.0, 1.0, 1.0, 1.0])
LabelMode = Literal["cdr_binary", "cdr_multiclass", "none"]
CDR_CLASSES = {0.0: 0, 0.5: 1, 1.0: 2, 2.0: 3}


def _number(text: str | None) -> float:
    """A CSV cell as a float; NaN when empty (OASIS leaves CDR and MMSE empty for many subjects)."""
    text = (text or "").strip()
    return float(text) if text else math.nan


class OASIS1DataModule(VolumeDataModule):
    """OASIS-1: T1 MRI of 416 subjects; labels from CDR (dementia rating).

    Args:
        root: the folder holding `disc1 … disc12` (or the subject folders directly); None reads
            the environment variable MSRL_OASIS1_ROOT.
        csv_path: the demographics CSV; None: `oasis_cross-sectional.csv` in `root`.
        label_mode: "cdr_binary" (CDR ≥ 0.5 → 1, CDR 0 → 0, no CDR → left out),
            "cdr_multiclass" (CDR 0 / 0.5 / 1 / 2 → 0..3), or "none" (every subject, label −1).
        include_reliability: keep the `_MR2` re-scans (20 subjects scanned twice).
        masked: the skull-stripped `*_t88_masked_gfc.img` (True) or the unmasked `*_t88_gfc.img`.
        expected_shape: the release's volume shape, checked by `msrl data check` (None: skip).
        **kwargs: see `VolumeDataModule`.
    """

    def __init__(self, root: str | None = None, csv_path: str | None = None, label_mode: LabelMode = "cdr_binary",
                 include_reliability: bool = False, masked: bool = True,
                 expected_shape: tuple[int, int, int] | None = (176, 208, 176), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if label_mode not in ("cdr_binary", "cdr_multiclass", "none"):
            raise ValueError(f"label_mode must be cdr_binary, cdr_multiclass or none; got {label_mode!r}")
        self.root, self.csv_path, self.label_mode = root, csv_path, label_mode
        self.include_reliability, self.masked, self.expected_shape = include_reliability, masked, expected_shape

    @property
    def channel_names(self) -> list[str]:
        """One T1 channel."""
        return ["t1"]

    @property
    def num_classes(self) -> int:
        """2 (binary CDR), 4 (CDR classes) or 0 (unlabelled)."""
        return {"cdr_binary": 2, "cdr_multiclass": 4, "none": 0}[self.label_mode]

    def cache_fields(self) -> dict[str, Any]:
        """Masked or not changes the content; labels do not (they live in the index)."""
        return {"masked": self.masked}

    def _subject_folders(self, root: Path) -> dict[str, Path]:
        folders = sorted(root.glob("disc*/OAS1_*_MR*")) + sorted(root.glob("OAS1_*_MR*"))
        return {f.name: f for f in folders if f.is_dir()}

    def _read_csv(self, root: Path) -> tuple[Path, dict[str, dict[str, str]]]:
        path = Path(self.csv_path) if self.csv_path else root / "oasis_cross-sectional.csv"
        if not path.is_file():
            raise FileNotFoundError(f"OASIS1DataModule: {path} does not exist (set csv_path)")
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"ID", "M/F", "Age", "MMSE", "CDR"} <= set(rows[0]):
            raise ValueError(f"OASIS1DataModule: {path} lacks the columns ID, M/F, Age, MMSE, CDR")
        return path, {row["ID"].strip(): row for row in rows}

    def _label(self, cdr: float) -> int | None:
        """The label for a CDR under `label_mode`, or None when the subject has no label."""
        if self.label_mode == "none":
            return -1
        if math.isnan(cdr):
            return None
        if self.label_mode == "cdr_binary":
            return int(cdr >= 0.5)
        return CDR_CLASSES.get(cdr)

    def scan(self) -> tuple[list[SubjectRecord], list[Problem]]:
        """Subjects with images and a CSV row; every mismatch between the two is a problem."""
        root = resolve_root(self.root, "MSRL_OASIS1_ROOT", "OASIS1DataModule", "oasis1 (holding disc1 … disc12)")
        csv_file, rows = self._read_csv(root)
        folders = self._subject_folders(root)
        pattern = "*_t88_masked_gfc.img" if self.masked else "*_t88_gfc.img"
        records, problems = [], []
        for subject_id, folder in folders.items():
            if subject_id.endswith("_MR2") and not self.include_reliability:
                continue
            row = rows.get(subject_id)
            if row is None:  # without a row there is no label; in "none" mode the image is still usable
                severity = "warning" if self.label_mode == "none" else "error"
                problems.append(Problem(subject_id, str(folder), f"images without a row in {csv_file.name}", severity))
                if severity == "error":
                    continue
            image_folder = folder / "PROCESSED/MPRAGE/T88_111"
            images = sorted(image_folder.glob(pattern))
            if len(images) != 1:
                what = "no" if not images else f"{len(images)} (ambiguous)"
                problems.append(Problem(subject_id, str(image_folder), f"{what} {pattern} files"))
                continue
            if not images[0].with_suffix(".hdr").is_file():
                problems.append(Problem(subject_id, str(images[0].with_suffix(".hdr")), "missing Analyze header"))
                continue
            meta = {"age": math.nan, "sex": "", "mmse": math.nan, "cdr": math.nan}
            if row is not None:
                meta = {"age": _number(row["Age"]), "sex": row["M/F"].strip(), "mmse": _number(row["MMSE"]),
                        "cdr": _number(row["CDR"])}
            label = self._label(meta["cdr"])
            if label is None:
                continue  # no CDR rating: not part of a labelled task (counted by `msrl data check`)
            records.append(SubjectRecord(subject_id, label, source=str(folder), meta=meta,
                                         files=(str(images[0]), str(images[0].with_suffix(".hdr")))))
        for subject_id in sorted(set(rows) - set(folders)):
            if subject_id.endswith("_MR2") and not self.include_reliability:
                continue
            problems.append(Problem(subject_id, str(csv_file), "CSV row without images (disc not downloaded?)",
                                    "warning"))
        return records, problems

    def load_subject(self, record: SubjectRecord) -> tio.Subject:
        """The T1 with the fixed LAS 1 mm affine; brain = voxels > 0 of the masked image."""
        data, affine, _ = read_volume(record.files[0], affine=LAS_1MM, require_finite=True)
        subject = tio.Subject(t1=tio.ScalarImage(tensor=torch.from_numpy(data[None]), affine=affine))
        if self.masked:
            subject.add_image(tio.LabelMap(tensor=torch.from_numpy((data > 0)[None].astype(np.uint8)),
                                           affine=affine), "brain")
        else:  # the unmasked image has a head around the brain: its foreground stands for the brain
            threshold = np.percentile(data[data > 0], 20) if np.any(data > 0) else 0.0
            subject.add_image(tio.LabelMap(tensor=torch.from_numpy((data > threshold)[None].astype(np.uint8)),
                                           affine=affine), "brain")
        return subject

    def inspect_subject(self, record: SubjectRecord) -> list[Problem]:
        """The image readable, 176×208×176 at 1 mm, finite and not empty."""
        return inspect_volume(record.subject_id, record.files[0], self.expected_shape, 1.0, affine=LAS_1MM)
