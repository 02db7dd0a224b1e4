"""Feature extractors for FID/KID/MMD, pluggable by `class_path` (docs/design.md §5).

Every extractor maps volumes `[B, C, S, S, S]` in [-1, 1] to named feature matrices ("3d" for a
volume network; "axial", "coronal", "sagittal" and "pooled" for a slice network) and has a stable
`name` that is written next to every number computed from its features: an FID is only
comparable to another FID of the same extractor.

Weights are only ever read from a local file the user gives; nothing is downloaded.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
from einops import rearrange
from monai.networks.nets import ResNet, resnet10, resnet18, resnet34, resnet50
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args
from torch import nn

from datamodules.digest import sha256_of
from lightning_modules.checkpoint_io import load_weights
from lightning_modules.slices import PLANES, plane_slices

log = logging.getLogger(__name__)

RESNETS = {10: resnet10, 18: resnet18, 34: resnet34, 50: resnet50}
MEDICALNET_HOW_TO = ("MedicalNet weights (resnet_10_23dataset.pth, …) come from the Tencent/MedicalNet release; "
                     "download them once yourself and pass the local path")


class FeatureExtractor(nn.Module, ABC):
    """Base class: `forward(volumes)` → {view: features [N, F]}; `name` identifies the features."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Stable identifier written next to every metric computed from these features."""

    @abstractmethod
    def forward(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features per view for volumes [B, C, S, S, S] in [-1, 1]."""

    @torch.no_grad()
    def extract(self, volumes: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
        """Features of many volumes, in batches, on the extractor's device, returned on the CPU (float64)."""
        device = next(self.parameters()).device
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(volumes), batch_size):
            for view, features in self(volumes[start : start + batch_size].to(device).float()).items():
                parts.setdefault(view, []).append(features.double().cpu())
        return {view: torch.cat(chunks) for view, chunks in parts.items()}


def file_digest(path: str | Path, length: int = 8) -> str:
    """Short SHA-256 of a file: names which weights produced a number."""
    return sha256_of(path)[:length]


def zscore(volumes: torch.Tensor) -> torch.Tensor:
    """Per-volume z-score normalisation, as MedicalNet was trained (mean/std over every voxel)."""
    flat = volumes.flatten(1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
    return (volumes - mean.view(-1, *[1] * (volumes.ndim - 1))) / std.view(-1, *[1] * (volumes.ndim - 1))


def load_resnet_state(model: ResNet, path: str | Path) -> None:
    """Load a MedicalNet- or torchvision-layout ResNet state dict from a local file into a MONAI ResNet.

    Accepts a bare state dict or {"state_dict": …}; strips DataParallel's `module.` prefix; drops the
    task heads (`conv_seg.*` of MedicalNet, `fc.*` of classifiers), which feature extraction does not use.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist; {MEDICALNET_HOW_TO}")
    state = load_weights(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("conv_seg.", "fc."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not fit this ResNet: missing {missing[:5]}…, unexpected "
                         f"{unexpected[:5]}… (check depth, and MedicalNet's shortcut/bias settings)")


class MedicalNetExtractor(FeatureExtractor):
    """3D ResNet in MedicalNet layout (MONAI `resnet10/18/34/50`), global-average-pooled features.

    Built with MedicalNet's shortcut type and downsample bias for its depth (MONAI's
    `get_medicalnet_pretrained_resnet_args`) and MedicalNet's stride-2 first convolution, so the
    state dicts MedicalNet released load as they are. Without `weights_path` the network keeps a
    seeded random initialisation (a "random-feature" FID, comparable only to itself) and says so
    in its name.

    Args:
        depth: ResNet depth (10, 18, 34 or 50).
        weights_path: local MedicalNet .pth file, or None for seeded random weights.
        seed: seed of the random initialisation (when no weights are given).
    """

    def __init__(self, depth: Literal[10, 18, 34, 50] = 10, weights_path: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"depth must be one of {sorted(RESNETS)}, got {depth}")
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.network = RESNETS[depth](spatial_dims=3, n_input_channels=1, conv1_t_stride=2, feed_forward=False,
                                          shortcut_type=shortcut, bias_downsample=bias_downsample)
        if weights_path:
            load_resnet_state(self.network, weights_path)
            self._name = f"medicalnet-resnet{depth}-{file_digest(weights_path)}"
        else:
            self._name = f"medicalnet-resnet{depth}-random-seed{seed}"
            log.warning("%s: no weights_path given, the features are a seeded random network's", self._name)
        self.weights_path = weights_path  # the file an evaluation checks against the reward's networks
        self.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        """`medicalnet-resnet<depth>-<weights hash>` or `…-random-seed<seed>`."""
        return self._name

    def forward(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"3d": [B, 512 or 2048]} from the first channel, z-scored per volume."""
        return {"3d": self.network(zscore(volumes[:, :1]))}


class SliceExtractor(FeatureExtractor):
    """A 2D ResNet (torchvision layout, e.g. ImageNet or RadImageNet weights) on slices of the three planes.

    Takes `slices_per_plane` evenly spaced slices from the middle `coverage` of each axis, repeats
    the grey channel to the network's input channels, and returns features per plane and pooled.

    Args:
        depth: ResNet depth (10, 18, 34 or 50).
        weights_path: local .pth with a torchvision-layout ResNet state dict, or None for seeded random weights.
        slices_per_plane: slices taken from each plane of every volume.
        coverage: central share of each axis the slices are spread over (skips empty edge slices).
        in_channels: input channels of the network (3 for ImageNet-style weights).
        seed: seed of the random initialisation (when no weights are given).
    """

    def __init__(self, depth: Literal[10, 18, 34, 50] = 18, weights_path: str | None = None,
                 slices_per_plane: int = 8, coverage: float = 0.6, in_channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"depth must be one of {sorted(RESNETS)}, got {depth}")
        if slices_per_plane < 1 or not 0 < coverage <= 1:
            raise ValueError(f"need slices_per_plane >= 1 and coverage in (0, 1], got {slices_per_plane}, {coverage}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.network = RESNETS[depth](spatial_dims=2, n_input_channels=in_channels, conv1_t_stride=2,
                                          feed_forward=False, shortcut_type="B", bias_downsample=False)
        self.slices_per_plane, self.coverage, self.in_channels = slices_per_plane, coverage, in_channels
        weights = file_digest(weights_path) if weights_path else f"random-seed{seed}"
        if weights_path:
            load_resnet_state(self.network, weights_path)
        self._name = f"slice-resnet{depth}-{weights}-k{slices_per_plane}"
        self.weights_path = weights_path  # the file an evaluation checks against the reward's networks
        self.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        """`slice-resnet<depth>-<weights hash or random-seed>-k<slices per plane>`."""
        return self._name

    def plane_slices(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """{plane: slices [B*K, 1, S, S]} of the first channel (planes as in lightning_modules/slices.py)."""
        size = volumes.shape[-1]
        margin = (1 - self.coverage) / 2 * (size - 1)
        index = torch.linspace(margin, size - 1 - margin, self.slices_per_plane).round().long().to(volumes.device)
        picked = {plane: plane_slices(volumes[:, :1], plane, index) for plane in PLANES}
        return {plane: rearrange(s, "b k c h w -> (b k) c h w") for plane, s in picked.items()}

    def forward(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"axial", "coronal", "sagittal": [B*K, F], "pooled": [B*3K, F]}, rows grouped by volume."""
        features = {plane: self.network(zscore(s).expand(-1, self.in_channels, -1, -1))
                    for plane, s in self.plane_slices(volumes).items()}
        stacked = torch.stack(list(features.values()))  # [3, B*K, F]
        # pooled rows grouped by volume (its 3K slices together), as every other view is
        features["pooled"] = rearrange(stacked, "p (b k) f -> (b p k) f", k=self.slices_per_plane)
        return features


class ClassifierFeatureExtractor(FeatureExtractor):
    """The in-domain 3D encoder msrl trains itself: the penultimate layer of `msrl train-reward`'s classifier.

    Args:
        checkpoint: a `ClassifierModule` checkpoint (read with weights_only=True).
    """

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        from lightning_modules.critics.networks import ClassifierModule

        self.classifier = ClassifierModule.load_for_reward(
            checkpoint, "ClassifierFeatureExtractor", "`msrl train-reward -c configs/rewards/classifier.yaml`")
        self._name = f"indomain-classifier-{file_digest(checkpoint)}"
        self.checkpoint_path = checkpoint  # refused by msrl evaluate when it is a reward's classifier

    @property
    def name(self) -> str:
        """`indomain-classifier-<checkpoint hash>`."""
        return self._name

    def forward(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"3d": [B, 2F]}: global max and mean of the last conv block (what the classifier's head reads)."""
        features = self.classifier.network.features(volumes).flatten(2)
        return {"3d": torch.cat([features.amax(2), features.mean(2)], dim=1)}


class InDomainExtractor(FeatureExtractor):
    """The self-supervised in-domain 3D encoder: `msrl train-extractor`'s, trained on real volumes without labels.

    The evaluation's primary FID: in-domain like the classifier's features, yet trained on nothing
    a reward sees (no labels, no generated volumes) and sharing no weights with any reward network.

    Args:
        checkpoint: a `SelfSupervisedEncoderModule` checkpoint (read with weights_only=True).
    """

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        from lightning_modules.extractor import SelfSupervisedEncoderModule

        self.encoder = SelfSupervisedEncoderModule.load_for_extraction(checkpoint)
        self._name = f"indomain-ssl-{file_digest(checkpoint)}"
        self.checkpoint_path = checkpoint  # the file an evaluation checks against the reward's networks
        self.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        """`indomain-ssl-<checkpoint hash>`."""
        return self._name

    def forward(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"3d": [B, F]}: the encoder's globally pooled features (before the contrastive head)."""
        return {"3d": self.encoder.features(volumes)}
