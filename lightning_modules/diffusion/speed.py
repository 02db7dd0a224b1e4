"""The GPU path's switches for a MONAI UNet: channels-last memory layout and `torch.compile`.

Both are off by default: neither has been measured on a GPU for msrl's networks yet (see
benchmarks/RESULTS.md), and on the CPU channels-last 3D convolutions are not faster. Flash /
memory-efficient attention is MONAI's own `use_flash_attention` switch of `DiffusionModelUNet`;
cuDNN's autotuner is the Trainer's `benchmark: true` (configs/trainer/gpu.yaml).
"""

from __future__ import annotations

import torch
from torch import nn


def to_channels_last(volumes: torch.Tensor) -> torch.Tensor:
    """[B, C, D, H, W] in the channels-last-3D layout (what cuDNN's fastest 3D kernels read)."""
    return volumes.contiguous(memory_format=torch.channels_last_3d)


def apply_speed_options(unet: nn.Module, channels_last: bool, compile_unet: bool) -> None:
    """Convert the UNet's weights to channels-last-3D and/or compile its forward, in place.

    `nn.Module.compile` keeps parameter names, so checkpoints load whatever the switches were.
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last_3d)
    if compile_unet:
        unet.compile()
