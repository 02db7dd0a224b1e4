"""`msrl data masks`: a split's cached lesion masks as RAS+ NIfTI files that `msrl sample --mask` accepts."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datamodules import TemplateCohortDataModule
from msrl.cli import main
from tests.msrl.test_export import pretrained_kl_checkpoint  # noqa: F401  # fixtures of the ControlNet below
from tests.msrl.test_sample_mask import SAMPLER, controlnet_checkpoint, data_yaml  # noqa: F401


def test_written_masks_are_the_cached_seg_and_msrl_sample_takes_them(cohort_cache: Path, controlnet_checkpoint: Path,  # noqa: F811
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "masks"
    config = data_yaml(cohort_cache, tmp_path / "train.yaml", nested=True)  # a training config's data: section
    main(["data", "masks", f"--data={config}", "--split", "val", "--out", str(out)])
    assert "wrote 2 masks of the val split (1 with a lesion)" in capsys.readouterr().out
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, val_fraction=0.25,
                                    test_fraction=0.25)
    data.setup("fit")
    cached = {item["subject_id"]: item for item in (data.datasets["val"][i] for i in range(2))}
    with open(out / "masks.csv", newline="") as handle:
        listed = list(csv.DictReader(handle))
    assert sorted(r["subject_id"] for r in listed) == sorted(cached)
    for row in listed:
        item = cached[row["subject_id"]]
        image = nib.load(out / f"{row['subject_id']}_seg.nii.gz")
        assert image.get_data_dtype() == np.uint8 and nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.array_equal(image.affine, np.eye(4))  # the affine msrl sample writes volumes with
        assert np.array_equal(np.asarray(image.dataobj), item["seg"][0].numpy())
        assert int(row["label"]) == int(item["label"]) and int(row["lesion_voxels"]) == int(item["seg"].count_nonzero())
    assert any(int(row["lesion_voxels"]) > 0 for row in listed)  # a lesion's labels made the round trip

    main(["sample", "--checkpoint", str(controlnet_checkpoint), "--mask", str(out), *SAMPLER])
    assert len(list(out.glob("*_seg_sample_0.nii.gz"))) == 2

    with pytest.raises(SystemExit):  # the folder is not replaced without --overwrite
        main(["data", "masks", "--data", str(config), "--split", "val", "--out", str(out)])
    assert "--overwrite true" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "masks", "--data", str(config), "--split", "holdout", "--out", str(tmp_path / "other")])
    assert "split must be one of ('train', 'val', 'test'), got 'holdout'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
