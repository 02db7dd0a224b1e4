"""Tests of the OASIS-1 loader on fake trees that copy the release's layout."""

import logging
from pathlib import Path

import numpy as np
import pytest

from datamodules import OASIS1DataModule
from datamodules.problems import DataError
from tests.fake_releases import make_oasis

SUBJECTS = {"OAS1_0001_MR1": "0", "OAS1_0002_MR1": "0.5", "OAS1_0003_MR1": "1", "OAS1_0004_MR1": "",
            "OAS1_0005_MR1": "0", "OAS1_0006_MR1": "2", "OAS1_0001_MR2": "0"}


@pytest.fixture
def oasis(tmp_path: Path) -> Path:
    """Seven image folders over disc1/disc2 (one n3 run), a CSV with an extra row without images."""
    return make_oasis(tmp_path / "oasis", SUBJECTS, csv_rows=SUBJECTS | {"OAS1_0007_MR1": "0.5"},
                      runs={"OAS1_0002_MR1": 3})


def _module(root: Path, tmp_path: Path, **kwargs) -> OASIS1DataModule:
    settings = dict(root=str(root), spatial_size=16, cache_dir=tmp_path / "cache", expected_shape=None,
                    val_fraction=0.2, test_fraction=0.0, batch_size=2)
    settings.update(kwargs)
    return OASIS1DataModule(**settings)


def _labels(module: OASIS1DataModule) -> dict[str, int]:
    return {r.subject_id: r.label for r in module.list_subjects()}


def test_label_modes_empty_cdr_and_reliability_scans(oasis: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        binary = _labels(_module(oasis, tmp_path))
    assert binary == {"OAS1_0001_MR1": 0, "OAS1_0002_MR1": 1, "OAS1_0003_MR1": 1, "OAS1_0005_MR1": 0,
                      "OAS1_0006_MR1": 1}  # no OAS1_0004 (empty CDR is not 0), no _MR2
    assert "OAS1_0007_MR1" in caplog.text and "CSV row without images" in caplog.text
    multi = _labels(_module(oasis, tmp_path, label_mode="cdr_multiclass"))
    assert multi["OAS1_0002_MR1"] == 1 and multi["OAS1_0003_MR1"] == 2 and multi["OAS1_0006_MR1"] == 3
    unlabelled = _labels(_module(oasis, tmp_path, label_mode="none"))
    assert len(unlabelled) == 6 and set(unlabelled.values()) == {-1}
    assert "OAS1_0001_MR2" in _labels(_module(oasis, tmp_path, include_reliability=True))


def test_n3_and_n4_runs_are_found_and_masked_or_not(oasis: Path, tmp_path: Path) -> None:
    records = {r.subject_id: r for r in _module(oasis, tmp_path).list_subjects()}
    assert records["OAS1_0002_MR1"].files[0].endswith("OAS1_0002_MR1_mpr_n3_anon_111_t88_masked_gfc.img")
    assert records["OAS1_0001_MR1"].files[0].endswith("OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img")
    unmasked = {r.subject_id: r for r in _module(oasis, tmp_path, masked=False).list_subjects()}
    assert unmasked["OAS1_0001_MR1"].files[0].endswith("_t88_gfc.img")


def test_images_get_the_fixed_las_affine_and_items_carry_meta(oasis: Path, tmp_path: Path) -> None:
    module = _module(oasis, tmp_path)
    subject = module.load_subject(module.list_subjects()[0])
    assert subject["t1"].orientation == ("L", "A", "S")
    np.testing.assert_allclose(subject["t1"].affine, np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert subject["t1"].spatial_shape == (22, 26, 22)  # the trailing 4th axis is dropped
    module.prepare_data()
    module.setup("fit")
    item = module.datasets["train"][0]
    assert item["image"].shape == (1, 16, 16, 16)
    assert set(item["meta"]) == {"age", "sex", "mmse", "cdr"} and item["meta"]["sex"] in ("M", "F")
    batch = next(iter(module.train_dataloader()))
    assert batch["meta"]["cdr"].shape == (2,)


def test_images_without_csv_row_and_corrupt_files_are_errors(tmp_path: Path) -> None:
    rows = {k: v for k, v in SUBJECTS.items() if k != "OAS1_0003_MR1"}
    root = make_oasis(tmp_path / "oasis", SUBJECTS, csv_rows=rows)
    with pytest.raises(DataError, match="OAS1_0003_MR1.*images without a row in oasis_cross-sectional.csv"):
        _module(root, tmp_path).list_subjects()
    assert "OAS1_0003_MR1" in _labels(_module(root, tmp_path, label_mode="none"))  # a warning there
    image = next((root / "disc1/OAS1_0001_MR1").rglob("*masked_gfc.img"))
    image.write_bytes(image.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match="OAS1_0001_MR1.*masked_gfc.img"):
        _module(root, tmp_path, label_mode="none").prepare_data()


def test_missing_csv_is_explained(tmp_path: Path) -> None:
    root = make_oasis(tmp_path / "oasis", {"OAS1_0001_MR1": "0"})
    (root / "oasis_cross-sectional.csv").unlink()
    with pytest.raises(FileNotFoundError, match="oasis_cross-sectional.csv does not exist"):
        _module(root, tmp_path).list_subjects()

