"""Mask-conditioned fine-tuning: a frozen ControlNet conditioner and the pool of training masks it draws from.

With `controlnet_checkpoint` (an `msrl train-controlnet` checkpoint of the fine-tuned base) and `mask_data`
(a data module serving `seg`), every rollout is drawn from a lesion mask: the POLICY stays the base UNet
(so EMA, LoRA, the KL/penalty reference, exact resume and `msrl_diffusion` work as without masks) and the
ControlNet, frozen and outside the module tree (no weights in the state dict, never wrapped by DDP), adds its
residuals to every policy and reference prediction. A reward that reads masks (`needs_masks`, e.g.
`rewards.MaskFidelityReward`) scores each volume against its own mask.

Each rollout sample draws its mask from the training split's masks of its class, with a generator seeded
by (seed, iteration, the sample's index over all ranks): a DDP rank draws what one process with the whole
batch would, and a resumed run what the uninterrupted one did. `msrl_masks` records the ControlNet file with
its SHA-256 and a digest of the mask pool; resuming over another ControlNet or pool is refused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.base import VolumeDataModule
from datamodules.digest import sha256_of
from lightning_modules.controlnet.module import ControlNetModule
from lightning_modules.finetune.reward import mask_reading_parts

log = logging.getLogger(__name__)

MASKS_KEY = "msrl_masks"  # the checkpoint's record of the conditioner and the mask pool
MASK_STREAM = 2  # the mask draws' seed stream, apart from the rollout noise's (whose seeds are 3-tuples)


def read_mask_pool(data: VolumeDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's lesion masks [N, 1, S, S, S] (uint8 BraTS codes) and their classes [N]."""
    data.prepare_data()
    data.setup("fit")
    train = data.datasets.get("train")
    if train is None or len(train) == 0:
        raise ValueError(f"mask_data {type(data).__name__} has no training volumes to draw masks from")
    items = [train[index] for index in range(len(train))]
    if "seg" not in items[0]:
        raise ValueError(f"mask_data {type(data).__name__} serves no lesion masks ('seg'): conditioning on masks "
                         "needs a data set with lesion labels (BraTS, the template cohort)")
    return torch.stack([item["seg"] for item in items]), torch.stack([item["label"] for item in items])


def pool_digest(masks: torch.Tensor, classes: torch.Tensor) -> str:
    """SHA-256 of the pool's masks and classes: a resumed run must draw from the same pool."""
    digest = hashlib.sha256(masks.contiguous().numpy().tobytes())
    digest.update(classes.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class MaskConditioning:
    """The conditioner, the mask pool and the controlled predictions; mixed into `FinetuneBase`."""

    hparams: Any
    policy: Any
    iteration: torch.Tensor
    global_rank: int
    device: torch.device
    _conditioner: ControlNetModule | None = None

    def build_conditioner(self, controlnet_checkpoint: str | None, mask_data: VolumeDataModule | None,
                          reward: nn.Module, mask_data_config: Any = None) -> None:
        """Load the frozen ControlNet (its base must be `init_checkpoint`) and the training split's masks."""
        needing = mask_reading_parts(reward)
        if controlnet_checkpoint is None:
            if mask_data is not None:  # a mask config run without its ControlNet; a reward reading masks is refused
                log.warning("mask_data is unused: masks condition rollouts through a ControlNet, and "
                            "controlnet_checkpoint is not set")
            if needing:
                raise ValueError(f"reward parts {', '.join(needing)} score volumes against the masks they were drawn "
                                 "from: set controlnet_checkpoint (an msrl train-controlnet checkpoint of "
                                 "init_checkpoint) and mask_data (the data module whose training masks are drawn)")
            return
        if mask_data is None:
            raise ValueError(f"controlnet_checkpoint {controlnet_checkpoint} needs mask_data: the data module whose "
                             "training split's lesion masks ('seg') the rollouts are drawn from")
        controlnet = ControlNetModule.from_msrl_checkpoint(controlnet_checkpoint)  # refuses a missing/changed base
        record = controlnet.controlnet_record()  # its `msrl_controlnet`: the base file and its SHA-256, checked
        base_sha256 = sha256_of(self.hparams.init_checkpoint)
        if record["base_sha256"] != base_sha256:
            raise ValueError(f"controlnet_checkpoint {controlnet_checkpoint} conditions {record['base_checkpoint']} "
                             f"(sha256 {record['base_sha256'][:16]}…), not init_checkpoint "
                             f"{self.hparams.init_checkpoint} (sha256 {base_sha256[:16]}…): train a ControlNet on "
                             "the model you fine-tune (msrl train-controlnet --model.base_checkpoint <it>)")
        object.__setattr__(self, "_conditioner", controlnet.requires_grad_(False).eval())
        masks, classes = read_mask_pool(mask_data)
        size = self.policy.hparams.spatial_size
        if tuple(masks.shape[2:]) != (size, size, size):
            raise ValueError(f"mask_data serves {tuple(masks.shape[2:])} masks, the model draws {size}³ volumes")
        unknown = sorted(set(torch.unique(masks).tolist()) - {0, *controlnet.mask_labels})
        if unknown:  # refused before any rollout: the ControlNet has no channel for them
            raise ValueError(f"mask_data's masks hold labels {unknown}, outside 0 and the ControlNet's "
                             f"mask_labels {list(controlnet.mask_labels)}")
        labels = self.rollout_labels()
        wanted = [None] if labels is None else sorted(set(labels.tolist()))
        self._mask_indices = {k: torch.arange(len(classes)) if k is None else torch.nonzero(classes == k).flatten()
                              for k in wanted}
        empty = [k for k, indices in self._mask_indices.items() if len(indices) == 0]
        if empty:
            raise ValueError(f"mask_data's training split holds no volume of class {empty}: no mask to draw for it")
        self._masks = masks
        self.mask_record = {"controlnet_checkpoint": str(Path(controlnet_checkpoint).resolve()),  # any working dir
                            "controlnet_sha256": sha256_of(controlnet_checkpoint), "controlnet": record,
                            "mask_data": mask_data_config, "pool_sha256": pool_digest(masks, classes),
                            "pool_size": len(classes)}

    @property
    def conditioner(self) -> ControlNetModule | None:
        """The frozen ControlNet on this module's device (None without masks)."""
        return None if self._conditioner is None else self._conditioner.to(self.device)

    def rollout_masks(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The masks [samples_per_iteration, 1, S, S, S] of this rank's rollouts (None without a conditioner).

        Sample i draws from the pool of its class with a generator seeded by (seed, iteration, i's index
        over all ranks), so resumed runs and other world sizes draw the same masks for the same samples.
        """
        if self._conditioner is None:
            return None
        count = self.hparams.samples_per_iteration
        first = self.global_rank * count
        chosen = []
        for index in range(count):
            pool = self._mask_indices[None if labels is None else int(labels[index])]
            generator = torch.Generator().manual_seed(
                hash((self.hparams.seed, int(self.iteration), first + index, MASK_STREAM)) % 2**62)
            chosen.append(pool[torch.randint(len(pool), (), generator=generator)])
        return self._masks[torch.stack(chosen)].to(self.device)

    def rollout_condition(self, masks: torch.Tensor | None) -> torch.Tensor | None:
        """The ControlNet's input of `masks` (None without masks)."""
        return None if masks is None else self.conditioner.condition(masks)

    def residuals(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                  condition: torch.Tensor | None) -> dict[str, Any]:
        """The frozen ControlNet's (EMA) residuals for x_t ({} without a condition); a guided batch, larger
        than the condition's, repeats it, so the mask conditions the null pass too (as `ControlNetModule`)."""
        if condition is None:
            return {}
        condition = condition.repeat(x.shape[0] // condition.shape[0], 1, 1, 1, 1)
        return self.conditioner.residuals(x, timesteps, labels, condition, use_ema=True)

    def policy_forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                       condition: torch.Tensor | None = None) -> torch.Tensor:
        """The policy's prediction with the conditioner's residuals for `condition` (plain without one)."""
        return self.policy(x, timesteps, labels, **self.residuals(x, timesteps, labels, condition))

    def unet_prediction(self, unet: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None,
                        condition: torch.Tensor | None = None) -> torch.Tensor:
        """A UNet's (the policy's or the frozen reference's) raw prediction, with the conditioner's residuals."""
        extra = self.residuals(x, timesteps, labels, condition)
        keywords = {} if not extra else {"down_block_additional_residuals": extra["down_residuals"],
                                         "mid_block_additional_residual": extra["mid_residual"]}
        return unet(x, timesteps, class_labels=labels if self.policy.null_class is not None else None, **keywords)

    def save_mask_record(self, checkpoint: dict[str, Any]) -> None:
        """Write `msrl_masks` (mask-conditioned runs only)."""
        if self._conditioner is not None:
            checkpoint[MASKS_KEY] = dict(self.mask_record)

    def check_mask_record(self, checkpoint: dict[str, Any]) -> None:
        """Resume only with the conditioner and mask pool the checkpoint was written with."""
        record = checkpoint.get(MASKS_KEY)
        if (record is None) != (self._conditioner is None):
            raise ValueError(f"the checkpoint resumed was written {'with' if record else 'without'} a ControlNet "
                             f"conditioner, this run is configured {'with' if self._conditioner else 'without'}: "
                             "resume with its controlnet_checkpoint and mask_data")
        if record is None:
            return
        for key, what in (("controlnet_sha256", "ControlNet file"), ("pool_sha256", "mask pool")):
            if record[key] != self.mask_record[key]:
                raise ValueError(f"the checkpoint resumed was written with another {what} ({key} "
                                 f"{record[key][:16]}…, this run's {self.mask_record[key][:16]}…, ControlNet "
                                 f"{Path(self.mask_record['controlnet_checkpoint'])}): resume with the same "
                                 "controlnet_checkpoint and mask_data, or the masks drawn would differ")
