"""LightningDataModules for 3D brain MRI: the shared base and one module per data set."""

from datamodules.base import SubjectRecord, VolumeDataModule
from datamodules.template import TemplateCohortDataModule

__all__ = ["SubjectRecord", "TemplateCohortDataModule", "VolumeDataModule"]
