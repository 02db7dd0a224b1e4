"""The networks behind msrl's learned rewards, and their training (`msrl train-reward`).

`RealismCriticModule` trains a 2D slice critic and a 3D volume critic together: real volumes
against volumes that are "not real" (sampled from a pretrained model, or real ones degraded with
MRI artefacts). `ClassifierModule` trains the downstream 3D classifier (real volume → class) used
by `ClassifierReward` and the evaluation. Both report held-out AUROC (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC

from datamodules.digest import sha256_of
from lightning_modules.checkpoint_io import load_weights, rebuild_module, resume_random_states, save_random_states
from lightning_modules.slices import SliceSampler, flatten_slices


class PooledConvNet(nn.Module):
    """Strided conv blocks (MONAI `Convolution`), then global max+mean pooling and a linear head.

    Global pooling makes the score independent of where a feature sits (a lesion anywhere in the
    brain, an artefact in any slice), which a flatten-and-linear head learns only from far more data.

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: image channels.
        outputs: logits per input.
        channels: output channels of each stride-2 block.
    """

    def __init__(self, spatial_dims: int, in_channels: int, outputs: int, channels: Sequence[int]) -> None:
        super().__init__()
        blocks, previous = [], in_channels
        for width in channels:
            blocks.append(Convolution(spatial_dims, previous, width, strides=2, kernel_size=3, act="LEAKYRELU",
                                      norm="INSTANCE", dropout=0.1))
            previous = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * previous, outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, outputs] for images [N, C, *spatial]."""
        features = self.features(images).flatten(2)
        return self.head(torch.cat([features.amax(2), features.mean(2)], dim=1))


def random_flips(volumes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each volume along each spatial axis with probability ½ (a cheap, label-safe augmentation).

    `volumes` is [B, C, D, H, W]; a selected subset keeps that layout, so the flip axis is the spatial
    axis itself, never the channel axis (which would shuffle a BraTS volume's modalities;
    docs/studies.md#augmentation-flips). Every channel of a volume is flipped alike, so an image stacked
    with its mask stays aligned. `generator`: the draws' (None: torch's global).
    """
    out = volumes.clone()
    for axis in range(2, volumes.ndim):
        flip = torch.rand(volumes.shape[0], device=volumes.device, generator=generator) < 0.5
        out[flip] = out[flip].flip(axis)
    return out


class RewardNetworkModule(L.LightningModule):
    """What both reward networks share: AdamW, the shape linked from the data, weights-only loading.

    Args:
        in_channels: image channels (linked from the data module by `msrl train-reward`).
        spatial_size: side of the cubic volumes (linked from the data module).
        num_classes: classes of the data set (linked; used by the classifier).
        channels: channels of the strided conv layers.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, in_channels: int = 1, spatial_size: int = 32, num_classes: int = 2,
                 channels: Sequence[int] = (16, 32, 64), lr: float = 1e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over every weight."""
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The RNG states: flips, dropout and slice draws replay on resume (artefacts too with num_workers 0)."""
        save_random_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states of a resumed run."""
        resume_random_states(checkpoint)

    @classmethod
    def load_for_reward(cls, path: str, reward: str, how_to_train: str) -> RewardNetworkModule:
        """Load a trained network for a reward, weights only, with errors that say how to get one.

        The module remembers its file: `source_path` (as given) and `source_sha256` (of its bytes), which
        a fine-tuned checkpoint records (`msrl_reward`, `lightning_modules.finetune.reward.reward_networks`).
        """
        from pathlib import Path

        if not path or not Path(path).is_file():
            raise ValueError(f"{reward} needs `checkpoint`, a network trained by {how_to_train}; "
                             f"got {path!r}")
        checkpoint = load_weights(path)  # refuses anything but tensors and plain data, with the file named
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        network = rebuild_module(cls, hparams, checkpoint["state_dict"]).eval().requires_grad_(False)
        network.source_path, network.source_sha256 = str(path), sha256_of(path)
        return network


class RealismCriticModule(RewardNetworkModule):
    """2D slice critic + 3D volume critic: logit of "real" for slices and for whole volumes.

    Args:
        slices_per_plane: slices drawn at random from each plane of every training volume.
        **kwargs: see `RewardNetworkModule`.
    """

    def __init__(self, slices_per_plane: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        hp = self.hparams
        self.slice_net = PooledConvNet(2, hp.in_channels, 1, hp.channels)
        self.volume_net = PooledConvNet(3, hp.in_channels, 1, hp.channels)
        self.train_sampler = SliceSampler(slices_per_plane, mode="random")
        self.auroc = torch.nn.ModuleDict({"slice2d": BinaryAUROC(), "volume3d": BinaryAUROC()})

    def slice_logits(self, slices: torch.Tensor) -> torch.Tensor:
        """Logits [N] of "real" for slices [N, C, S, S]."""
        return self.slice_net(slices).squeeze(-1)

    def volume_logits(self, volumes: torch.Tensor) -> torch.Tensor:
        """Logits [B] of "real" for volumes [B, C, S, S, S]."""
        return self.volume_net(volumes).squeeze(-1)

    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        volumes, real = batch["image"], batch["real"].float()
        if self.training:
            volumes = random_flips(volumes)
        slices = self.train_sampler(volumes)  # [B, 3K, C, S, S]
        slice_logits = self.slice_logits(flatten_slices(slices))
        slice_targets = real.repeat_interleave(slices.shape[1])
        volume_logits = self.volume_logits(volumes)
        loss = F.binary_cross_entropy_with_logits(slice_logits, slice_targets) \
            + F.binary_cross_entropy_with_logits(volume_logits, real)
        return loss, {"slice2d": (slice_logits, slice_targets), "volume3d": (volume_logits, real)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """BCE of both critics."""
        loss, _ = self._losses(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["real"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/loss and the AUROC of each critic on held-out real and not-real volumes."""
        loss, outputs = self._losses(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["real"]), sync_dist=True)
        for name, (logits, targets) in outputs.items():
            self.auroc[name].update(logits, targets.long())

    def on_validation_epoch_end(self) -> None:
        """val/auroc_slice2d, val/auroc_volume3d and their mean val/auroc."""
        values = {name: metric.compute() for name, metric in self.auroc.items()}
        for name, value in values.items():
            self.log(f"val/auroc_{name}", value)
            self.auroc[name].reset()
        self.log("val/auroc", torch.stack(list(values.values())).mean(), prog_bar=True)


class ClassifierModule(RewardNetworkModule):
    """The downstream 3D classifier: real volume → class (HGG/LGG, AD/CN, lesion/healthy)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hp = self.hparams
        if hp.num_classes < 2:
            raise ValueError(f"a classifier needs a labelled data set (num_classes >= 2), got {hp.num_classes}")
        self.network = PooledConvNet(3, hp.in_channels, hp.num_classes, hp.channels)
        self.auroc = MulticlassAUROC(hp.num_classes)
        self.accuracy = MulticlassAccuracy(hp.num_classes, average="macro")

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K] for volumes [B, C, S, S, S]."""
        return self.network(volumes)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on the real training volumes, randomly mirrored (labels do not depend on side)."""
        loss = F.cross_entropy(self(random_flips(batch["image"])), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/loss, and AUROC and balanced accuracy on the held-out split."""
        logits = self(batch["image"])
        self.log("val/loss", F.cross_entropy(logits, batch["label"]), prog_bar=True, batch_size=len(logits),
                 sync_dist=True)
        self.auroc.update(logits, batch["label"])
        self.accuracy.update(logits, batch["label"])

    def on_validation_epoch_end(self) -> None:
        """val/auroc and val/balanced_accuracy."""
        self.log("val/auroc", self.auroc.compute(), prog_bar=True)
        self.log("val/balanced_accuracy", self.accuracy.compute())
        self.auroc.reset()
        self.accuracy.reset()
