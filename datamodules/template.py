"""The embedded data set: a labelled cohort synthesised from nilearn's real MNI152 templates.

nilearn ships the MNI ICBM152 2009 T1, grey-matter, white-matter and brain-mask maps in its
wheel, so this cohort needs no download. Each subject is made SynthSeg-style (Billot et al.
2023): random per-tissue intensities mixed with the real T1, a random smooth deformation, a bias
field and noise (TorchIO's random transforms). Class 1 carries a tumour-like lesion (necrotic
core, enhancing rim, oedema) in the white matter. Everything is drawn from generators seeded by
`(seed, subject index)`, so the same seed gives identical volumes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torchio as tio

from datamodules.base import SubjectRecord, VolumeDataModule
from datamodules.problems import Problem

GENERATOR_VERSION = 3  # part of the cache key: bump when the synthesis changes


@lru_cache(maxsize=2)
def load_mni152(resolution: int) -> dict[str, Any]:
    """The MNI152 T1, GM, WM and brain-mask arrays at `resolution` mm, cropped to the brain."""
    from nilearn import datasets  # heavy import, only needed when a cohort is built

    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    mask = mask_img.get_fdata() > 0.5
    maps = {
        "t1": datasets.load_mni152_template(resolution=resolution).get_fdata(),
        "gm": datasets.load_mni152_gm_template(resolution=resolution).get_fdata(),
        "wm": datasets.load_mni152_wm_template(resolution=resolution).get_fdata(),
    }
    box = tuple(slice(max(idx.min() - 3, 0), idx.max() + 4) for idx in np.nonzero(mask))
    out = {name: np.asarray(array, dtype=np.float32)[box] / max(float(array.max()), 1e-6)
           for name, array in maps.items()}
    out["mask"] = mask[box]
    out["affine"] = mask_img.affine.copy()
    return out


def lesion_maps(mask_shape: tuple[int, int, int], wm: np.ndarray, rng: np.random.Generator,
                radius_fraction: tuple[float, float]) -> dict[str, np.ndarray]:
    """Soft maps of a tumour's oedema, enhancing rim and necrotic core, centred in white matter.

    Args:
        mask_shape: [D, H, W] of the volume.
        wm: white-matter probability, used to place the centre.
        rng: generator of the subject.
        radius_fraction: range of the core radius, as a fraction of the shortest side.

    Returns:
        {"oedema", "rim", "core"}: float32 maps in [0, 1].
    """
    candidates = np.argwhere(wm > 0.6)
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    radius = rng.uniform(*radius_fraction) * min(mask_shape)
    axes = radius * rng.uniform(0.75, 1.25, size=3)  # an ellipsoid, not a ball
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in mask_shape], indexing="ij"), axis=-1)
    distance = np.sqrt((((grid - centre) / axes) ** 2).sum(-1))  # 1.0 on the core-rim boundary

    def soft_ball(r: float, softness: float = 0.15) -> np.ndarray:
        return 1.0 / (1.0 + np.exp((distance - r) / softness))

    core = soft_ball(0.7)
    rim = np.clip(soft_ball(1.0) - core, 0, 1)
    oedema = np.clip(soft_ball(rng.uniform(1.6, 2.2), softness=0.3) - soft_ball(1.0), 0, 1)
    return {"oedema": oedema.astype(np.float32), "rim": rim.astype(np.float32), "core": core.astype(np.float32)}


def synthesise_subject(index: int, label: int, seed: int, resolution: int) -> tio.Subject:
    """One synthetic subject; identical for identical (index, label, seed, resolution)."""
    template = load_mni152(resolution)
    rng = np.random.default_rng([seed, index])
    mask = template["mask"]
    gm, wm = template["gm"] * mask, template["wm"] * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    # Random tissue contrasts, T1-like ordering kept (WM > GM > CSF) so the images stay brain MRI.
    mu_wm, mu_gm, mu_csf = rng.uniform(0.75, 0.95), rng.uniform(0.45, 0.62), rng.uniform(0.08, 0.25)
    tissue = mu_wm * wm + mu_gm * gm + mu_csf * csf
    mix = rng.uniform(0.3, 0.7)
    augment_seed = int(rng.integers(2**31))
    image = (mix * template["t1"] + (1.0 - mix) * tissue) * mask
    if label == 1:  # its own generator: a subject with and without lesion differ only in the lesion
        parts = lesion_maps(mask.shape, wm, np.random.default_rng([seed, index, 1]), radius_fraction=(0.08, 0.13))
        for name, value in (("oedema", 0.32), ("rim", 1.4), ("core", 0.05)):  # contrast-enhanced look
            image = image * (1.0 - parts[name]) + value * parts[name] * mask
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(image[None].astype(np.float32)), affine=template["affine"]),
        brain=tio.LabelMap(tensor=torch.from_numpy(mask[None].astype(np.uint8)), affine=template["affine"]),
    )
    augment = tio.Compose([
        tio.RandomAffine(scales=0.06, degrees=5, translation=2 * resolution, default_pad_value=0),
        tio.RandomElasticDeformation(num_control_points=6, max_displacement=3.0 * resolution, locked_borders=2),
        tio.RandomBiasField(coefficients=0.3),
        tio.RandomNoise(std=(0.0, 0.02)),
    ])
    with torch.random.fork_rng(devices=[]):  # TorchIO draws from torch's global generator
        torch.manual_seed(augment_seed)
        return augment(subject)


class TemplateCohortDataModule(VolumeDataModule):
    """A labelled cohort built from the MNI152 templates: class 1 has a tumour-like lesion.

    Args:
        num_subjects: subjects in the cohort (half of each class, up to one).
        template_resolution: mm per voxel of the template the cohort is synthesised from
            (2 is plenty below 64³, 1 gives the full detail for 64³/128³); None picks by size.
        **kwargs: see `VolumeDataModule` (spatial_size, cache_dir, batch_size, seed, ...).
    """

    def __init__(self, num_subjects: int = 64, template_resolution: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_subjects < 2:
            raise ValueError(f"num_subjects must be >= 2 (one per class), got {num_subjects}")
        if template_resolution not in (None, 1, 2):
            raise ValueError(f"template_resolution must be 1, 2 or None, got {template_resolution}")
        self.num_subjects = num_subjects
        self.template_resolution = template_resolution or (2 if self.spatial_size <= 48 else 1)

    @property
    def channel_names(self) -> list[str]:
        """One T1-like channel."""
        return ["image"]

    @property
    def num_classes(self) -> int:
        """Healthy (0) and lesion (1)."""
        return 2

    def cache_fields(self) -> dict[str, Any]:
        """Size, seed, template resolution and generator version decide the cohort."""
        return {"num_subjects": self.num_subjects, "seed": self.seed,
                "template_resolution": self.template_resolution, "generator": GENERATOR_VERSION}

    def scan(self) -> tuple[list[SubjectRecord], list[Problem]]:
        """Balanced labels, in an order shuffled by the seed; a synthetic cohort has no problems."""
        labels = np.arange(self.num_subjects) % 2
        labels = labels[np.random.default_rng([self.seed, 2**20]).permutation(self.num_subjects)]
        records = [SubjectRecord(f"template_{i:04d}", int(label), source=f"MNI152 cohort seed {self.seed}")
                   for i, label in enumerate(labels)]
        return records, []

    def load_subject(self, record: SubjectRecord) -> tio.Subject:
        """Synthesise the subject from its index, label and the cohort's seed."""
        index = int(record.subject_id.rsplit("_", 1)[1])
        return synthesise_subject(index, record.label, self.seed, self.template_resolution)
