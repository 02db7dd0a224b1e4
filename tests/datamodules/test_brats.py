"""Tests of the BraTS 2019 loader on fake trees that copy the release's layout."""

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules import BraTS2019DataModule
from datamodules.problems import DataError
from tests.fake_releases import make_brats

CASES = {"HGG": ["BraTS19_CBICA_AAB_1", "BraTS19_TCIA01_131_1", "BraTS19_CBICA_ABB_1"],
         "LGG": ["BraTS19_2013_0_1", "BraTS19_TMC_09043_1", "BraTS19_TCIA09_141_1"]}


def _module(root: Path, tmp_path: Path, **kwargs) -> BraTS2019DataModule:
    settings = dict(root=str(root), spatial_size=16, cache_dir=tmp_path / "cache", expected_shape=None,
                    val_fraction=0.2, test_fraction=0.2, batch_size=2)
    settings.update(kwargs)
    return BraTS2019DataModule(**settings)


def test_doubled_top_folder_both_grades_and_modality_order(tmp_path: Path) -> None:
    make_brats(tmp_path / "data", CASES, doubled=True)
    module = _module(tmp_path / "data", tmp_path, modalities=["flair", "t1"])
    records = module.list_subjects()
    assert sorted(r.subject_id for r in records) == sorted(CASES["HGG"] + CASES["LGG"])
    assert {r.subject_id: r.label for r in records}["BraTS19_CBICA_AAB_1"] == 1
    assert {r.subject_id: r.label for r in records}["BraTS19_2013_0_1"] == 0
    files = records[0].files
    assert files[0].endswith("_flair.nii.gz") and files[1].endswith("_t1.nii.gz")  # never _t1ce
    assert len(files) == 3 and files[2].endswith("_seg.nii.gz")  # seg: the tumour stays out of the percentiles
    whole_brain = _module(tmp_path / "data", tmp_path, modalities=["t1"], exclude_tumour=False)
    assert len(whole_brain.list_subjects()[0].files) == 1
    module.prepare_data()
    module.setup("fit")
    item = module.datasets["train"][0]
    assert item["image"].shape == (2, 16, 16, 16) and item["meta"]["grade"] in ("HGG", "LGG")
    assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_grade_disagreement_with_name_mapping_names_the_case(tmp_path: Path) -> None:
    mapping = {case: grade for grade, ids in CASES.items() for case in ids} | {"BraTS19_TMC_09043_1": "HGG"}
    make_brats(tmp_path / "data", CASES, name_mapping=mapping)
    with pytest.raises(DataError, match="BraTS19_TMC_09043_1.*name_mapping.csv says HGG, the case is in LGG/"):
        _module(tmp_path / "data", tmp_path).list_subjects()


def test_missing_modality_and_corrupt_file_are_errors_or_skipped(tmp_path: Path, caplog) -> None:
    folder = make_brats(tmp_path / "data", CASES)
    (folder / "HGG/BraTS19_CBICA_ABB_1/BraTS19_CBICA_ABB_1_flair.nii.gz").unlink()
    corrupt = folder / "LGG/BraTS19_TMC_09043_1/BraTS19_TMC_09043_1_t2.nii.gz"
    corrupt.write_bytes(gzip.compress(corrupt.read_bytes()[:-4000])[:300])  # a truncated download
    nan_file = folder / "HGG/BraTS19_CBICA_AAB_1/BraTS19_CBICA_AAB_1_t1ce.nii.gz"
    nib.save(nib.Nifti1Image(np.full((24, 24, 16), np.nan, dtype=np.float32), np.eye(4)), nan_file)
    with pytest.raises(DataError) as error:
        _module(folder, tmp_path).prepare_data()
    assert "BraTS19_CBICA_ABB_1_flair.nii.gz: missing modality file" in str(error.value)
    with pytest.raises(DataError, match="BraTS19_CBICA_AAB_1_t1ce.nii.gz: 9216 non-finite voxels"):
        _module(folder, tmp_path, modalities=["t1ce"]).prepare_data()
    with pytest.raises(DataError, match="BraTS19_TMC_09043_1.*unreadable"):
        _module(folder, tmp_path, modalities=["t2"]).prepare_data()
    skipping = _module(folder, tmp_path, on_bad_subject="skip")
    with caplog.at_level(logging.WARNING):
        skipping.prepare_data()
    skipping.setup("fit")
    assert sum(len(d) for d in skipping.datasets.values()) == 3
    assert "skipped 1 of 6 subjects" in caplog.text and "skipped 2 of 5 subjects" in caplog.text


def test_cache_follows_file_changes(tmp_path: Path) -> None:
    folder = make_brats(tmp_path / "data", {"HGG": CASES["HGG"], "LGG": CASES["LGG"]})
    module = _module(folder, tmp_path, modalities=["t1"])
    module.prepare_data()
    record = next(r for r in module.list_subjects() if r.subject_id == "BraTS19_CBICA_AAB_1")
    before = module._file(record)
    t1 = Path(record.files[0])
    image = nib.load(t1)
    nib.save(nib.Nifti1Image(image.get_fdata()[::-1].copy(), image.affine), t1)  # an edited file
    after = module._file(record)
    assert after != before and not after.exists()
    module.prepare_data()
    old, new = (torch.load(path, weights_only=True)["image"] for path in (before, after))
    assert not torch.equal(old, new)


def test_tumour_crop_centres_the_tumour(tmp_path: Path) -> None:
    folder = make_brats(tmp_path / "data", {"HGG": CASES["HGG"][:1]})
    module = _module(folder, tmp_path, grades=["HGG"], tumour_crop=True, tumour_crop_size=8)
    subject = module.load_subject(module.list_subjects()[0])
    assert subject.spatial_shape == (8, 8, 8)
    assert subject["seg"].data.sum() > 0  # the tumour is inside the crop
    assert "seg" not in module.channel_names


def test_root_errors_say_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSRL_BRATS2019_ROOT", raising=False)
    with pytest.raises(ValueError, match="MSRL_BRATS2019_ROOT"):
        BraTS2019DataModule(cache_dir=tmp_path).list_subjects()
    (tmp_path / "empty" / "a" / "b" / "c").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="HGG/ or LGG/"):
        _module(tmp_path / "empty", tmp_path).list_subjects()
    monkeypatch.setenv("MSRL_BRATS2019_ROOT", str(make_brats(tmp_path / "env", CASES)))
    assert len(BraTS2019DataModule(cache_dir=tmp_path).list_subjects()) == 6
    with pytest.raises(ValueError, match="modalities"):
        BraTS2019DataModule(modalities=["t1", "dwi"])
