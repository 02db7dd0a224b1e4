"""Mask conditioning: `ControlNetModule` (a ControlNet on a frozen pretrained diffusion model) and its masks."""

from lightning_modules.controlnet.masks import BRATS_LABELS, MASK_LABELS, label_channels, mask_channels, pool_to
from lightning_modules.controlnet.module import CONTROLNET_KEY, ControlNetModule

__all__ = ["BRATS_LABELS", "CONTROLNET_KEY", "MASK_LABELS", "ControlNetModule", "label_channels", "mask_channels",
           "pool_to"]
