"""The sampler an exported MONAI bundle runs (copied verbatim to the bundle's `scripts/sampler.py`).

Self-contained on purpose: it imports only torch, MONAI, nibabel and numpy, so a colleague runs the
bundle with `python -m monai.bundle run` without msrl. MONAI's inferers pass neither class labels nor
DDIM's η, so this file runs the DDIM loop itself with MONAI's `DDIMScheduler.step`, in the order
`msrl sample` draws its random numbers: per batch of `batch_size` volumes one generator seeded
`seed + first index`, the initial noise first, then each step's noise. Class `c`'s volumes are those
of `msrl sample --label c --seed seed`. A ControlNet bundle's `MaskSampler` adds the ControlNet's residuals
to the UNet's skips and draws the volumes of `msrl sample --mask`; its masks are read and checked by the
bundle's `scripts/masks.py` (msrl's `msrl/samples/mask_files.py`, copied), passed in by the config.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer, LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler


def load_weights(network: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load a state dict of plain tensors (read with weights_only=True) into `network`, strictly; eval mode."""
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network.eval().requires_grad_(False)


def set_betas(scheduler: DDIMScheduler, path: str) -> DDIMScheduler:
    """Give `scheduler` exactly the training betas stored at `path` (any beta schedule), as msrl does."""
    betas = torch.load(path, map_location="cpu", weights_only=True)["betas"].float()
    if len(betas) != scheduler.num_train_timesteps:
        raise ValueError(f"{path} holds {len(betas)} betas, the scheduler has {scheduler.num_train_timesteps} steps")
    alpha_to_one = bool(scheduler.final_alpha_cumprod == 1.0)  # the scheduler was built with set_alpha_to_one
    scheduler.betas = betas.clone()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.final_alpha_cumprod = torch.tensor(1.0) if alpha_to_one else scheduler.alphas_cumprod[0]
    return scheduler


class ConditionalSampler:
    """Class-conditional DDIM sampling with classifier-free guidance, decoding latents, writing NIfTI.

    Args:
        network: MONAI `DiffusionModelUNet` with the exported weights.
        inferer: `LatentDiffusionInferer` (its scheduler and scale_factor) or `DiffusionInferer`.
        sample_shape: [C, s, s, s] of what the UNet denoises.
        num_classes: class labels of the model (0: unconditional); label `num_classes` is the null class.
        autoencoder: the first stage (MONAI `VQVAE` / `AutoencoderKL`) of a latent model, else None.
        decode_batch_size: latents decoded per forward pass.
        affine: 4×4 affine of the written volumes.
    """

    def __init__(self, network: torch.nn.Module, inferer: DiffusionInferer, sample_shape: Sequence[int],
                 num_classes: int, autoencoder: torch.nn.Module | None = None, decode_batch_size: int = 4,
                 affine: Sequence[Sequence[float]] | None = None) -> None:
        self.network, self.inferer, self.autoencoder = network, inferer, autoencoder
        self.sample_shape, self.num_classes = tuple(int(s) for s in sample_shape), int(num_classes)
        self.decode_batch_size = decode_batch_size
        self.affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if (autoencoder is None) != (not isinstance(inferer, LatentDiffusionInferer)):
            raise ValueError("a latent model needs both an autoencoder and a LatentDiffusionInferer")

    def denoise(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The UNet's prediction for x_t [B, C, s, s, s] at `timesteps` [B]."""
        return self.network(x, timesteps, class_labels=labels)

    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance_scale: float
                ) -> torch.Tensor:
        """ε̂ = ε_∅ + w (ε_y − ε_∅) (Ho & Salimans 2022); conditional and null passes share one batch."""
        timesteps = t.expand(x.shape[0])
        if labels is None or guidance_scale == 1.0:
            return self.denoise(x, timesteps, labels)
        null = torch.full_like(labels, self.num_classes)
        both = self.denoise(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([labels, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def draw(self, count: int, labels: torch.Tensor | None, seed: int, steps: int, eta: float, guidance_scale: float,
             device: torch.device) -> torch.Tensor:
        """One batch: volumes [count, C, S, S, S] in [-1, 1] from the generator seeded `seed`."""
        scheduler = self.inferer.scheduler
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((count, *self.sample_shape), generator=generator, device=device)
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            prediction = self.predict(x, t, labels, guidance_scale)
            x, _ = scheduler.step(prediction, int(t), x, eta=eta, generator=generator)
        if self.autoencoder is None:
            return x.clamp(-1, 1)
        scale = self.inferer.scale_factor
        parts = [self.autoencoder.decode_stage_2_outputs(chunk.float() / scale).clamp(-1, 1)
                 for chunk in x.split(self.decode_batch_size)]
        return torch.cat(parts).clamp(-1, 1)

    def __call__(self, output_dir: str, classes: Sequence[int] | None, num_samples: int = 1,
                 num_inference_steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0,
                 batch_size: int = 4, device: str | torch.device = "cpu") -> list[str]:
        """Write `num_samples` volumes per class in `classes` (all of them if None) and `manifest.csv`.

        Files: `output_dir/class_<c>/sample_<i>.nii.gz` (`output_dir/sample_<i>.nii.gz` unconditional).
        Returns the written paths.
        """
        device = torch.device(device)
        self.network.to(device)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        if self.num_classes == 0:
            groups: list[int | None] = [None]
        else:
            groups = list(range(self.num_classes)) if classes is None else [int(c) for c in classes]
            bad = [c for c in groups if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"classes {bad}: the model has {self.num_classes} classes (0..{self.num_classes - 1})")
        rows, written = [], []
        for label in groups:
            folder = output_dir if label is None else os.path.join(output_dir, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for start in range(0, num_samples, batch_size):
                count = min(batch_size, num_samples - start)
                labels = None if label is None else torch.full((count,), label, dtype=torch.long, device=device)
                volumes = self.draw(count, labels, seed + start, num_inference_steps, eta, guidance_scale, device)
                for offset, volume in enumerate(volumes.cpu()):
                    path = os.path.join(folder, f"sample_{start + offset:04d}.nii.gz")
                    self.save(volume, path)
                    written.append(path)
                    rows.append({"file": os.path.relpath(path, output_dir), "label": "" if label is None else label,
                                 "seed": seed + start, "checkpoint": "bundle"})
        with open(os.path.join(output_dir, "manifest.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "label", "seed", "checkpoint"])
            writer.writeheader()
            writer.writerows(rows)
        return written

    def save(self, volume: torch.Tensor, path: str) -> None:
        """One volume [C, D, H, W] as float32 NIfTI ([D, H, W] when C = 1), written under a temporary name first."""
        data = volume.permute(1, 2, 3, 0).numpy().astype(np.float32)
        image = nib.Nifti1Image(data[..., 0] if data.shape[-1] == 1 else data, self.affine)
        partial = path[: -len(".nii.gz")] + ".partial.nii.gz"
        nib.save(image, partial)
        os.replace(partial, path)


class MaskSampler(ConditionalSampler):
    """DDIM under lesion masks: a ControlNet's residuals on the UNet's skips, as msrl's `ControlNetModule`.

    Args (beyond `ConditionalSampler`'s, whose `affine` the masks replace):
        controlnet: MONAI `ControlNet` with the exported weights.
        mask_files: the bundle's `scripts/masks.py` module (reads, checks and writes beside masks).
        mask_rules: its `MaskRules`: the side, label codes and meanings this model's masks must have.
        conditioning: "pool": one-hot label channels average-pooled onto the latent grid; "embed": full size.
        conditioning_scale: factor on every residual.
    """

    def __init__(self, network: torch.nn.Module, inferer: DiffusionInferer, sample_shape: Sequence[int],
                 num_classes: int, controlnet: torch.nn.Module, mask_files: ModuleType, mask_rules: Any,
                 conditioning: str = "pool", conditioning_scale: float = 1.0,
                 autoencoder: torch.nn.Module | None = None, decode_batch_size: int = 4) -> None:
        super().__init__(network, inferer, sample_shape, num_classes, autoencoder, decode_batch_size)
        self.controlnet, self.files, self.rules = controlnet, mask_files, mask_rules
        self.conditioning, self.conditioning_scale = conditioning, float(conditioning_scale)
        self.condition: torch.Tensor | None = None  # the condition of the batch being drawn

    def condition_of(self, seg: torch.Tensor) -> torch.Tensor:
        """One-hot channels [N, K, S, S, S] of label maps `seg` [N, 1, S, S, S], pooled in "pool" mode."""
        channels = torch.cat([(seg == label) for label in self.rules.labels], dim=1).float()
        side, latent = channels.shape[-1], self.sample_shape[-1]
        return F.avg_pool3d(channels, side // latent) if self.conditioning == "pool" and side != latent else channels

    def denoise(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The UNet with the ControlNet's residuals; a guided batch [cond; null] repeats the condition."""
        condition = self.condition.repeat(x.shape[0] // self.condition.shape[0], 1, 1, 1, 1)
        down, mid = self.controlnet(x, timesteps, controlnet_cond=condition,
                                    conditioning_scale=self.conditioning_scale, class_labels=labels)
        return self.network(x, timesteps, class_labels=labels, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid)

    def __call__(self, mask: str | Sequence[str] | None, output_dir: str | None = None, label: int | str = "auto",
                 num_samples: int = 1, num_inference_steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0,
                 seed: int = 0, batch_size: int = 4, device: str | torch.device = "cpu",
                 overwrite: bool = False) -> list[str]:
        """Check every mask, then write `num_samples` volumes per mask as `<stem>_sample_<k>.nii.gz`.

        They go beside each mask (or into `output_dir`) with the mask's affine and header, listed in
        `samples.csv`; label "auto": 1 for a mask holding a lesion voxel, else 0. Returns the written paths.
        """
        if mask is None:
            raise ValueError("this bundle draws volumes for lesion masks: pass --mask seg.nii.gz (or a folder)")
        masks = self.rules.read_all(self.files.mask_paths([mask] if isinstance(mask, str) else list(mask)))
        if label != "auto" and not 0 <= int(label) < max(self.num_classes, 1):
            raise ValueError(f"label {label}: the model has {self.num_classes} classes (0..{self.num_classes - 1})")
        draws = []
        for item in masks:
            own = None if self.num_classes == 0 else (self.files.auto_label(item) if label == "auto" else int(label))
            for index in range(num_samples):
                path = self.files.sample_path(item.path, index)
                draws.append((item, own, path if output_dir is None else os.path.join(output_dir,
                                                                                      os.path.basename(path))))
        existing = [path for _, _, path in draws if os.path.exists(path)]
        if existing and not overwrite:
            raise FileExistsError(f"{len(existing)} volume(s) exist already ({existing[0]}, …): pass --overwrite true")
        device = torch.device(device)
        for network in (self.network, self.controlnet, self.autoencoder):
            if network is not None:
                network.to(device)
        staged, rows = self.files.StagedFiles(), {}
        try:
            for start in range(0, len(draws), batch_size):
                batch = draws[start : start + batch_size]
                seg = torch.from_numpy(np.stack([item.labels for item, _, _ in batch]))[:, None].to(device)
                self.condition = self.condition_of(seg)
                labels = None if batch[0][1] is None else torch.tensor([own for _, own, _ in batch], device=device)
                volumes = self.draw(len(batch), labels, seed + start, num_inference_steps, eta, guidance_scale, device)
                for (item, own, path), volume in zip(batch, volumes.cpu(), strict=True):
                    data = volume.permute(1, 2, 3, 0).numpy()
                    folder = os.path.dirname(os.path.abspath(path))
                    os.makedirs(folder, exist_ok=True)
                    staged.save(self.files.volume_image(data[..., 0] if data.shape[-1] == 1 else data, item), path)
                    rows.setdefault(folder, []).append({
                        "file": os.path.basename(path), "mask": os.path.relpath(item.path, folder),
                        "mask_sha256": item.sha256, "label": "" if own is None else own, "seed": seed + start,
                        "checkpoint": "bundle"})
            staged.commit()
        finally:
            staged.discard()
            self.condition = None
        for folder, folder_rows in rows.items():
            self.files.update_manifest(folder, folder_rows)
        return [path for _, _, path in draws]
