"""Fake BraTS 2019 and OASIS-1 trees that copy the releases' layouts file name for file name.

Volumes are small (unless a test asks for the real sizes): an ellipsoidal "brain" of random
tissue, and for BraTS a tumour in `seg` (labels 1, 2, 4).
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
OASIS_COLUMNS = ["ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF", "Delay"]


def brain_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A positive ellipsoid of textured intensities inside a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    inside = (grid**2).sum(-1) < 0.7
    return np.where(inside, 100 + 40 * rng.random(shape), 0).astype(np.float32)


def make_brats(root: Path, cases: dict[str, list[str]], shape: tuple[int, int, int] = (24, 24, 16),
               doubled: bool = False, name_mapping: dict[str, str] | None = None) -> Path:
    """A BraTS 2019 training tree; returns the folder holding HGG/ and LGG/.

    Args:
        root: where to create it.
        cases: {"HGG": [case ids], "LGG": [...]}.
        shape: volume shape (the release's is 240×240×155).
        doubled: nest it as MICCAI_BraTS_2019_Data_Training/MICCAI_BraTS_2019_Data_Training/.
        name_mapping: {case id: grade} rows for name_mapping.csv (default: the folders' grades).
    """
    folder = root / "MICCAI_BraTS_2019_Data_Training"
    if doubled:
        folder = folder / "MICCAI_BraTS_2019_Data_Training"
    for grade, ids in cases.items():
        for index, case in enumerate(ids):
            case_dir = folder / grade / case
            case_dir.mkdir(parents=True)
            seed = 10 * index + (grade == "HGG")
            for m_index, modality in enumerate(BRATS_MODALITIES):
                data = brain_volume(shape, seed + m_index) * (1 + m_index)
                nib.save(nib.Nifti1Image(data, np.eye(4)), case_dir / f"{case}_{modality}.nii.gz")
            seg = np.zeros(shape, dtype=np.uint8)
            centre = np.array(shape) // 2 + np.array([3, -2, 1])
            seg[tuple(slice(c - 2, c + 2) for c in centre)] = 2
            seg[tuple(slice(c - 1, c + 1) for c in centre)] = 4
            nib.save(nib.Nifti1Image(seg, np.eye(4)), case_dir / f"{case}_seg.nii.gz")
    mapping = name_mapping or {case: grade for grade, ids in cases.items() for case in ids}
    with open(folder / "name_mapping.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                         "BraTS_2019_subject_ID"])
        for case, grade in mapping.items():
            writer.writerow([grade, "NA", "NA", "NA", case])
    return folder


def make_oasis(root: Path, subjects: dict[str, str], csv_rows: dict[str, str] | None = None,
               shape: tuple[int, int, int] = (22, 26, 22), runs: dict[str, int] | None = None) -> Path:
    """An OASIS-1 tree (disc1/, disc2/, CSV); returns `root`.

    Args:
        root: where to create it.
        subjects: {subject id (OAS1_0001_MR1): CDR text ("" for none)} that have images.
        csv_rows: {subject id: CDR text} in the CSV (default: the same as `subjects`).
        shape: volume shape (the release's is 176×208×176).
        runs: {subject id: n} for the `mpr_n<n>` part of the file name (default 4).
    """
    for index, subject in enumerate(sorted(subjects)):
        disc = root / f"disc{1 + index % 2}"
        folder = disc / subject / "PROCESSED" / "MPRAGE" / "T88_111"
        folder.mkdir(parents=True)
        n = (runs or {}).get(subject, 4)
        data = brain_volume(shape, index)[..., None]  # Analyze files of OASIS are 4D with one frame
        image = nib.AnalyzeImage(data, np.diag([1.0, 1.0, 1.0, 1.0]))
        nib.save(image, folder / f"{subject}_mpr_n{n}_anon_111_t88_masked_gfc.img")
        nib.save(nib.AnalyzeImage(data + 5, np.eye(4)), folder / f"{subject}_mpr_n{n}_anon_111_t88_gfc.img")
    rows = subjects if csv_rows is None else csv_rows
    with open(root / "oasis_cross-sectional.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(OASIS_COLUMNS)
        for index, (subject, cdr) in enumerate(sorted(rows.items())):
            mmse = "" if cdr == "" else str(30 - 4 * int(float(cdr) * 2))
            writer.writerow([subject, "FM"[index % 2], "R", 60 + index, "", "", mmse, cdr, "1500", "0.75", "1.2", ""])
    return root
