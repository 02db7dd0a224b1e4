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
from datamodules.elastic import RandomFieldElasticDeformation
from datamodules.problems import Problem

GENERATOR_VERSION = 9  # part of the cache key: bump when the synthesis changes
# The enhancing rim's intensity over the healthy brain's 99.5th percentile (before the bias field): brighter than
# any white matter, and mostly below +1 once preprocessing maps that percentile to `healthy_upper`.
RIM_OVER_BRIGHTEST = (1.8, 2.0)
HEALTHY_PERCENTILES = (0.5, 99.5)  # the healthy brain's percentiles that define the cohort's intensity scale


@lru_cache(maxsize=2)
def load_mni152(resolution: int) -> dict[str, Any]:
    """The MNI152 T1, GM, WM and brain-mask arrays at `resolution` mm, cropped to the brain.

    Also "depth": each voxel's distance (voxels) to the outside of the brain, to place lesions inside it.
    """
    from nilearn import datasets  # heavy import, only needed when a cohort is built
    from scipy.ndimage import distance_transform_edt  # scipy comes with nilearn

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
    out["depth"] = distance_transform_edt(out["mask"]).astype(np.float32)
    out["affine"] = mask_img.affine.copy()
    return out


def smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, points: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1] over `shape`: a `points`³ grid of uniform values, trilinearly upsampled."""
    coarse = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(1, 1, points, points, points)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def lesion_maps(mask_shape: tuple[int, int, int], wm: np.ndarray, depth: np.ndarray, rng: np.random.Generator,
                radius_fraction: tuple[float, float]) -> dict[str, np.ndarray]:
    """Soft maps of a tumour's oedema, enhancing rim and necrotic core, centred in white matter.

    The outline is an ellipsoid with a smooth random bulge (up to ±20 % of the radius), so no two
    lesions have the same shape; the enhancing rim is thick (about half the radius) like a glioblastoma's.

    Args:
        mask_shape: [D, H, W] of the volume.
        wm: white-matter probability, used to place the centre.
        depth: distance to the outside of the brain: the enhancing rim stays inside it.
        rng: generator of the subject.
        radius_fraction: range of the enhancing rim's outer radius, as a fraction of the shortest side.

    Returns:
        {"oedema", "rim", "core"}: float32 maps in [0, 1] that sum to at most 1.
    """
    radius = rng.uniform(*radius_fraction) * min(mask_shape)
    candidates = np.argwhere((wm > 0.6) & (depth > 1.3 * radius))  # a tumour cut off by the skull looks wrong
    if len(candidates) == 0:  # only for radius_fraction far above the shipped range: the deepest white matter
        candidates = np.argwhere((wm > 0.6) & (depth >= depth[wm > 0.6].max()))
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    axes = radius * rng.uniform(0.8, 1.2, size=3)  # an ellipsoid, not a ball
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in mask_shape], indexing="ij"), axis=-1)
    distance = np.sqrt((((grid - centre) / axes) ** 2).sum(-1))  # 1.0 on the rim's outer boundary
    distance = distance / (1.0 + 0.2 * smooth_field(mask_shape, rng))  # an irregular outline

    def soft_ball(r: float, softness: float = 0.08) -> np.ndarray:
        return 1.0 / (1.0 + np.exp((distance - r) / softness))

    core = soft_ball(rng.uniform(0.35, 0.5))
    rim = np.clip(soft_ball(1.0) - core, 0, 1)
    oedema = np.clip(soft_ball(rng.uniform(1.4, 1.7), softness=0.12) - soft_ball(1.0), 0, 1)
    return {"oedema": oedema.astype(np.float32), "rim": rim.astype(np.float32), "core": core.astype(np.float32)}


def synthesise_subject(index: int, label: int, seed: int, resolution: int) -> tio.Subject:
    """One synthetic subject on the cohort's known intensity scale; identical for identical arguments.

    The scale is the subject's healthy brain: the same subject drawn without its lesion has its
    0.5th and 99.5th brain percentiles at 0 and 1 (`HEALTHY_PERCENTILES`), so the lesion adds
    voxels without moving the healthy tissue (preprocessing then maps this window as it stands).
    The lesion travels through the augmentation as a separate difference image (the spatial
    transforms and the bias field are linear in intensity; the noise is the healthy image's), so
    both twins come out of one augmentation pass.

    Returns:
        A subject with `image` (ScalarImage), `brain` and `seg` (LabelMaps; seg holds the lesion's
        parts by `SEG_LABELS`, all 0 for class 0).
    """
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
    affine = template["affine"]

    def volume(array: np.ndarray, kind: type[tio.Image]) -> tio.Image:
        return kind(tensor=torch.from_numpy(array[None]), affine=affine)

    subject = tio.Subject(image=volume(image.astype(np.float32), tio.ScalarImage),
                          brain=volume(mask.astype(np.uint8), tio.LabelMap))
    if label == 1:  # its own generator: a subject with and without lesion differ only in the lesion
        with_lesion, seg = add_lesion(image, mask, wm, template["depth"], np.random.default_rng([seed, index, 1]),
                                      mu_gm, mu_csf)
        subject.add_image(volume((with_lesion - image).astype(np.float32), tio.ScalarImage), "lesion")
        subject.add_image(volume(seg, tio.LabelMap), "seg")
    augment = [
        tio.RandomAffine(scales=0.06, degrees=5, translation=2 * resolution, default_pad_value=0),
        # TorchIO's RandomElasticDeformation, its B-spline evaluated once per subject (identical output, faster)
        RandomFieldElasticDeformation(num_control_points=6, max_displacement=3.0 * resolution, locked_borders=2),
        tio.RandomBiasField(coefficients=0.15),  # mild, as after a gain-field correction
        tio.RandomNoise(std=(0.0, 0.02), exclude=["lesion"]),
    ]
    with torch.random.fork_rng(devices=[]):  # TorchIO draws from torch's global generator
        for step, transform in enumerate(augment):  # a seed per transform: what one draws can't depend on the images
            torch.manual_seed(augment_seed + step)
            subject = transform(subject)
    healthy = subject["image"].data
    low, high = np.percentile(healthy[0].numpy()[subject["brain"].data[0].numpy() > 0], HEALTHY_PERCENTILES)
    if label == 1:
        healthy = healthy + subject["lesion"].data
        subject.remove_image("lesion")
    else:
        subject.add_image(tio.LabelMap(tensor=torch.zeros_like(subject["brain"].data), affine=subject["brain"].affine),
                          "seg")
    subject["image"].set_data((healthy - float(low)) / max(float(high - low), 1e-6))
    return subject


SEG_LABELS = {"core": 1, "oedema": 2, "rim": 4}  # BraTS's convention: necrotic core 1, oedema 2, enhancing 4
SEG_SUPPORT = 0.02  # a voxel the lesion's soft parts cover this much is labelled: the labels cover every changed voxel


def add_lesion(image: np.ndarray, mask: np.ndarray, wm: np.ndarray, depth: np.ndarray, rng: np.random.Generator,
               mu_gm: float, mu_csf: float) -> tuple[np.ndarray, np.ndarray]:
    """`image` with a contrast-enhanced (T1-Gd-like) glioblastoma: dark necrosis, bright rim, dim oedema.

    The intensities are set against the subject's own tissues: the rim is brighter than the
    brightest white matter (`RIM_OVER_BRIGHTEST`), the necrotic core as dark as CSF with a mottled
    texture, the oedema darker than white matter, near grey matter. The healthy tissue is left
    exactly as it was and the cohort's intensity scale comes from the healthy twin
    (`synthesise_subject`), so the class lives in the lesion alone.

    Returns:
        The image and its lesion labels [D, H, W] uint8 (`SEG_LABELS`, 0 elsewhere): each voxel the
        lesion changes (its parts sum to `SEG_SUPPORT` or more) takes the part that dominates it.
    """
    parts = lesion_maps(mask.shape, wm, depth, rng, radius_fraction=(0.09, 0.13))
    texture = smooth_field(mask.shape, rng, points=12)  # mottled necrosis, a patchy rim
    brightest = float(np.percentile(image[mask], HEALTHY_PERCENTILES[1]))  # the healthy scale's top, before the bias
    values = {
        "oedema": rng.uniform(0.85, 1.0) * mu_gm + 0.02 * texture,
        "rim": rng.uniform(*RIM_OVER_BRIGHTEST) * brightest * (1.0 + 0.05 * texture),
        "core": mu_csf * rng.uniform(0.9, 1.3) * (1.0 + 0.4 * texture),
    }
    for name, value in values.items():
        image = image * (1.0 - parts[name]) + value * parts[name] * mask
    names = list(SEG_LABELS)
    stacked = np.stack([parts[name] * mask for name in names])
    dominant = np.array([SEG_LABELS[name] for name in names], dtype=np.uint8)[stacked.argmax(0)]
    seg = np.where(stacked.sum(0) >= SEG_SUPPORT, dominant, 0).astype(np.uint8)
    return image, seg


class TemplateCohortDataModule(VolumeDataModule):
    """A labelled cohort built from the MNI152 templates: class 1 has a tumour-like lesion.

    Args:
        num_subjects: subjects in the cohort (half of each class, up to one).
        template_resolution: mm per voxel of the template the cohort is synthesised from
            (2 is plenty below 64³, 1 gives the full detail for 64³/128³); None picks by size.
        healthy_upper: where the healthy brain's upper percentile lands: 0.0 leaves the enhancing
            rim (`RIM_OVER_BRIGHTEST`) room above every healthy voxel without reaching +1.
        **kwargs: see `VolumeDataModule` (spatial_size, cache_dir, batch_size, seed, ...).
    """

    lesion_key = "seg"  # the lesion's parts, BraTS-style labels (SEG_LABELS)
    intensity_window = (0.0, 1.0)  # synthesised on a known scale: the healthy brain's percentiles at 0 and 1

    def __init__(self, num_subjects: int = 64, template_resolution: int | None = None, healthy_upper: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(healthy_upper=healthy_upper, **kwargs)
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
