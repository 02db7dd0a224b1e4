"""`msrl export` of a ControlNet: the bundle takes a mask, runs without msrl, draws what `msrl sample --mask`
draws with the mask's affine, refuses a bad mask as msrl does, and its card states the label channels."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from msrl.cli import main
from tests.msrl.test_export import TOLERANCE, _run, pretrained_kl_checkpoint, python_without_msrl  # noqa: F401
from tests.msrl.test_sample_mask import AFFINE, controlnet_checkpoint, lesion_mask, save_mask  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # 13–20 s: make test-full (make test stays under 10 minutes)
def test_controlnet_bundle_draws_like_msrl_sample_beside_the_mask(controlnet_checkpoint: Path,  # noqa: F811
                                                                  python_without_msrl: Path,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    main(["export", "--checkpoint", str(controlnet_checkpoint), "--out", str(bundle), "--steps", "3",
          "--guidance-scale", "2.0", "--batch-size", "2", "--num-samples", "2"])
    config = json.loads((bundle / "configs/inference.json").read_text())
    assert config["controlnet_def"]["_target_"] == "monai.networks.nets.ControlNet"
    assert config["autoencoder_def"]["_target_"] == "monai.networks.nets.AutoencoderKL"  # the base's first stage
    assert config["mask_rules"]["labels"] == [1, 2, 4] and config["label"] == "auto"
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["autoencoder.pt", "controlnet.pt",
                                                                      "diffusion_unet.pt", "noise_schedule.pt"]
    assert (bundle / "scripts/masks.py").read_text() == (REPO / "msrl/samples/mask_files.py").read_text()

    masks = tmp_path / "masks"
    masks.mkdir()
    save_mask(lesion_mask(3), masks / "case.nii.gz")
    save_mask(np.zeros((16, 16, 16), np.uint8), masks / "empty.nii.gz")
    result = _run(python_without_msrl, ["-m", "monai.bundle", "run", "--config_file",
                                        str(bundle / "configs/inference.json"), "--mask", str(masks), "--seed", "5"],
                  tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = tmp_path / "reference"
    shutil.copytree(masks, reference, ignore=shutil.ignore_patterns("*_sample_*", "samples.csv"))
    main(["sample", "--checkpoint", str(controlnet_checkpoint), "--mask", str(reference), "--num-samples", "2",
          "--steps", "3", "--guidance-scale", "2.0", "--batch-size", "2", "--seed", "5"])
    for name in ("case_sample_0", "case_sample_1", "empty_sample_0", "empty_sample_1"):
        exported, drawn = nib.load(masks / f"{name}.nii.gz"), nib.load(reference / f"{name}.nii.gz")
        assert exported.shape == (16, 16, 16) and np.array_equal(exported.affine, AFFINE)
        difference = float(np.abs(np.asarray(exported.dataobj) - np.asarray(drawn.dataobj)).max())
        assert difference <= TOLERANCE, f"{name}: bundle vs msrl sample, max |difference| {difference:.3g}"
    with open(masks / "samples.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert rows["case_sample_1.nii.gz"]["label"] == "1" and rows["empty_sample_0.nii.gz"]["label"] == "0"
    case, empty = (np.asarray(nib.load(masks / f"{n}_sample_0.nii.gz").dataobj) for n in ("case", "empty"))
    assert np.abs(case - empty).max() > 1000 * TOLERANCE  # each volume its own: the comparison above could fail

    (tmp_path / "lps").mkdir()
    lps = save_mask(lesion_mask(), tmp_path / "lps" / "lps.nii.gz", np.diag([-1.0, -1.0, 1.0, 1.0]))
    refused = _run(python_without_msrl, ["-m", "monai.bundle", "run", "--config_file",
                                         str(bundle / "configs/inference.json"), "--mask", str(lps)], tmp_path)
    assert refused.returncode != 0 and f"{lps}: has orientation LPS, expected RAS+" in refused.stderr
    assert sorted(p.name for p in lps.parent.iterdir()) == ["lps.nii.gz"]  # nothing written

    card = (bundle / "docs/README.md").read_text()
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert "ControlNet on a pretrained" in card and "--mask seg.nii.gz" in card
    for line in ("channel 0: label 1, necrotic core", "channel 1: label 2, oedema", "channel 2: label 4, enhancing"):
        assert line in card
    assert meta["network_data_format"]["inputs"]["mask"]["channel_def"]["4"] == "enhancing tumour"
    assert meta["msrl"]["controlnet"]["base_sha256"] in card and meta["msrl"]["base_checkpoint"]["sha256"] in card
    for digest in meta["weights_sha256"].values():
        assert digest in card
    exported = torch.load(bundle / "models/controlnet.pt", weights_only=True)
    trained = torch.load(controlnet_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(value, trained[f"ema.module.{key}"]) for key, value in exported.items())


def test_controlnet_export_refuses_classes(controlnet_checkpoint: Path, tmp_path: Path,  # noqa: F811
                                          capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(controlnet_checkpoint), "--out", str(tmp_path / "b"), "--classes", "[1]"])
    assert "a ControlNet bundle draws per mask" in capsys.readouterr().err and not (tmp_path / "b").exists()
