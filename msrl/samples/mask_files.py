"""Lesion-mask files: reading and checking NIfTI masks, and writing volumes beside them with their geometry.

Shared by `msrl sample --mask` and the sampler of an exported ControlNet bundle, which carries this file
verbatim as `scripts/masks.py`: it imports only numpy, nibabel and the standard library. A mask is one
3-D label map of the model's S³ grid, in RAS+ orientation (`msrl data masks` writes such files from a data
set's cache), holding 0 and the model's label codes; anything else is refused, naming the file and what
differs, before anything is drawn. A volume drawn from `<stem>.nii.gz` is written beside it as
`<stem>_sample_<k>.nii.gz` with the mask's affine and header, and listed in the folder's `samples.csv`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

SAMPLE_NAME = re.compile(r"_sample_\d+\.nii(\.gz)?$")  # volumes written beside masks are never masks
MANIFEST = "samples.csv"
MANIFEST_FIELDS = ["file", "mask", "mask_sha256", "label", "seed", "checkpoint"]


def mask_stem(path: str) -> str:
    """The file name without `.nii.gz` / `.nii`."""
    name = os.path.basename(path)
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def sample_path(mask_path: str, index: int) -> str:
    """Where volume `index` drawn from a mask goes: `<folder>/<stem>_sample_<index>.nii.gz`."""
    return os.path.join(os.path.dirname(os.path.abspath(mask_path)), f"{mask_stem(mask_path)}_sample_{index}.nii.gz")


def mask_paths(specs: Sequence[str]) -> list[str]:
    """Mask files of `specs` (files, or folders whose `*.nii.gz`/`*.nii` count), in order, each once.

    A folder's hidden files and volumes already drawn (`*_sample_<k>.nii.gz`) are not masks.
    """
    found: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            names = sorted(n for n in os.listdir(spec) if n.endswith((".nii.gz", ".nii")) and not n.startswith(".")
                           and not SAMPLE_NAME.search(n))
            if not names:
                raise ValueError(f"mask folder {spec} holds no *.nii.gz masks")
            found += [os.path.join(spec, name) for name in names]
        elif os.path.isfile(spec):
            if not spec.endswith((".nii.gz", ".nii")):
                raise ValueError(f"mask {spec} is not a NIfTI file (.nii.gz or .nii)")
            found.append(spec)
        else:
            raise FileNotFoundError(f"mask {spec} does not exist (expected a .nii.gz label map or a folder of them)")
    unique = list(dict.fromkeys(os.path.abspath(path) for path in found))
    targets: dict[str, str] = {}
    for path in unique:  # `a.nii` and `a.nii.gz` would draw into the same `a_sample_<k>.nii.gz`
        other = targets.setdefault(sample_path(path, 0), path)
        if other != path:
            raise ValueError(f"masks {other} and {path} share the name {mask_stem(path)!r} in one folder: their "
                             "volumes would overwrite each other; rename one")
    return unique


def file_sha256(path: str) -> str:
    """SHA-256 of a file (recorded per volume: which mask drew it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Mask:
    """A checked mask: its file, label map [S, S, S] (uint8), NIfTI image (affine and header) and SHA-256."""

    path: str
    labels: np.ndarray
    image: nib.Nifti1Image
    sha256: str

    @property
    def lesion(self) -> bool:
        """Whether any voxel is lesion (a non-zero label)."""
        return bool(self.labels.any())


class MaskRules:
    """What a model accepts as a mask: a 3-D S³ integer label map in RAS+ holding only 0 and its label codes.

    Args:
        size: S, the side of the model's volumes.
        labels: the label codes of the model's condition channels (e.g. BraTS's 1, 2, 4).
        meanings: what each label means (named in refusals), in the order of `labels`.
    """

    def __init__(self, size: int, labels: Sequence[int], meanings: Sequence[str] = ()) -> None:
        self.size, self.labels, self.meanings = int(size), tuple(int(label) for label in labels), tuple(meanings)

    def problems(self, data: np.ndarray, affine: np.ndarray) -> list[str]:
        """What differs from an acceptable mask ([] when none): dimensions, size, values, orientation."""
        if data.ndim != 3:
            return [f"is {data.ndim}-D ({'×'.join(map(str, data.shape))}); a mask is one 3-D label map"]
        found: list[str] = []
        if data.shape != (self.size,) * 3:
            found.append(f"is {'×'.join(map(str, data.shape))}, the model draws {self.size}×{self.size}×{self.size} "
                         "volumes")
        if not np.issubdtype(data.dtype, np.integer):
            fractional = ~np.isfinite(data) | (data != np.round(np.nan_to_num(data)))
            if fractional.any():
                example = data[fractional].flat[0]
                found.append(f"holds non-integer values ({int(fractional.sum())} voxels, e.g. {example}); a mask "
                             "holds integer label codes")
                return found + self._orientation(affine)
        values, counts = np.unique(data, return_counts=True)
        unknown = {int(v): int(c) for v, c in zip(values, counts, strict=True) if int(v) not in (0, *self.labels)}
        if unknown:
            allowed = ", ".join(f"{label} ({meaning})" for label, meaning in zip(self.labels, self.meanings,
                                                                                 strict=False)) \
                or ", ".join(map(str, self.labels))
            found.append(f"holds labels {sorted(unknown)} (voxels per label: {unknown}) outside 0 and the model's "
                         f"mask labels {allowed}")
        return found + self._orientation(affine)

    @staticmethod
    def _orientation(affine: np.ndarray) -> list[str]:
        codes = nib.aff2axcodes(affine)
        if tuple(codes) == ("R", "A", "S"):
            return []
        return [f"has orientation {''.join(str(c) for c in codes)}, expected RAS+ (as the data set's cache): "
                "reorient it (e.g. nibabel.as_closest_canonical), or write a data set's masks with `msrl data masks`"]

    def read(self, path: str) -> tuple[Mask | None, list[str]]:
        """The mask of a NIfTI file, or None and what is wrong with it."""
        try:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)
        except Exception as exc:  # nibabel raises many types for a damaged or foreign file
            return None, [f"could not be read as NIfTI ({type(exc).__name__}: {exc})"]
        problems = self.problems(data, image.affine)
        if problems:
            return None, problems
        return Mask(os.path.abspath(path), data.astype(np.uint8), image, file_sha256(path)), []

    def read_all(self, paths: Iterable[str]) -> list[Mask]:
        """Every mask, checked; raises ValueError naming every refused file and what differs (nothing drawn)."""
        masks, refused = [], []
        for path in paths:
            mask, problems = self.read(path)
            if mask is None:
                refused.append(f"  {path}: " + "; ".join(problems))
            else:
                masks.append(mask)
        if refused:
            raise ValueError(f"{len(refused)} mask(s) refused, nothing was drawn:\n" + "\n".join(refused))
        return masks


def auto_label(mask: Mask) -> int:
    """Class 1 when the mask holds a lesion, else 0 (the template cohort's rule: class 1 ⇔ a lesion)."""
    return int(mask.lesion)


def volume_image(volume: np.ndarray, mask: Mask) -> nib.Nifti1Image:
    """A float32 volume [S, S, S] (or [S, S, S, C]) with the mask's affine and header (qform, sform, units)."""
    image = nib.Nifti1Image(volume.astype(np.float32), mask.image.affine, header=mask.image.header.copy())
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(None, None)
    return image


def label_map_image(labels: np.ndarray) -> nib.Nifti1Image:
    """A uint8 label map [S, S, S] with the identity affine (RAS+, voxel coordinates), as msrl writes volumes."""
    image = nib.Nifti1Image(labels.astype(np.uint8), np.eye(4))
    image.header.set_qform(np.eye(4), code=1)
    image.header.set_sform(np.eye(4), code=1)
    return image


class StagedFiles:
    """Images saved under hidden names beside their targets, moved into place together by `commit` (or removed)."""

    def __init__(self) -> None:
        self.staged: list[tuple[str, str]] = []

    def save(self, image: nib.Nifti1Image, path: str) -> None:
        """Save `image` for `path` under `.<name>.partial-<pid>.nii.gz` in the same folder."""
        folder, name = os.path.split(os.path.abspath(path))
        staging = os.path.join(folder, f".{mask_stem(name)}.partial-{os.getpid()}.nii.gz")
        nib.save(image, staging)
        self.staged.append((staging, path))

    def commit(self) -> None:
        """Move every staged file over its target."""
        for staging, path in self.staged:
            os.replace(staging, path)
        self.staged = []

    def discard(self) -> None:
        """Remove every staged file (after a failure)."""
        for staging, _ in self.staged:
            if os.path.exists(staging):
                os.remove(staging)
        self.staged = []


def update_manifest(folder: str, rows: list[dict[str, object]]) -> str:
    """Write `rows` into `folder/samples.csv`, keeping rows of other files already listed there."""
    path = os.path.join(folder, MANIFEST)
    kept: list[dict[str, object]] = []
    if os.path.isfile(path):
        with open(path, newline="") as handle:
            new = {str(row["file"]) for row in rows}
            kept = [row for row in csv.DictReader(handle) if row.get("file") not in new]
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(kept + rows, key=lambda row: str(row["file"])))
    os.replace(partial, path)
    return path
