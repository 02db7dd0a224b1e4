"""LightningDataModules for 3D brain MRI: the shared base and one module per data set."""

from datamodules.base import SubjectRecord, VolumeDataModule
from datamodules.brats import BraTS2019DataModule
from datamodules.oasis import OASIS1DataModule
from datamodules.template import TemplateCohortDataModule

__all__ = ["BraTS2019DataModule", "OASIS1DataModule", "SubjectRecord", "TemplateCohortDataModule", "VolumeDataModule"]
