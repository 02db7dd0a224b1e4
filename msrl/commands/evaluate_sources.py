"""What `msrl evaluate` measures: the volumes of every source, each under a named sampler.

A checkpoint is sampled at the evaluation's sampler and at the rollout sampler each fine-tuned
checkpoint recorded (the sampler PPO trained), always with the same seeds, so two checkpoints
sampled at one sampler are paired volume by volume (docs/design.md §5). Folders of `msrl sample`
and first-stage reconstructions are read as they are. Fine-tuned checkpoints also say which reward
trained them; `reward_of` rebuilds it so the evaluated volumes can be scored with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datamodules.base import VolumeDataModule
from lightning_modules.checkpoint_io import load_weights
from msrl.evaluation.extractors import file_digest
from msrl.evaluation.utility import LabelledVolumes
from msrl.samples import draw_volumes, load_checkpoint, read_samples


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


def checkpoint_metadata(path: str) -> dict[str, Any]:
    """`msrl_rollout` and `msrl_reward` of a checkpoint (empty for a pretraining checkpoint)."""
    checkpoint = load_weights(path)
    return {key: checkpoint[key] for key in ("msrl_rollout", "msrl_reward") if key in checkpoint}


def rollout_sampler(metadata: dict[str, Any]) -> Sampler | None:
    """The sampler a fine-tuned checkpoint was trained with (None for a pretraining checkpoint)."""
    rollout = metadata.get("msrl_rollout")
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


def sample_checkpoint(name: str, path: str, samplers: list[Sampler], evaluation: Sampler, num_samples: int,
                      seed: int, batch_size: int, data: VolumeDataModule, device: torch.device,
                      extra_draws: int = 0) -> tuple[list[SourceVolumes], list[LabelledVolumes]]:
    """The checkpoint's volumes at every sampler (same seeds), plus `extra_draws` independent draws.

    The extra draws (evaluation sampler, seeds offset by 10 000 per draw) are training sets for the
    utility classifiers of later seeds: synthetic utility then covers independent synthetic data.
    """
    model = load_checkpoint(path, device)
    num_classes = model.hparams.num_classes
    if num_classes != data.num_classes:
        raise ValueError(f"--checkpoint {path} has {num_classes} classes, the data {data.num_classes}")
    labels = torch.arange(num_samples) % max(num_classes, 1)
    conditional = labels if num_classes else None
    digest = file_digest(path)
    out = []
    for sampler in samplers:
        volumes, _ = draw_volumes(model, num_samples, conditional, steps=sampler.steps, eta=sampler.eta,
                                  guidance_scale=sampler.guidance_scale, seed=seed, batch_size=batch_size)
        check_size(volumes, data, "checkpoint", path)
        entry_name = name if sampler == evaluation else f"{name} [{sampler.label}]"
        out.append(SourceVolumes(name, "checkpoint", path, LabelledVolumes(volumes, labels), sampler, seed,
                                 {"entry_name": entry_name, "sha256_8": digest}))
    draws = []
    for draw in range(1, extra_draws + 1):
        volumes, _ = draw_volumes(model, num_samples, conditional, steps=evaluation.steps, eta=evaluation.eta,
                                  guidance_scale=evaluation.guidance_scale, seed=seed + 10_000 * draw,
                                  batch_size=batch_size)
        draws.append(LabelledVolumes(volumes, labels))
    return out, draws


def read_generated(name: str, path: str, data: VolumeDataModule) -> SourceVolumes:
    """A folder written by `msrl sample` (labels required)."""
    volumes, labels = read_samples(path)
    if labels is None:
        raise ValueError(f"--generated {path}: its manifest.csv has no labels; utility and per-class FID need them")
    check_size(volumes, data, "generated", path)
    return SourceVolumes(name, "generated", path, LabelledVolumes(volumes, labels))


@torch.no_grad()
def reconstruct(name: str, path: str, reference: LabelledVolumes, batch_size: int, device: torch.device,
                split: str) -> SourceVolumes:
    """The first stage's reconstructions of the reference volumes: the FID floor of a latent generator."""
    from lightning_modules.diffusion.latent import LatentSpace

    first_stage = LatentSpace(path).to(device)
    volumes = torch.cat([first_stage.decode(first_stage.encode(chunk.to(device))).cpu()
                         for chunk in reference.volumes.split(batch_size)])
    return SourceVolumes(name, "autoencoder", path, LabelledVolumes(volumes, reference.labels),
                         info={"sha256_8": file_digest(path), "reconstructs": f"the {split} real volumes"})


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
