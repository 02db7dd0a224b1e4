"""The segmenter of the segmentation utility and mask fidelity, its label maps and their Dice.

`MaskedVolumes` pairs volumes with label maps; `Segmenter` (MONAI's SegResNet on average-pooled
volumes) predicts one class per label code beside background, `predict_masks` turns its logits into
label maps and `dice_per_volume` scores them. How it is trained is msrl/evaluation/segmentation.py's
`SegmentationProtocol`.

Dice of one volume is 2|P ∩ M| / (|P| + |M|). It is NaN where the region is absent from both the
prediction and the mask: nothing to find and nothing found says nothing about the segmenter, and
counting it as 1 would let lesion-free volumes inflate the mean. A region in only one of the two
gives 0 (a missed or a hallucinated lesion). Means over volumes leave the NaNs out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNet
from torch import nn

SEGMENTATION_LABELS = (1, 2, 4)  # BraTS: necrotic core, oedema, enhancing rim
WHOLE_TUMOUR = "whole_tumour"  # every label > 0
# the segmenter's normalisation layers, as MONAI names them; "group" is 8 groups (one channel each at width 8)
NORMS = {"batch": ("BATCH", {}), "group": ("GROUP", {"num_groups": 8})}


@dataclass
class MaskedVolumes:
    """Volumes [N, C, S, S, S] in [-1, 1] with their masks [N, 1, S, S, S] of label codes (0 = background).

    Masks given as [N, S, S, S] gain the channel axis.
    """

    volumes: torch.Tensor
    masks: torch.Tensor

    def __post_init__(self) -> None:
        if self.masks.ndim == 4:
            self.masks = self.masks.unsqueeze(1)
        if self.volumes.ndim != 5 or tuple(self.masks.shape) != (len(self.volumes), 1, *self.volumes.shape[2:]):
            raise ValueError(f"need volumes [N, C, S, S, S] and masks [N, 1, S, S, S] of the same N and S, got "
                             f"{tuple(self.volumes.shape)} and {tuple(self.masks.shape)}")

    def __add__(self, other: MaskedVolumes) -> MaskedVolumes:
        return MaskedVolumes(torch.cat([self.volumes, other.volumes]), torch.cat([self.masks, other.masks]))


def class_indices(masks: torch.Tensor, labels: Sequence[int] = SEGMENTATION_LABELS) -> torch.Tensor:
    """Each voxel's class index (0 background, i + 1 for labels[i]); a value that is neither is refused."""
    values, counts = masks.unique(return_counts=True)
    allowed = {0, *labels}
    unknown = {v.item(): int(c) for v, c in zip(values, counts, strict=True) if v.item() not in allowed}
    if unknown:
        raise ValueError(f"mask values {unknown} (value: voxels) are neither background 0 nor one of the labels "
                         f"{list(labels)}")
    lookup = torch.zeros(max(allowed) + 1, dtype=torch.long)
    lookup[list(labels)] = torch.arange(1, len(labels) + 1)
    return lookup[masks.long()]


def dice_per_volume(predicted: torch.Tensor, masks: torch.Tensor,
                    labels: Sequence[int] = SEGMENTATION_LABELS) -> dict[str, torch.Tensor]:
    """Dice of every volume per label and for the whole tumour: {"1": [N], "2": [N], "4": [N], "whole_tumour": [N]}.

    Args:
        predicted: predicted label maps [N, 1, S, S, S] (label codes, 0 = background).
        masks: the true masks, the same shape and codes.
        labels: the labels scored one by one.

    Returns:
        NaN where the region is in neither the prediction nor the mask, 0 where it is in only one.
    """
    if predicted.shape != masks.shape:
        raise ValueError(f"predictions {tuple(predicted.shape)} and masks {tuple(masks.shape)} differ in shape")
    for maps in (predicted, masks):
        class_indices(maps, labels)  # refuses a code that is neither background nor a label
    p, m = predicted.flatten(1), masks.flatten(1)
    dice = {str(label): _dice(p == label, m == label) for label in labels}
    dice[WHOLE_TUMOUR] = _dice(p > 0, m > 0)
    return dice


def _dice(predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    overlap = (predicted & mask).sum(1).double()
    total = predicted.sum(1).double() + mask.sum(1).double()
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.nan)


class Segmenter(nn.Module):
    """MONAI's SegResNet on volumes average-pooled by `downsample`, its logits upsampled back to the input size.

    Args:
        in_channels: image channels.
        labels: the label codes it segments, one output class each after background.
        init_filters: SegResNet's first width, doubled at each scale; a multiple of 8 with "group" norm.
        blocks_down: residual blocks at each encoder scale (its length is the number of scales).
        downsample: average-pooling factor of the input (64³ → 32³ with 2): a lesion spans many
            voxels, and a CPU trains ~8× faster.
        norm: "batch" (running statistics at test time) or "group" (8 groups). At width 8 a group is one
            channel, so group norm rescales each feature map by its own volume's statistics and a large
            bright lesion moves them; batch norm keeps the intensity scale the volumes share.
    """

    def __init__(self, in_channels: int, labels: Sequence[int] = SEGMENTATION_LABELS, init_filters: int = 16,
                 blocks_down: Sequence[int] = (1, 2, 2), downsample: int = 2, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        if init_filters < 1 or (norm == "group" and init_filters % 8):
            raise ValueError(f"init_filters must be positive (a multiple of 8 with group norm), got {init_filters}")
        if downsample < 1 or not blocks_down:
            raise ValueError(f"need downsample >= 1 and at least one scale, got {downsample} and {list(blocks_down)}")
        self.labels, self.downsample = tuple(labels), downsample
        self.stride = downsample * 2 ** (len(blocks_down) - 1)  # the input side must be a multiple of it
        self.network = SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=in_channels,
                                 out_channels=len(self.labels) + 1, blocks_down=tuple(blocks_down),
                                 blocks_up=(1,) * (len(blocks_down) - 1), norm=NORMS[norm])

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Logits [N, len(labels) + 1, S, S, S] of volumes [N, C, S, S, S] in [-1, 1]."""
        size = tuple(volumes.shape[2:])
        if any(side % self.stride for side in size):
            raise ValueError(f"volume sides {size} must be multiples of {self.stride} (downsample × 2^(scales − 1))")
        if self.downsample == 1:
            return self.network(volumes)
        logits = self.network(F.avg_pool3d(volumes, self.downsample))
        return F.interpolate(logits, size=size, mode="trilinear", align_corners=False)


@torch.no_grad()
def predict_masks(network: nn.Module, volumes: torch.Tensor, labels: Sequence[int] = SEGMENTATION_LABELS,
                  batch_size: int = 4) -> torch.Tensor:
    """Predicted label maps [N, 1, S, S, S] (label codes) of volumes [N, C, S, S, S]: the arg-max class per voxel."""
    network.eval()
    codes = torch.tensor([0, *labels])
    return torch.cat([codes[network(chunk.float()).argmax(1, keepdim=True).cpu()]
                      for chunk in volumes.split(batch_size)])
