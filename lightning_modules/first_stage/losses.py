"""What first-stage training needs besides the autoencoder: discriminators, a perceptual loss read from
a local file, codebook health (perplexity, dead-code restarts), the latent statistics behind the
scale factor, random training cubes, and the record of a constructor's arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.losses.perceptual import medicalnet_intensity_normalisation, normalize_tensor
from monai.networks.layers.vector_quantizer import EMAQuantizer
from monai.networks.nets import PatchDiscriminator
from monai.networks.nets.resnet import ResNetFeatures
from torch import nn

from lightning_modules.checkpoint_io import load_weights
from lightning_modules.slices import SliceSampler, flatten_slices


class Discriminators(nn.Module):
    """A 3D PatchGAN (Isola et al. 2017) on whole volumes and, optionally, a 2D one on slices.

    medicaldiffusion's 3D VQ-GAN (the paper's reference [21]) judges both scales: the volume
    discriminator sees 3D structure, the slice discriminator the in-plane texture a reader looks at.
    The slices are random in-brain slices of the axial, coronal and sagittal planes.

    Args:
        in_channels: image channels.
        channels: channels of the first discriminator layer (doubled per layer by MONAI).
        num_layers: strided layers of each discriminator (its receptive field grows with them).
        slice_discriminator: also build the 2D slice discriminator.
        slices_per_plane: random slices per plane and volume for the slice discriminator.
    """

    def __init__(self, in_channels: int, channels: int, num_layers: int, slice_discriminator: bool = False,
                 slices_per_plane: int = 4) -> None:
        super().__init__()
        self.volume = PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=in_channels,
                                         num_layers_d=num_layers, norm="BATCH")
        self.slices = (PatchDiscriminator(spatial_dims=2, channels=channels, in_channels=in_channels,
                                          num_layers_d=num_layers, norm="BATCH") if slice_discriminator else None)
        self.sampler = SliceSampler(slices_per_plane, mode="random")

    def forward(self, volumes: torch.Tensor) -> list[torch.Tensor]:
        """Patch logits of each discriminator for volumes [B, C, S, S, S] in [-1, 1].

        Returns:
            [volume logits [B, 1, p, p, p]] plus, with the slice discriminator, its logits
            [B·3K, 1, q, q]; `PatchAdversarialLoss` averages over the list.
        """
        logits = [self.volume(volumes)[-1]]
        if self.slices is not None:
            logits.append(self.slices(flatten_slices(self.sampler(volumes)))[-1])
        return logits


class MedicalNetPerceptualLoss(nn.Module):
    """LPIPS-style 3D perceptual distance from a MedicalNet ResNet (Chen et al. 2019) in a local file.

    MONAI's `PerceptualLoss` fetches MedicalNet through torch.hub, and its `pretrained_path` works
    only for torchvision's 2D ResNet-50; msrl never downloads, so the same network (MONAI's
    `ResNetFeatures`, MedicalNet's architecture) is built here and its weights read weights-only from
    `weights_path`. The distance is MONAI's `MedicalNetPerceptualSimilarity`: per channel, volumes
    normalised to zero mean and unit variance, last-stage features normalised over channels, squared
    differences summed over channels and averaged over space (Zhang et al. 2018, Eq. 1).

    The network is frozen and kept in eval mode; `AutoencoderModule` holds it outside its state dict,
    so checkpoints neither grow by its weights nor need the file to load.

    Args:
        weights_path: a MedicalNet state dict (e.g. `resnet_10_23dataset.pth`), optionally under a
            "state_dict" key and with DataParallel's "module." prefixes.
        network: the ResNet depth of that file: "resnet10", "resnet18", … "resnet200".

    Raises:
        ValueError: the file does not exist or does not hold that network's weights.
    """

    def __init__(self, weights_path: str | Path, network: str = "resnet10") -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise ValueError(f"perceptual_weights_path {path} does not exist: it must be a local MedicalNet "
                             f"{network} weights file (msrl never downloads weights)")
        state = load_weights(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"perceptual_weights_path {path} holds no state dict")
        self.network = ResNetFeatures(network, pretrained=False, spatial_dims=3, in_channels=1)
        state = {key.removeprefix("module."): value for key, value in state.items()}
        missing, _ = self.network.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"perceptual_weights_path {path} is not a MedicalNet {network} file: it lacks "
                             f"{len(missing)} of the network's weights (first: {missing[0]})")
        self.network.eval().requires_grad_(False)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean perceptual distance between volumes [B, C, S, S, S] (a scalar, differentiable in reconstruction)."""
        distances = []
        for channel in range(target.shape[1]):
            features = [normalize_tensor(self.network(medicalnet_intensity_normalisation(x[:, [channel]]))[-1])
                        for x in (reconstruction, target)]
            distances.append((features[0] - features[1]).pow(2).sum(1).mean())
        return torch.stack(distances).mean()


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code-usage distribution: K when all K codes are used equally, 1 at total collapse."""
    probabilities = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum())


def codebook_usage(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of the codebook's entries that were used at least once."""
    return (counts > 0).float().mean()


def restart_dead_codes(quantizer: EMAQuantizer, dead: torch.Tensor, replacements: torch.Tensor) -> None:
    """Move dead codebook entries onto encoder outputs ("random restarts", Dhariwal et al. 2020, Jukebox).

    A code that no encoder output picks receives no EMA update and stays dead; in MONAI's EMA
    quantizer it is even pushed away (its Laplace-smoothed cluster size is ~epsilon while its EMA
    sum only decays), so codes unused early never come back. A restarted code sits on a current
    encoder output, with the average cluster size of the live codes so that the next EMA update
    keeps it there.

    Args:
        quantizer: MONAI's EMA quantizer (`VQVAE.quantizer.quantizer`).
        dead: [K] bool, the codes to restart.
        replacements: [dead.sum(), D] encoder outputs to put them on.
    """
    if int(dead.sum()) != replacements.shape[0]:
        raise ValueError(f"{int(dead.sum())} dead codes need as many replacements, got {replacements.shape[0]}")
    with torch.no_grad():
        alive = ~dead
        size = quantizer.ema_cluster_size[alive].mean() if alive.any() else quantizer.ema_cluster_size.new_tensor(1.0)
        quantizer.ema_cluster_size[dead] = size.clamp_min(1e-3)
        total = quantizer.ema_cluster_size.sum()
        smoothed = ((quantizer.ema_cluster_size + quantizer.epsilon)
                    / (total + quantizer.num_embeddings * quantizer.epsilon) * total)
        replacements = replacements.to(quantizer.ema_w.dtype)
        quantizer.ema_w[dead] = replacements * smoothed[dead, None]
        quantizer.embedding.weight[dead] = replacements


def latent_moments(latents: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] of all latent elements, in float64, to be summed over batches and ranks."""
    values = latents.detach().double()
    return torch.stack([values.new_tensor(values.numel()), values.sum(), values.pow(2).sum()])


def scale_from_moments(moments: torch.Tensor) -> float | None:
    """1 / std of the latents summarised by `latent_moments` sums (Rombach et al. 2022, §4.3.2); None if empty."""
    count, total, squares = moments.tolist()
    if count < 2:
        return None
    variance = max(squares / count - (total / count) ** 2, 0.0) * count / (count - 1)
    return 1.0 / max(variance ** 0.5, 1e-8)


def random_cubes(volumes: torch.Tensor, size: int, multiple: int) -> torch.Tensor:
    """A random cube of side `size` from each volume [B, C, S, S, S], its corner on a multiple of `multiple`.

    Aligned corners put each cube on the same latent grid as the whole volume.
    """
    if size == volumes.shape[-1]:
        return volumes
    corners = torch.randint(0, (volumes.shape[-1] - size) // multiple + 1, (volumes.shape[0], 3)) * multiple
    return torch.stack([volume[:, x:x + size, y:y + size, z:z + size]
                        for volume, (x, y, z) in zip(volumes, corners.tolist(), strict=True)])


def lesion_mask(batch: dict[str, Any], weight: float, key: str) -> torch.Tensor | None:
    """Where the batch's lesion labels are non-zero, bool [B, 1, S, S, S]; None when `weight` is 0.

    For the losses that weigh a lesion's voxels by 1 + `weight`; `key` names that setting in the
    error raised when the data set serves no lesion labels.
    """
    if weight == 0:
        return None
    if "seg" not in batch:
        raise ValueError(f"{key}={weight} needs lesion labels in each batch (the 'seg' key), which this data set "
                         f"does not serve; data sets with lesion labels: BraTS, the template cohort. Set {key}: 0")
    return batch["seg"] > 0


def weighted_mean(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·e / Σ w over errors [B, C, *spatial], weights [B, 1, *spatial] shared by the channels."""
    return (errors * weights).sum() / (weights.sum() * errors.shape[1])


def weighted_l1(reconstruction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weighted_mean` of |x̂ − x| over volumes [B, C, S, S, S]."""
    return weighted_mean((reconstruction.float() - target.float()).abs(), weights)


def constructor_arguments(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its `locals()` taken first thing, for `save_hyperparameters`.

    An explicit dict keeps the recorded arguments exactly the class's own: Lightning's frame
    inspection would also collect the arguments of a module whose `__init__` builds this one.
    """
    return {key: value for key, value in frame_locals.items() if key not in ("self", "__class__")}
