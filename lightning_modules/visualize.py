"""Pictures of volumes: three orthogonal middle slices per volume, for TensorBoard and PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange

from lightning_modules.slices import PLANES, plane_slices


def orthogonal_slices(volume: torch.Tensor) -> list[torch.Tensor]:
    """Middle axial, coronal and sagittal slices of the first channel, oriented for display.

    Args:
        volume: [C, D, H, W] in RAS+ voxel order (axis 0 left→right, 1 posterior→anterior,
            2 inferior→superior), as the preprocessing leaves it.

    Returns:
        Three 2D tensors (axial [H, D], coronal [W, D], sagittal [W, H]), top of the picture =
        anterior (axial) or superior (coronal, sagittal).
    """
    image = volume[None, :1].float()
    middle = [torch.tensor([side // 2]) for side in reversed(image.shape[2:])]  # W, H, D: axial, coronal, sagittal
    return [plane_slices(image, plane, index)[0, 0, 0].T.flip(0) for plane, index in zip(PLANES, middle, strict=True)]


def slice_grid(volumes: torch.Tensor) -> torch.Tensor:
    """One row per volume, one column per plane: [1, B*S, 3*S] in [0, 1] for `add_image`.

    Args:
        volumes: [B, C, S, S, S] cubic volumes in [-1, 1].
    """
    rows = torch.stack([torch.stack(orthogonal_slices(v)) for v in volumes])  # [B, 3, S, S]
    grid = rearrange(rows, "b p h w -> (b h) (p w)")
    return ((grid.clamp(-1, 1) + 1) / 2)[None].cpu()


def save_slices_png(volumes: torch.Tensor, path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """Write a PNG with the three orthogonal middle slices of each volume, one row each.

    Args:
        volumes: [B, C, D, H, W] in [-1, 1].
        path: the PNG to write (its folder is created).
        titles: a caption per row (e.g. "label 1"), or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = volumes.shape[0]
    fig, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count), squeeze=False)
    for row, volume in enumerate(volumes):
        for col, (plane, image) in enumerate(zip(PLANES, orthogonal_slices(volume), strict=True)):
            ax = axes[row][col]
            ax.imshow(image.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(plane)
            if col == 0 and titles is not None:
                ax.set_ylabel(titles[row])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
