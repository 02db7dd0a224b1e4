"""BraTS 2019 training data, read as users have it on disk (docs/design.md §1).

```
MICCAI_BraTS_2019_Data_Training/          (possibly inside a folder of the same name)
  name_mapping.csv                        Grade, ..., BraTS_2019_subject_ID
  HGG/BraTS19_CBICA_AAB_1/BraTS19_CBICA_AAB_1_{t1,t1ce,t2,flair,seg}.nii.gz
  LGG/BraTS19_2013_0_1/BraTS19_2013_0_1_{t1,t1ce,t2,flair,seg}.nii.gz
```
The label is the grade (HGG 1, LGG 0), from the folder and cross-checked with name_mapping.csv.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchio as tio

from datamodules.base import SubjectRecord, VolumeDataModule
from datamodules.problems import Problem, inspect_volume, read_volume
from datamodules.release import find_release_folder, resolve_root

Modality = Literal["t1", "t1ce", "t2", "flair"]
Grade = Literal["HGG", "LGG"]
GRADE_LABEL = {"HGG": 1, "LGG": 0}


class BraTS2019DataModule(VolumeDataModule):
    """BraTS 2019: multi-modal glioma MRI, label = grade (HGG 1, LGG 0).

    Args:
        root: the folder holding `HGG/` and `LGG/`, or a parent of it (two levels at most);
            None reads the environment variable MSRL_BRATS2019_ROOT.
        modalities: channels, in this order (any ordered subset of t1, t1ce, t2, flair).
        grades: which grades to include.
        tumour_crop: crop a cube of `tumour_crop_size` voxels around the tumour (from `seg`)
            before the usual brain crop, instead of using the whole brain.
        tumour_crop_size: side of that cube in voxels (1 mm).
        seg_channel: add the segmentation as a last input channel (off: it is a label, not MRI).
        expected_shape: the release's volume shape, checked by `msrl data check` (None: skip).
        exclude_tumour: take the intensity percentiles from the brain outside `seg`, so that a large
            enhancing tumour does not set T1ce's upper percentile and darken the healthy tissue
            (datamodules/preprocessing.py); False: the whole brain, as before.
        healthy_upper: where the healthy brain's upper percentile lands on [-1, 1]: 0.3 leaves an
            enhancing tumour or a FLAIR-bright oedema up to 1.5× that percentile room before +1.
        **kwargs: see `VolumeDataModule`.
    """

    def __init__(self, root: str | None = None, modalities: list[Modality] | None = None,
                 grades: list[Grade] | None = None, tumour_crop: bool = False, tumour_crop_size: int = 128,
                 seg_channel: bool = False, expected_shape: tuple[int, int, int] | None = (240, 240, 155),
                 exclude_tumour: bool = True, healthy_upper: float = 0.3, **kwargs: Any) -> None:
        super().__init__(healthy_upper=healthy_upper, **kwargs)
        self.exclude_tumour = exclude_tumour
        self.root = root
        self.modalities = list(modalities or ["t1", "t1ce", "t2", "flair"])
        self.grades = list(grades or ["HGG", "LGG"])
        bad = [m for m in self.modalities if m not in ("t1", "t1ce", "t2", "flair")]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct names from t1, t1ce, t2, flair; got {self.modalities}")
        if not self.grades or any(g not in GRADE_LABEL for g in self.grades):
            raise ValueError(f"grades must be a non-empty subset of HGG, LGG; got {self.grades}")
        self.tumour_crop, self.tumour_crop_size, self.seg_channel = tumour_crop, tumour_crop_size, seg_channel
        self.expected_shape = expected_shape

    @property
    def channel_names(self) -> list[str]:
        """The modalities, then `seg` when it is an input channel."""
        return self.modalities + (["seg"] if self.seg_channel else [])

    @property
    def lesion_key(self) -> str | None:  # type: ignore[override]
        """`seg` (the tumour) stays out of the intensity percentiles unless exclude_tumour is off."""
        return "seg" if self.exclude_tumour else None

    @property
    def num_classes(self) -> int:
        """HGG vs LGG."""
        return 2

    def cache_fields(self) -> dict[str, Any]:
        """Crop settings change the content; the file list is in each subject's cache name."""
        return {"tumour_crop": self.tumour_crop, "tumour_crop_size": self.tumour_crop_size}

    def release_folder(self) -> Path:
        """The folder that holds HGG/ and LGG/."""
        root = resolve_root(self.root, "MSRL_BRATS2019_ROOT", "BraTS2019DataModule", "MICCAI_BraTS_2019_Data_Training")
        return find_release_folder(root, lambda f: any((f / g).is_dir() for g in ("HGG", "LGG")), depth=2,
                                   expected="HGG/ or LGG/")

    def _files_needed(self) -> list[str]:
        return self.modalities + (["seg"] if self.seg_channel or self.tumour_crop or self.exclude_tumour else [])

    def scan(self) -> tuple[list[SubjectRecord], list[Problem]]:
        """Cases of the chosen grades; missing files and grade disagreements are problems."""
        folder = self.release_folder()
        records, problems = [], []
        for grade in self.grades:
            if not (folder / grade).is_dir():
                problems.append(Problem("", str(folder / grade), f"folder missing ({grade} was asked for)"))
                continue
            for case in sorted(p for p in (folder / grade).iterdir() if p.is_dir()):
                # Exact suffix per modality: a prefix match on "t1" would also catch "t1ce".
                files = [case / f"{case.name}_{name}.nii.gz" for name in self._files_needed()]
                missing = [f for f in files if not f.is_file()]
                for file in missing:
                    problems.append(Problem(case.name, str(file), "missing modality file"))
                records.append(SubjectRecord(case.name, GRADE_LABEL[grade], source=str(case),
                                             files=tuple(str(f) for f in files), meta={"grade": grade}))
        problems += self._check_name_mapping(folder, records)
        return records, problems

    def _check_name_mapping(self, folder: Path, records: list[SubjectRecord]) -> list[Problem]:
        """Grades in name_mapping.csv must agree with the folders (when the file is there)."""
        mapping = folder / "name_mapping.csv"
        if not mapping.is_file():
            return []
        with open(mapping, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"Grade", "BraTS_2019_subject_ID"} <= set(rows[0]):
            return [Problem("", str(mapping), "expected columns Grade and BraTS_2019_subject_ID")]
        grades = {row["BraTS_2019_subject_ID"].strip(): row["Grade"].strip() for row in rows}
        problems = []
        for record in records:
            listed = grades.get(record.subject_id)
            if listed is not None and listed != record.meta["grade"]:
                problems.append(Problem(record.subject_id, str(mapping),
                                        f"name_mapping.csv says {listed}, the case is in {record.meta['grade']}/"))
        return problems

    def load_subject(self, record: SubjectRecord) -> tio.Subject:
        """The chosen modalities (+ seg), a brain mask (any modality > 0), optional tumour crop."""
        images: dict[str, Any] = {}
        volumes = [read_volume(f, require_finite=True) for f in record.files]
        affine = volumes[0][1]
        for name, (data, _, _) in zip(self._files_needed(), volumes, strict=True):
            tensor = torch.from_numpy(data[None])
            images[name] = (tio.LabelMap if name == "seg" else tio.ScalarImage)(tensor=tensor, affine=affine)
        brain = np.any([v[0] != 0 for v, name in zip(volumes, self._files_needed(), strict=True) if name != "seg"],
                       axis=0)
        images["brain"] = tio.LabelMap(tensor=torch.from_numpy(brain[None].astype(np.uint8)), affine=affine)
        subject = tio.Subject(images)
        if self.tumour_crop:
            subject = self._crop_around_tumour(subject, record)
        if self.seg_channel:  # as a channel, seg goes through intensity scaling like an image
            subject.add_image(tio.ScalarImage(tensor=subject["seg"].data.float(), affine=subject["seg"].affine), "seg")
        return subject

    def _crop_around_tumour(self, subject: tio.Subject, record: SubjectRecord) -> tio.Subject:
        tumour = np.argwhere(subject["seg"].data[0].numpy() > 0)
        if len(tumour) == 0:
            raise ValueError(f"{record.subject_id}: seg is empty, no tumour to crop around")
        centre = tumour.mean(axis=0).round().astype(int)
        half, shape = self.tumour_crop_size // 2, np.array(subject.spatial_shape)
        low = np.clip(centre - half, 0, None)
        high = np.clip(shape - (centre + half), 0, None)
        return tio.Crop((low[0], high[0], low[1], high[1], low[2], high[2]))(subject)

    def inspect_subject(self, record: SubjectRecord) -> list[Problem]:
        """Each file readable, 240×240×155 at 1 mm, finite and not empty."""
        return [p for f in record.files if Path(f).is_file()
                for p in inspect_volume(record.subject_id, f, self.expected_shape, 1.0)]
