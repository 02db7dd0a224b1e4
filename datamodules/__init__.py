"""LightningDataModules for 3D brain MRI: the shared base and one module per data set."""

from datamodules.atomic import atomic_folder, atomic_save
from datamodules.base import SubjectRecord, VolumeDataModule
from datamodules.brats import BraTS2019DataModule
from datamodules.oasis import OASIS1DataModule
from datamodules.preprocessing import BACKGROUND, FOREGROUND_THRESHOLD
from datamodules.problems import DataError, Problem
from datamodules.resumable import ResumableLoader
from datamodules.template import TemplateCohortDataModule

__all__ = ["BACKGROUND", "FOREGROUND_THRESHOLD", "BraTS2019DataModule", "DataError", "OASIS1DataModule", "Problem",
           "ResumableLoader", "SubjectRecord", "TemplateCohortDataModule", "VolumeDataModule", "atomic_folder",
           "atomic_save"]
