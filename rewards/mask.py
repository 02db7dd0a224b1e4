"""Mask fidelity as a reward: does a generated volume show the lesion mask it was drawn from?

A ControlNet-conditioned rollout draws each volume from a lesion mask (lightning_modules/finetune/masks.py).
`MaskFidelityReward` segments the volume with a reward segmenter (`SegmenterModule`, trained by
`msrl train-reward -c configs/rewards/segmenter.yaml`) and scores the soft Dice between its softmax and the
mask, averaged over the labels the mask holds. Soft Dice is differentiable in the volume, so reward
backpropagation can ascend it; on one-hot predictions it is the evaluation's hard Dice
(msrl/evaluation/mask_fidelity.py), whose segmenters are other networks (SegResNet, trained there): the
evaluation does not ask the network the policy was trained to please.
"""

from __future__ import annotations

import torch

from lightning_modules.finetune.reward import Reward


class MaskFidelityReward(Reward):
    """Soft Dice of a reward segmenter's prediction against the volume's conditioning mask, in [0, 1].

    A mask with lesions: the mean over the labels it holds of 2 Σ p·m / (Σ p + Σ m), p the softmax
    probability of the label, m its one-hot mask. Labels absent from the mask are left out, as in the
    evaluation: their Dice is 0/0 when neither has them, and a hallucinated label would be punished by
    the Dice of the labels present only weakly.

    A mask without lesions (a healthy subject's): 1 − max over voxels of the predicted lesion probability
    (1 − p_background). Dice is undefined there, and leaving such volumes out would give half of a
    two-class batch no reward; the soft "no lesion anywhere" keeps the scale of Dice — on one-hot predictions
    it is 1 without a lesion voxel and 0 with one, what the evaluation's hard Dice gives a lesion drawn where
    the mask has none — and its gradient lowers the most lesion-like voxel. A mean of the lesion probability
    over the volume would hardly move for a small hallucinated lesion.

    Args:
        checkpoint: a `SegmenterModule` checkpoint (its path and SHA-256 are recorded by fine-tuning).
        name: log key.
    """

    differentiable = True
    needs_masks = True

    def __init__(self, checkpoint: str | None = None, name: str = "mask_fidelity") -> None:
        super().__init__(name)
        from lightning_modules.critics.segmenter import SEGMENTER_HOW_TO, SegmenterModule

        self.segmenter = SegmenterModule.load_for_reward(checkpoint, type(self).__name__, SEGMENTER_HOW_TO)

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None,
                masks: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [B] of volumes [B, C, S, S, S] in [-1, 1] drawn from masks [B, 1, S, S, S] (BraTS codes)."""
        if masks is None:
            raise ValueError(f"{type(self).__name__} scores volumes against the lesion masks they were drawn from: "
                             "pass masks [B, 1, S, S, S]")
        return mask_fidelity(self.segmenter.probabilities(volumes), masks.to(volumes.device),
                             self.segmenter.labels)


def mask_fidelity(probabilities: torch.Tensor, masks: torch.Tensor, labels: tuple[int, ...]) -> torch.Tensor:
    """The reward [B] of segmenter probabilities [B, 1 + K, S, S, S] (background first) for masks [B, 1, S, S, S]."""
    from lightning_modules.critics.segmenter import one_hot_masks, soft_dice

    targets = one_hot_masks(masks, labels)
    if targets.shape != probabilities.shape:
        raise ValueError(f"the segmenter gives {tuple(probabilities.shape)} for masks one-hot as "
                         f"{tuple(targets.shape)}: volumes and masks must have the same size")
    present = targets[:, 1:].flatten(2).sum(2) > 0  # [B, K]
    dice = torch.where(present, soft_dice(probabilities, targets)[:, 1:], 0.0)
    lesions = dice.sum(1) / present.sum(1).clamp_min(1)
    no_lesion = 1 - (1 - probabilities[:, 0]).flatten(1).amax(1)
    return torch.where(present.any(1), lesions, no_lesion)
