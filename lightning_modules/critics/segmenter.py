"""`SegmenterModule`: the lesion segmenter behind `MaskFidelityReward`, trained by `msrl train-reward`.

It segments each BraTS label (1 necrotic core, 2 oedema, 4 enhancing tumour) beside background from the
cohort's `seg`, with MONAI's soft Dice + cross-entropy. It is MONAI's `UNet` (residual units, strided
convolutions), not the evaluation's SegResNet (msrl/evaluation/segmentation.py), and is trained here, on
its own: the mask-fidelity evaluation must not judge with the network the reward trained against.

`soft_dice` is written once for both users: on softmax probabilities it is the reward (differentiable);
on one-hot arg-max predictions it is the hard Dice the validation reports (`val/dice`, what ranks checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from lightning_modules.controlnet.masks import MASK_LABELS, check_mask_labels, mask_channels
from lightning_modules.critics.networks import RewardNetworkModule, random_flips

SEGMENTER_HOW_TO = "`msrl train-reward -c configs/rewards/segmenter.yaml`"


def one_hot_masks(masks: torch.Tensor, labels: Sequence[int] = MASK_LABELS) -> torch.Tensor:
    """Background then one channel per label [B, 1 + len(labels), D, H, W] (float) of label maps [B, 1, D, H, W].

    A code that is neither 0 nor one of `labels` is refused (`mask_channels`), naming it.
    """
    lesions = mask_channels(masks, labels)
    return torch.cat([1 - lesions.sum(1, keepdim=True), lesions], dim=1)


def soft_dice(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice per volume and channel [B, K]: 2 Σ p·m / (Σ p + Σ m) over the voxels (Milletari et al. 2016).

    Args:
        probabilities: [B, K, D, H, W] in [0, 1] (softmax, or one-hot for the hard Dice).
        targets: one-hot [B, K, D, H, W].

    Returns:
        NaN where a channel is empty in both (0/0: nothing to find, nothing found); callers keep the
        channels the mask holds, where Σ m > 0 and the value is always defined.
    """
    p, m = probabilities.flatten(2).float(), targets.flatten(2).float()
    return 2 * (p * m).sum(2) / (p.sum(2) + m.sum(2))


class SegmenterModule(RewardNetworkModule):
    """MONAI `UNet` lesion segmenter: volume → logits of background and each label.

    Args:
        labels: the BraTS codes segmented, one class each after background, in this order.
        downsample: average-pooling factor of the input (logits are upsampled back): a lesion spans many
            voxels, and a 64³ volume costs 8× less at 2.
        num_res_units: residual units per UNet level.
        dropout: dropout of the UNet's units.
        **kwargs: see `RewardNetworkModule` (`channels`: the UNet's widths, one stride-2 level between each).
    """

    def __init__(self, labels: Sequence[int] = MASK_LABELS, downsample: int = 2, num_res_units: int = 1,
                 dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        hp = self.hparams
        self.labels = check_mask_labels(labels)
        if downsample < 1 or len(hp.channels) < 2:
            raise ValueError(f"need downsample >= 1 and at least two channels (levels), got {downsample} and "
                             f"{list(hp.channels)}")
        self.stride = downsample * 2 ** (len(hp.channels) - 1)
        if hp.spatial_size % self.stride:
            raise ValueError(f"spatial_size {hp.spatial_size} must be a multiple of {self.stride} "
                             f"(downsample × 2^(levels − 1))")
        self.network = UNet(spatial_dims=3, in_channels=hp.in_channels, out_channels=len(self.labels) + 1,
                            channels=tuple(hp.channels), strides=(2,) * (len(hp.channels) - 1),
                            num_res_units=num_res_units, norm="INSTANCE", dropout=dropout)
        # batch=True: Dice over the whole batch, so a label missing from one volume leaves no 0/0 term
        self.loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self._val_dice: list[torch.Tensor] = []

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1 + len(labels), S, S, S] of volumes [B, C, S, S, S] in [-1, 1]."""
        if self.hparams.downsample == 1:
            return self.network(volumes)
        logits = self.network(F.avg_pool3d(volumes, self.hparams.downsample))
        return F.interpolate(logits, size=tuple(volumes.shape[2:]), mode="trilinear", align_corners=False)

    def probabilities(self, volumes: torch.Tensor) -> torch.Tensor:
        """Softmax over background and labels [B, 1 + len(labels), S, S, S]."""
        return self(volumes.float()).softmax(1)

    def _targets(self, batch: dict[str, Any]) -> torch.Tensor:
        if "seg" not in batch:
            raise ValueError("SegmenterModule trains on lesion masks (the batch's 'seg' key), which this data set "
                             "does not serve; data sets with lesion labels: BraTS, the template cohort")
        return one_hot_masks(batch["seg"], self.labels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Soft Dice + cross-entropy on randomly mirrored (volume, mask) pairs (flipped alike)."""
        classes = self._targets(batch).argmax(1, keepdim=True).float()
        pair = random_flips(torch.cat([batch["image"].float(), classes], dim=1))
        loss = self.loss_function(self(pair[:, :-1]), pair[:, -1:].long())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(pair))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """val/loss, and the hard Dice of every (volume, label) whose mask holds the label."""
        targets = self._targets(batch)
        logits = self(batch["image"].float())
        self.log("val/loss", self.loss_function(logits, targets.argmax(1, keepdim=True)), prog_bar=True,
                 batch_size=len(logits), sync_dist=True)
        predicted = F.one_hot(logits.argmax(1), len(self.labels) + 1).movedim(-1, 1)
        dice = soft_dice(predicted, targets)[:, 1:]
        present = targets[:, 1:].flatten(2).sum(2) > 0
        self._val_dice.append(torch.where(present, dice, torch.nan).cpu())

    def on_validation_epoch_end(self) -> None:
        """val/dice (mean over volumes and the labels their masks hold; what ranks checkpoints), val/dice_<label>.

        A split without any lesion logs 0: no checkpoint can be ranked on it, and NaN would break the ranking.
        """
        dice = torch.cat(self._val_dice) if self._val_dice else torch.empty(0, len(self.labels))
        self._val_dice = []
        self.log("val/dice", _nanmean(dice), prog_bar=True, sync_dist=True)
        for index, label in enumerate(self.labels):
            self.log(f"val/dice_{label}", _nanmean(dice[:, index]), sync_dist=True)


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    finite = values[~values.isnan()]
    return finite.mean() if len(finite) else torch.zeros(())
