"""Evaluation of generators: feature extractors, FID/KID/MMD/MS-SSIM, downstream utility, reports."""

from evaluation.extractors import ClassifierFeatureExtractor, FeatureExtractor, MedicalNetExtractor, SliceExtractor

__all__ = ["ClassifierFeatureExtractor", "FeatureExtractor", "MedicalNetExtractor", "SliceExtractor"]
