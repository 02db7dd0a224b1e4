"""The self-supervised 3D encoder behind the evaluation's in-domain FID (`msrl train-extractor`)."""

from lightning_modules.extractor.augment import ViewAugmentation, random_affine, two_views
from lightning_modules.extractor.module import SelfSupervisedEncoderModule, VolumeEncoder, nt_xent

__all__ = ["SelfSupervisedEncoderModule", "ViewAugmentation", "VolumeEncoder", "nt_xent", "random_affine", "two_views"]
