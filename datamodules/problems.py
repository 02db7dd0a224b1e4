"""Problems found in a data set on disk, and the checks that find them in single files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set: which subject (or ""), which file, what, how bad."""

    subject_id: str
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.subject_id, self.path) if part)
        return f"{self.severity}: {where}: {self.message}" if where else f"{self.severity}: {self.message}"


class DataError(ValueError):
    """Raised when a data set has errors; its message lists every one of them."""

    def __init__(self, dataset: str, problems: list[Problem], hint: str = "") -> None:
        self.problems = problems
        lines = [f"{dataset}: {len(problems)} problem(s):"] + [f"  - {p}" for p in problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def read_volume(path: str | Path, affine: np.ndarray | None = None,
                require_finite: bool = False) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Read a NIfTI/Analyze volume fully with nibabel, with errors that name the file.

    Args:
        path: a `.nii`, `.nii.gz` or Analyze `.img` (its `.hdr` beside it).
        affine: replace the file's affine (OASIS-1's Analyze files need the fixed LAS one).
        require_finite: raise when any voxel is NaN or infinite (loading for training does).

    Returns:
        data: float32 [D, H, W] (a trailing singleton 4th axis is dropped), the affine, voxel sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file does not exist")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files; all mean "unreadable"
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if require_finite and not np.isfinite(data).all():
        raise ValueError(f"{path}: {int((~np.isfinite(data)).sum())} non-finite voxels (NaN/inf)")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, (image.affine if affine is None else affine), zooms


def inspect_volume(subject_id: str, path: str | Path, expected_shape: tuple[int, int, int] | None,
                   expected_spacing: float | None, affine: np.ndarray | None = None) -> list[Problem]:
    """Every problem of one file: unreadable, wrong shape or spacing, non-finite or empty voxels."""
    try:
        data, _, zooms = read_volume(path, affine)
    except (FileNotFoundError, ValueError) as exc:
        return [Problem(subject_id, str(path), str(exc).removeprefix(f"{path}: "))]
    problems = []
    if expected_shape is not None and tuple(data.shape) != tuple(expected_shape):
        problems.append(Problem(subject_id, str(path), f"shape {data.shape}, the release has {tuple(expected_shape)}"))
    if expected_spacing is not None and not np.allclose(zooms, expected_spacing, atol=1e-3):
        problems.append(Problem(subject_id, str(path), f"voxel size {zooms} mm, the release has {expected_spacing} mm"))
    finite = np.isfinite(data)
    if not finite.all():
        problems.append(Problem(subject_id, str(path), f"{int((~finite).sum())} non-finite voxels (NaN/inf)"))
    elif not np.any(data):
        problems.append(Problem(subject_id, str(path), "every voxel is 0"))
    return problems
