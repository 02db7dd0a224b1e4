"""What `msrl evaluate` measures: the volumes of every source, each under a named sampler.

A checkpoint is sampled at the evaluation's sampler and at the rollout sampler each fine-tuned
checkpoint recorded (the sampler PPO trained), always with the same seeds, so two checkpoints
sampled at one sampler are paired volume by volume (docs/design.md §5). Folders of `msrl sample`
and first-stage reconstructions are read as they are. Fine-tuned checkpoints also say which reward
trained them; `reward_of` rebuilds it so the evaluated volumes can be scored with it.

A ControlNet checkpoint (`msrl train-controlnet`, recognised by `msrl_controlnet`) draws volume i
from the held-out mask assigned to it (`assign_masks`); a plain checkpoint draws the same labels at
the same seeds and ignores the mask, so both pair volume by volume (mask fidelity's "no mask
conditioning" row). Its synthetic training pairs come from the training split's masks instead:
volumes drawn from held-out masks would leak the test lesions into what the utility networks learn.
A checkpoint fine-tuned under a ControlNet (`msrl_masks`) draws as a ControlNet does, with the recorded
ControlNet's residuals on its own UNet (`msrl.samples.MaskFinetuned`), so it pairs volume by volume with
that ControlNet and with the plain base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datamodules.base import VolumeDataModule
from lightning_modules.checkpoint_io import load_weights
from lightning_modules.controlnet import CONTROLNET_KEY, ControlNetModule
from lightning_modules.controlnet.module import check_base
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.finetune import REWARD_KEY, ROLLOUT_KEY
from lightning_modules.finetune.masks import MASKS_KEY
from msrl.evaluation.extractors import file_digest
from msrl.evaluation.segmenter import MaskedVolumes
from msrl.evaluation.utility import LabelledVolumes
from msrl.samples import (
    MaskFinetuned,
    controlnet_record,
    draw_volumes,
    load_checkpoint,
    load_mask_generator,
    read_samples,
    recorded_controlnet,
)

SYNTHETIC_PAIRS_SEED = 100_000  # training-mask draw k is seeded seed + 100 000 + 10 000·k (no evaluation draw's noise)


@dataclass(frozen=True)
class Sampler:
    """A DDIM sampler: steps, η and classifier-free guidance weight."""

    steps: int
    eta: float
    guidance_scale: float = 1.0

    @property
    def label(self) -> str:
        """`ddim50-eta0` (with `-cfg<w>` when guided): the name records and tables use."""
        text = f"ddim{self.steps}-eta{self.eta:g}"
        return text + (f"-cfg{self.guidance_scale:g}" if self.guidance_scale != 1.0 else "")

    def as_dict(self) -> dict[str, Any]:
        """The sampler as metrics.json writes it."""
        return {"label": self.label, "steps": self.steps, "eta": self.eta, "guidance_scale": self.guidance_scale}


@dataclass
class SourceVolumes:
    """The volumes of one source under one sampler, and what metrics.json says about them."""

    name: str
    kind: str  # "checkpoint", "generated" or "autoencoder"
    path: str
    volumes: LabelledVolumes
    sampler: Sampler | None = None
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    masks: torch.Tensor | None = None  # [N, 1, S, S, S]: the held-out mask each volume is judged against

    @property
    def masked(self) -> MaskedVolumes | None:
        """The volumes with their masks (None when the source has none)."""
        return None if self.masks is None else MaskedVolumes(self.volumes.volumes, self.masks)

    @property
    def key(self) -> str:
        """Entry name: the source name, with the sampler appended for a sampler other than the evaluation's."""
        return self.info.get("entry_name", self.name)


def real_volumes(data: VolumeDataModule, split: str) -> LabelledVolumes:
    """Volumes and labels of one split of the data module ("all": every split)."""
    names = ["train", "val", "test"] if split == "all" else [split]
    items = [data.datasets[name][i] for name in names for i in range(len(data.datasets[name]))]
    if not items:
        raise ValueError(f"the real split {split!r} of {type(data).__name__} is empty")
    return LabelledVolumes(torch.stack([item["image"] for item in items]),
                           torch.tensor([int(item["label"]) for item in items]))


def real_masks(data: VolumeDataModule, split: str) -> torch.Tensor | None:
    """Lesion masks [N, 1, S, S, S] (label codes) of one split, in `real_volumes`' order; None if it serves no `seg`."""
    names = ["train", "val", "test"] if split == "all" else [split]
    items = [data.datasets[name][i] for name in names for i in range(len(data.datasets[name]))]
    if not items or any("seg" not in item for item in items):
        return None
    return torch.stack([item["seg"] for item in items]).to(torch.uint8)


def assign_masks(labels: torch.Tensor | None, heldout_labels: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The held-out volume whose mask volume i is drawn from: the next held-out volume of its class, cycling.

    Args:
        labels: the class of each drawn volume [N] (None: unconditional, every held-out volume in turn).
        heldout_labels: the held-out volumes' classes.
        num_samples: volumes drawn.
    """
    if labels is None:
        return torch.arange(num_samples) % len(heldout_labels)
    chosen, used = [], {}
    for label in labels.tolist():
        pool = torch.nonzero(heldout_labels == label).flatten()
        if len(pool) == 0:
            raise ValueError(f"the held-out split has no volume of class {label}, whose mask a class-{label} "
                             "volume would be drawn from")
        chosen.append(int(pool[used.get(label, 0) % len(pool)]))
        used[label] = used.get(label, 0) + 1
    return torch.tensor(chosen)


def checkpoint_metadata(path: str) -> dict[str, Any]:
    """`msrl_rollout`, `msrl_reward`, `msrl_controlnet` and `msrl_masks` of a checkpoint (none: a pretrained one)."""
    checkpoint = load_weights(path)
    return {key: checkpoint[key] for key in (ROLLOUT_KEY, REWARD_KEY, CONTROLNET_KEY, MASKS_KEY)
            if key in checkpoint}


def draws_from_masks(metadata: dict[str, Any]) -> bool:
    """Whether a checkpoint's metadata (`checkpoint_metadata`) is a ControlNet's or a model's fine-tuned under one."""
    return CONTROLNET_KEY in metadata or MASKS_KEY in metadata


def check_conditioning_files(metadata: dict[str, dict[str, Any]]) -> None:
    """Refuse, before any compute, a ControlNet's missing or changed base, or a fine-tuned model's ControlNet (or its
    base), each file named (`check_base`, `msrl.samples.recorded_controlnet`)."""
    for path, info in metadata.items():
        if MASKS_KEY in info:
            check_base(controlnet_record(info), recorded_controlnet(path, info))
        elif CONTROLNET_KEY in info:
            check_base(info[CONTROLNET_KEY], path)


Generator = DiffusionModule | ControlNetModule | MaskFinetuned


def load_generator(path: str, device: torch.device, from_masks: bool) -> Generator:
    """The model of a checkpoint, ready to sample: a diffusion model, or what draws from masks (files checked)."""
    return load_mask_generator(path, device) if from_masks else load_checkpoint(path, device)


def draw(model: Generator, count: int, labels: torch.Tensor | None, masks: torch.Tensor | None, sampler: Sampler,
         seed: int, batch_size: int) -> torch.Tensor:
    """Volumes drawn in batches seeded `seed + start` (as `draw_volumes`); a mask generator under `masks`, else none.

    A ControlNet, its base and a model fine-tuned under it draw the same noise at the same seeds, so they pair
    volume by volume.
    """
    if isinstance(model, DiffusionModule):
        return draw_volumes(model, count, labels, steps=sampler.steps, eta=sampler.eta,
                            guidance_scale=sampler.guidance_scale, seed=seed, batch_size=batch_size)[0]
    if masks is None:
        raise ValueError("a ControlNet (or a model fine-tuned under one) draws from lesion masks, and the data serves "
                         "none (no 'seg' key)")
    volumes = []
    for start in range(0, count, batch_size):
        chunk = slice(start, start + batch_size)
        volumes.append(model.generate(masks[chunk], None if labels is None else labels[chunk], num_steps=sampler.steps,
                                      eta=sampler.eta, guidance_scale=sampler.guidance_scale, seed=seed + start).cpu())
    return torch.cat(volumes)


def rollout_sampler(metadata: dict[str, Any]) -> Sampler | None:
    """The sampler a fine-tuned checkpoint was trained with (None for a pretraining checkpoint)."""
    rollout = metadata.get(ROLLOUT_KEY)
    if not rollout:
        return None
    return Sampler(int(rollout["num_steps"]), float(rollout["eta"]), float(rollout.get("guidance_scale", 1.0)))


def samplers_for(evaluation: Sampler, metadata: dict[str, dict[str, Any]]) -> list[Sampler]:
    """The evaluation's sampler first, then every distinct rollout sampler of the fine-tuned checkpoints."""
    samplers = [evaluation]
    for info in metadata.values():
        sampler = rollout_sampler(info)
        if sampler is not None and sampler not in samplers:
            samplers.append(sampler)
    return samplers


@dataclass
class Heldout:
    """The masks checkpoints draw from: held-out masks for evaluation, training masks for synthetic pairs.

    Attributes:
        masks: [M, 1, S, S, S] the held-out split's masks; volume i is drawn from masks[index[i]].
        index: [N] the held-out volume assigned to each drawn volume (`assign_masks`).
        train: the training split's volumes with their masks, and `train_labels` their classes.
        pair_draws: independent draws a ControlNet makes from the training masks (one per utility or
            segmentation seed, whichever are more; 0 when neither runs).
    """

    masks: torch.Tensor
    index: torch.Tensor
    train: MaskedVolumes
    train_labels: torch.Tensor
    pair_draws: int


def sample_checkpoint(name: str, path: str, samplers: list[Sampler], evaluation: Sampler, num_samples: int,
                      seed: int, batch_size: int, data: VolumeDataModule, device: torch.device,
                      extra_draws: int = 0, from_masks: bool = False, heldout: Heldout | None = None
                      ) -> tuple[list[SourceVolumes], list[LabelledVolumes], list[MaskedVolumes]]:
    """The checkpoint's volumes at every sampler (same seeds), its utility draws and its synthetic pairs.

    A plain checkpoint's `extra_draws` (evaluation sampler, seeds offset by 10 000 per draw) are
    training sets for the utility classifiers of later seeds: synthetic utility then covers
    independent synthetic data. A checkpoint drawing from masks (`from_masks`: a ControlNet, or a model
    fine-tuned under one) draws `heldout.pair_draws` sets from the training split's masks instead, each
    volume with its own class: the training sets of both the segmenters (pairs) and the classifiers
    (labelled volumes). With `heldout`, every volume carries the held-out mask it was drawn from (drawing
    from masks) or is judged against (a plain checkpoint).
    """
    if from_masks and heldout is None:
        raise ValueError(f"--checkpoint {path} draws from lesion masks: it needs the held-out masks to draw from")
    model = load_generator(path, device, from_masks)
    num_classes = model.hparams.num_classes
    if num_classes != data.num_classes:
        raise ValueError(f"--checkpoint {path} has {num_classes} classes, the data {data.num_classes}")
    labels = torch.arange(num_samples) % max(num_classes, 1)
    conditional = labels if num_classes else None
    masks = None if heldout is None else heldout.masks[heldout.index]
    info = {"sha256_8": file_digest(path)}
    if heldout is not None:
        info["mask_conditioned"] = from_masks
    if isinstance(model, ControlNetModule):
        info["base_checkpoint"] = str(model.base_path)
    if isinstance(model, MaskFinetuned):  # fine-tuned under this ControlNet, drawn with its residuals
        info["controlnet_checkpoint"] = str(model.controlnet_path)
    out = []
    for sampler in samplers:
        volumes = draw(model, num_samples, conditional, masks, sampler, seed, batch_size)
        check_size(volumes, data, "checkpoint", path)
        entry_name = name if sampler == evaluation else f"{name} [{sampler.label}]"
        out.append(SourceVolumes(name, "checkpoint", path, LabelledVolumes(volumes, labels), sampler, seed,
                                 {"entry_name": entry_name, **info}, masks))
    if from_masks:
        pairs = []
        train_labels = heldout.train_labels if num_classes else None
        for k in range(heldout.pair_draws):
            volumes = draw(model, len(heldout.train_labels), train_labels, heldout.train.masks, evaluation,
                           seed + SYNTHETIC_PAIRS_SEED + 10_000 * k, batch_size)
            pairs.append(MaskedVolumes(volumes, heldout.train.masks))
        return out, [LabelledVolumes(p.volumes, heldout.train_labels) for p in pairs], pairs
    draws = []
    for k in range(1, extra_draws + 1):
        volumes = draw(model, num_samples, conditional, None, evaluation, seed + 10_000 * k, batch_size)
        draws.append(LabelledVolumes(volumes, labels))
    return out, draws, []


def read_generated(name: str, path: str, data: VolumeDataModule) -> SourceVolumes:
    """A folder written by `msrl sample` (labels required)."""
    volumes, labels = read_samples(path)
    if labels is None:
        raise ValueError(f"--generated {path}: its manifest.csv has no labels; utility and per-class FID need them")
    check_size(volumes, data, "generated", path)
    return SourceVolumes(name, "generated", path, LabelledVolumes(volumes, labels))


@torch.no_grad()
def reconstruct(name: str, path: str, reference: LabelledVolumes, batch_size: int, device: torch.device,
                split: str, masks: torch.Tensor | None = None) -> SourceVolumes:
    """The first stage's reconstructions of the reference volumes: the FID floor of a latent generator."""
    from lightning_modules.diffusion.latent import LatentSpace

    first_stage = LatentSpace(path).to(device)
    volumes = torch.cat([first_stage.decode(first_stage.encode(chunk.to(device))).cpu()
                         for chunk in reference.volumes.split(batch_size)])
    return SourceVolumes(name, "autoencoder", path, LabelledVolumes(volumes, reference.labels),
                         info={"sha256_8": file_digest(path), "reconstructs": f"the {split} real volumes"}, masks=masks)


def check_size(volumes: torch.Tensor, data: VolumeDataModule, kind: str, path: str | Path) -> None:
    """Refuse volumes whose side differs from the real data's."""
    if volumes.shape[-1] != data.spatial_size:
        raise ValueError(f"{kind} {path}: volumes of side {volumes.shape[-1]}, the real data {data.spatial_size}; "
                         "set --data.init_args.spatial_size to the model's")


def source_entry(source: SourceVolumes) -> dict[str, Any]:
    """metrics.json's description of a source: where its volumes came from and how they were drawn."""
    described: dict[str, Any] = {source.kind: source.path}
    described.update({k: v for k, v in source.info.items() if k != "entry_name"})
    entry: dict[str, Any] = {"name": source.key, "model": source.name, "source": described}
    entry["sampling"] = None if source.sampler is None else {**source.sampler.as_dict(), "seed": source.seed}
    return entry
