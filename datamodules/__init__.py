"""LightningDataModules for 3D brain MRI: the shared base and one module per data set."""

from datamodules.monai_import import import_monai

import_monai()  # first: MONAI without its `transformers` BERT import (datamodules/monai_import.py)

from datamodules.atomic import atomic_folder, atomic_save  # noqa: E402
from datamodules.base import SubjectRecord, VolumeDataModule  # noqa: E402
from datamodules.brats import BraTS2019DataModule  # noqa: E402
from datamodules.digest import check_recorded_file, sha256_of  # noqa: E402
from datamodules.oasis import OASIS1DataModule  # noqa: E402
from datamodules.preprocessing import BACKGROUND, FOREGROUND_THRESHOLD  # noqa: E402
from datamodules.problems import DataError, Problem  # noqa: E402
from datamodules.resumable import ResumableLoader  # noqa: E402
from datamodules.template import TemplateCohortDataModule  # noqa: E402

__all__ = ["BACKGROUND", "FOREGROUND_THRESHOLD", "BraTS2019DataModule", "DataError", "OASIS1DataModule", "Problem",
           "ResumableLoader", "SubjectRecord", "TemplateCohortDataModule", "VolumeDataModule", "atomic_folder",
           "atomic_save", "check_recorded_file", "sha256_of"]
