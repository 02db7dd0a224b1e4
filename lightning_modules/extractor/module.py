"""`SelfSupervisedEncoderModule`: a 3D encoder trained without labels, whose features the evaluation uses.

SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
two augmented views of every real training volume (lightning_modules/extractor/augment.py) go
through the encoder and a projection head, and the NT-Xent loss pulls the two views of a volume
together and pushes the other volumes of the batch away. The encoder's pooled features (before the
head) are what `msrl.evaluation.InDomainExtractor` computes FID on. It shares no weights and no
training signal with any reward network: no labels, no generated volumes (docs/design.md §5, §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from lightning_modules.checkpoint_io import (
    load_weights,
    public_class_path,
    rebuild_module,
    resolve_class,
    resume_random_states,
    save_random_states,
)
from lightning_modules.extractor.augment import ViewAugmentation, two_views

EXTRACTOR_KEY = "msrl_extractor"  # what a checkpoint of this module carries beyond Lightning's contents
HOW_TO_TRAIN = "`msrl train-extractor -c configs/extractor/template.yaml`"
NORM = "BATCH"  # batch statistics in training (a per-sample norm made every volume's pooled features alike)


class VolumeEncoder(nn.Module):
    """A stride-2 stem, then one stride-2 MONAI `ResidualUnit` per further width, global average pooling.

    Args:
        in_channels: image channels.
        channels: output channels of the stem and of each residual unit (each halves the side).
    """

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels needs >= 2 positive widths, got {list(channels)}")
        layers: list[nn.Module] = [Convolution(3, in_channels, channels[0], strides=2, kernel_size=3,
                                               act="LEAKYRELU", norm=NORM)]
        for previous, width in zip(channels[:-1], channels[1:], strict=True):
            layers.append(ResidualUnit(3, previous, width, strides=2, kernel_size=3, subunits=2,
                                       act="LEAKYRELU", norm=NORM))
        self.layers = nn.Sequential(*layers)
        self.out_features = channels[-1]

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Features [B, channels[-1]] of volumes [B, C, S, S, S]."""
        return self.layers(volumes).flatten(2).mean(2)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1): each view's positive is the other view of its volume, the other 2B−2 are negatives.

    Args:
        first, second: projections [B, D] of the two views, row i of each from the same volume.
        temperature: softmax temperature τ of the cosine similarities.
    """
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = z @ z.T / temperature
    similarity = similarity.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    size = len(first)
    positives = torch.cat([torch.arange(size, 2 * size), torch.arange(size)]).to(z.device)
    return F.cross_entropy(similarity, positives)


class SelfSupervisedEncoderModule(L.LightningModule):
    """Contrastive (SimCLR / NT-Xent) training of a `VolumeEncoder` on real volumes, labels unused.

    Args:
        in_channels: image channels (linked from the data module by `msrl train-extractor`).
        spatial_size: side of the cubic volumes (linked); the extractor refuses other sizes.
        channels: widths of the encoder's stem and residual units (each halves the side).
        projection_dim: output size of the projection head the loss is computed on.
        temperature: NT-Xent temperature.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        augmentation: how far the two views of a volume may differ.
        val_seed: seed of the validation views, so that val/loss compares epochs on the same views.
    """

    def __init__(self, in_channels: int = 1, spatial_size: int = 64, channels: Sequence[int] = (8, 16, 32, 64),
                 projection_dim: int = 64, temperature: float = 0.2, lr: float = 1e-3, weight_decay: float = 1e-4,
                 augmentation: ViewAugmentation | None = None, val_seed: int = 0) -> None:
        super().__init__()
        if temperature <= 0 or projection_dim < 1:
            raise ValueError(f"need temperature > 0 and projection_dim >= 1, got {temperature}, {projection_dim}")
        self.save_hyperparameters()
        self.augmentation = augmentation or ViewAugmentation()
        self.hparams["augmentation"] = asdict(self.augmentation)  # plain data: checkpoints load weights-only
        self.encoder = VolumeEncoder(in_channels, channels)
        width = self.encoder.out_features
        # SimCLR's head; its BatchNorm centres the pooled features, whose shared part (every brain is the
        # same template) would otherwise make all cosine similarities ≈ 1, in eval mode too
        self.projection = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                                        nn.Linear(width, projection_dim))

    def features(self, volumes: torch.Tensor) -> torch.Tensor:
        """Encoder features [B, F] of volumes [B, C, S, S, S] in [-1, 1] (what FID is computed on)."""
        expected = (self.hparams.in_channels, *[self.hparams.spatial_size] * 3)
        if tuple(volumes.shape[1:]) != expected:
            raise ValueError(f"this encoder was trained on volumes [B, {', '.join(map(str, expected))}], got "
                             f"{list(volumes.shape)}: train one at this size with {HOW_TO_TRAIN} "
                             "--data.init_args.spatial_size <side>")
        return self.encoder(volumes)

    def contrastive_loss(self, volumes: torch.Tensor) -> torch.Tensor:
        """NT-Xent of two fresh views of every volume."""
        # both views in one pass: the head's BatchNorm sees 2B rows (never a lone volume) of both views
        projections = self.projection(self.encoder(torch.cat(two_views(volumes, self.augmentation))))
        return nt_xent(*projections.chunk(2), self.hparams.temperature)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """train/loss: NT-Xent on the batch's images (its labels are never read)."""
        loss = self.contrastive_loss(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/loss: NT-Xent on held-out volumes, with views fixed by `val_seed` and the batch index."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.val_seed * 100_003 + batch_idx)
            loss = self.contrastive_loss(batch["image"])
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["image"]), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the encoder and the head."""
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The RNG states (views replay on resume) and the mark that `load_for_extraction` looks for."""
        save_random_states(checkpoint)
        checkpoint[EXTRACTOR_KEY] = {"class_path": public_class_path(type(self)), "objective": "nt-xent"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states of a resumed run."""
        resume_random_states(checkpoint)

    @classmethod
    def load_for_extraction(cls, path: str | Path) -> SelfSupervisedEncoderModule:
        """A trained encoder from a checkpoint, weights only, frozen and in eval mode.

        Raises:
            ValueError: the file is missing, or it is a checkpoint of something else (a reward
                network, a diffusion model…), with how to get the right one.
        """
        if not path or not Path(path).is_file():
            raise ValueError(f"InDomainExtractor needs `checkpoint`, an encoder trained by {HOW_TO_TRAIN}; "
                             f"got {str(path)!r}")
        checkpoint = load_weights(path)  # refuses anything but tensors and plain data, with the file named
        mark = checkpoint.get(EXTRACTOR_KEY) if isinstance(checkpoint, dict) else None
        if not isinstance(mark, dict) or "class_path" not in mark:
            hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
            what = hparams.get("_class_path") or ("a Lightning checkpoint" if "state_dict" in checkpoint
                                                  else "no Lightning checkpoint")
            raise ValueError(f"{path} is not a self-supervised extractor checkpoint (it holds {what}, without "
                             f"`{EXTRACTOR_KEY}`); train one with {HOW_TO_TRAIN}")
        model_class = resolve_class(mark["class_path"], cls, path)
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        if isinstance(hparams.get("augmentation"), dict):  # LightningCLI records the dataclass as a dict
            hparams["augmentation"] = ViewAugmentation(**hparams["augmentation"])
        return rebuild_module(model_class, hparams, checkpoint["state_dict"]).eval().requires_grad_(False)
