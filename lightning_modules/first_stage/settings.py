"""`FirstStageTraining`: how a first stage is trained, one settings object for the VQ-GAN and the KL autoencoder.

Both first stages (lightning_modules/first_stage/vqgan.py, kl.py) take their network's arguments
directly and everything about training — losses, discriminators, optimisers, crops — as one
`training` object, written in a config as `model.init_args.training.<key>`. Checkpoints record it
as a plain dict; `training_arguments` also reads checkpoints written before it existed, whose
training settings sat beside the network's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class FirstStageTraining:
    """Training of a 3D first stage against PatchGAN discriminators (manual optimisation).

    Args:
        adversarial_weight: weight of the generator's adversarial loss.
        adversarial_criterion: "hinge" or "least_squares" (MONAI `PatchAdversarialLoss`).
        adversarial_start_step: training steps of reconstruction alone before the discriminators join.
        discriminator_channels: channels of the first discriminator layer.
        discriminator_layers: strided layers of each discriminator.
        slice_discriminator: add a 2D discriminator on random slices of the three planes.
        slices_per_plane: slices per plane and volume for the slice discriminator.
        perceptual_weights_path: local MedicalNet weights for a perceptual loss; None turns it off.
        perceptual_network: the ResNet depth of that file ("resnet10", "resnet50", …).
        perceptual_weight: weight of the perceptual loss.
        lr: AdamW learning rate of the autoencoder.
        discriminator_lr: AdamW learning rate of the discriminators.
        betas: AdamW betas of both (GAN practice: a low β1).
        gradient_clip_val: clip each optimiser's gradient norm to this (None: no clipping); Lightning
            cannot clip manual optimisation, so the module does.
        train_crop_size: train on random cubes of this side (a multiple of 2^downsample_levels) instead
            of whole volumes: the networks are convolutional, and a 32³ cube of a 64³ volume costs an
            eighth of its step. None trains on whole volumes; validation always uses them. Cubes
            oversample the brain, so their latents' std is larger than whole volumes'
            (docs/studies.md#autoencoder-on-cubes): with cubes the scale factor comes from the whole
            validation volumes' latents.
        preview_num_samples: validation volumes shown next to their reconstructions in TensorBoard.
        lesion_l1_weight: w > 0 weighs the L1 of the voxels the batch's lesion labels (`seg`) cover by 1 + w
            (a weighted mean): a lesion is a few per cent of a volume, and of a cube less often still, so
            an unweighted first stage blurs it away (docs/design.md §2a). 0: the plain L1.
    """

    adversarial_weight: float = 0.01
    adversarial_criterion: Literal["hinge", "least_squares"] = "least_squares"
    adversarial_start_step: int = 1000
    discriminator_channels: int = 32
    discriminator_layers: int = 3
    slice_discriminator: bool = False
    slices_per_plane: int = 4
    perceptual_weights_path: str | None = None
    perceptual_network: str = "resnet10"
    perceptual_weight: float = 0.1
    lr: float = 2e-4
    discriminator_lr: float = 2e-4
    betas: Sequence[float] = (0.5, 0.9)
    gradient_clip_val: float | None = 1.0
    train_crop_size: int | None = None
    preview_num_samples: int = 2
    lesion_l1_weight: float = 0.0

    def __post_init__(self) -> None:
        """Betas as a tuple, however given (a YAML list, a checkpoint's list)."""
        object.__setattr__(self, "betas", tuple(self.betas))

    def check(self, spatial_size: int, downsample_levels: int) -> None:
        """Raise on settings that cannot train a first stage of this size."""
        factor = 2 ** downsample_levels
        if self.lesion_l1_weight < 0:
            raise ValueError(f"training.lesion_l1_weight must be >= 0 (0: the plain L1), got {self.lesion_l1_weight}")
        for key, value in (("spatial_size", spatial_size), ("train_crop_size", self.train_crop_size)):
            if value is not None and (value % factor or value <= 0):
                raise ValueError(f"{key}={value} must be a positive multiple of 2^downsample_levels = {factor}")
        side = spatial_size if self.train_crop_size is None else self.train_crop_size
        if side > spatial_size or side < 3 * 2 ** self.discriminator_layers:
            raise ValueError(f"the training volumes' side ({side}, train_crop_size or spatial_size) must be at most "
                             f"spatial_size={spatial_size} and at least 3·2^discriminator_layers = "
                             f"{3 * 2 ** self.discriminator_layers} (smaller leaves the PatchGAN no patch)")
        if self.adversarial_criterion not in ("hinge", "least_squares"):
            raise ValueError(f"adversarial_criterion must be 'hinge' or 'least_squares', got "
                             f"{self.adversarial_criterion!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for hyper-parameters and checkpoints (read back with weights_only=True)."""
        values = asdict(self)
        values["betas"] = list(values["betas"])
        return values


DEFAULT_TRAINING = FirstStageTraining()  # the constructors' default (frozen: safe to share)
TRAINING_KEYS = frozenset(field.name for field in fields(FirstStageTraining))


def training_arguments(hparams: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of a first stage from recorded hyper-parameters, `training` as the object.

    Accepts both layouts: `training` as a dict (today) or its keys beside the network's arguments
    (checkpoints written before `FirstStageTraining`). `overrides` replace training settings.
    """
    arguments = {key: value for key, value in hparams.items() if key not in TRAINING_KEYS and key != "training"}
    settings = {**{key: value for key, value in hparams.items() if key in TRAINING_KEYS},
                **(hparams.get("training") or {}), **overrides}
    return {**arguments, "training": FirstStageTraining(**settings)}
