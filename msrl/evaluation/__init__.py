"""Evaluation of generators: feature extractors, FID/KID/MMD/MS-SSIM, downstream utility, tables, figures.

Mask-conditioned generators also get a segmentation utility and mask fidelity (a real-trained
segmenter's Dice on generated volumes against the masks they were drawn from).

Also the reward-hacking guard of PPO (`HeldoutFIDGuard`), a trainer callback that needs the
evaluation's extractors and FID, which is why it lives here and not with the models.
"""

from msrl.evaluation.extractors import (
    ClassifierFeatureExtractor,
    FeatureExtractor,
    InDomainExtractor,
    MedicalNetExtractor,
    SliceExtractor,
)
from msrl.evaluation.heldout_guard import HeldoutFIDGuard
from msrl.evaluation.segmentation import SegmentationProtocol
from msrl.evaluation.segmenter import MaskedVolumes, Segmenter
from msrl.evaluation.utility import LabelledVolumes, UtilityProtocol

__all__ = ["ClassifierFeatureExtractor", "FeatureExtractor", "HeldoutFIDGuard", "InDomainExtractor", "LabelledVolumes",
           "MaskedVolumes", "MedicalNetExtractor", "SegmentationProtocol", "Segmenter", "SliceExtractor",
           "UtilityProtocol"]
