"""Tests of `msrl data check` and of BraTS/OASIS pretraining through the CLI on fake trees."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules import BraTS2019DataModule, OASIS1DataModule
from msrl.cli import main
from msrl.commands.data import check
from tests.conftest import REPO, TINY_MODEL_ARGS
from tests.datamodules.test_brats import CASES
from tests.datamodules.test_oasis import SUBJECTS
from tests.fake_releases import make_brats, make_oasis


def test_check_prints_counts_and_exits_nonzero_on_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_brats(tmp_path / "data", CASES)
    args = ["data", "check", "--data", str(REPO / "configs/data/brats2019.yaml"), "--data.init_args.root", str(folder),
            "--data.init_args.expected_shape", "null", "--data.init_args.cache_dir", str(tmp_path / "cache")]
    main(args)  # a clean tree: no SystemExit
    report = capsys.readouterr().out
    assert "6 subjects found, 6 usable" in report and "0 error(s)" in report
    assert "    0          3" in report and "    1          3" in report  # per label
    t1 = folder / "HGG/BraTS19_CBICA_AAB_1/BraTS19_CBICA_AAB_1_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.full((24, 24, 16), np.nan, dtype=np.float32), np.eye(4)), t1)
    (folder / "LGG/BraTS19_2013_0_1/BraTS19_2013_0_1_t2.nii.gz").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    report = capsys.readouterr().out
    assert "6 subjects found, 4 usable" in report and "2 error(s)" in report
    assert "BraTS19_CBICA_AAB_1_t1.nii.gz: 9216 non-finite voxels" in report
    assert "BraTS19_2013_0_1_t2.nii.gz: missing modality file" in report


def test_check_reads_its_options_from_c(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`-c FILE` is a YAML of the verb's own options, as for every verb; `--data` names the data config."""
    monkeypatch.setenv("MSRL_OASIS1_ROOT", str(make_oasis(tmp_path / "oasis", SUBJECTS)))
    options = tmp_path / "check.yaml"
    options.write_text(f"data: {REPO / 'configs/data/oasis1.yaml'}\nread_files: false\n")
    main(["data", "check", "-c", str(options), "--data.init_args.expected_shape", "null"])
    assert "OASIS1DataModule: 5 subjects found, 5 usable" in capsys.readouterr().out


@pytest.mark.parametrize("release", ["brats", "oasis"])
def test_real_release_sizes_pass_and_wrong_sizes_are_flagged(release: str, tmp_path: Path) -> None:
    if release == "brats":
        make_brats(tmp_path / "data", {"HGG": ["BraTS19_CBICA_AAB_1"]}, shape=(240, 240, 155))
        data = BraTS2019DataModule(root=str(tmp_path / "data"), modalities=["t1"], grades=["HGG"],
                                   cache_dir=tmp_path / "c", spatial_size=16)
    else:
        make_oasis(tmp_path / "data", {"OAS1_0001_MR1": "0"}, shape=(176, 208, 176))
        data = OASIS1DataModule(root=str(tmp_path / "data"), cache_dir=tmp_path / "c", spatial_size=16)
    report, problems = check(data)
    assert problems == [], report
    data.prepare_data()  # the full-size volume goes through the preprocessing
    image = torch.load(next(data.cache_path.glob("*-*.pt")), weights_only=True)["image"]
    assert image.shape == (1, 16, 16, 16)
    data.expected_shape = (241, 240, 155)
    _, problems = check(data)
    files = 2 if release == "brats" else 1  # BraTS: t1 and seg (read to keep the tumour out of the percentiles)
    assert len(problems) == files and all("the release has (241, 240, 155)" in p.message for p in problems)


@pytest.mark.parametrize("release", ["brats2019", "oasis1"])
def test_pretrain_runs_on_a_fake_release_through_the_cli(release: str, tmp_path: Path) -> None:
    if release == "brats2019":
        root = make_brats(tmp_path / "data", CASES, doubled=True).parent.parent
    else:
        root = make_oasis(tmp_path / "data", SUBJECTS)
    main(["pretrain", "-c", str(REPO / "configs/pretrain/base.yaml"),
          "-c", str(REPO / f"configs/pretrain/{release}.yaml"),
          "--trainer", str(REPO / "configs/trainer/cpu.yaml"), *TINY_MODEL_ARGS,
          "--data.init_args.root", str(root), "--data.init_args.expected_shape", "null",
          "--data.init_args.spatial_size", "16", "--data.init_args.num_workers", "0",
          "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.val_fraction", "0.2",
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
          "--model.activation_checkpointing", "false", "--model.preview_every_n_epochs", "0",
          "--model.autoencoder_checkpoint", "null",  # the data path in voxel space (latent: test_latent.py)
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    checkpoint = torch.load(tmp_path / "runs/pretrain/version_0/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["in_channels"] == (4 if release == "brats2019" else 1)


def test_check_reports_damaged_cache_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A damaged cache file is a warning while its source is there (the next run rebuilds it), an error after."""
    folder = make_brats(tmp_path / "data", CASES)
    args = ["data", "check", "--data", str(REPO / "configs/data/brats2019.yaml"), "--data.init_args.root", str(folder),
            "--data.init_args.expected_shape", "null", "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--data.init_args.spatial_size", "16"]
    main(args)
    assert "cache: none yet in" in capsys.readouterr().out
    data = BraTS2019DataModule(root=str(folder), expected_shape=None, cache_dir=tmp_path / "cache", spatial_size=16)
    data.prepare_data()
    entries = {record.subject_id: entry for record, entry in data.read_index()}
    truncated, garbled = entries["BraTS19_CBICA_AAB_1"].path, entries["BraTS19_2013_0_1"].path
    truncated.write_bytes(truncated.read_bytes()[:1000])
    garbled.write_bytes(garbled.read_bytes()[:-4] + b"\0\0\0\0")
    main(args)  # warnings only: no SystemExit
    report = capsys.readouterr().out
    assert "cache: 6 files checked (checksum)" in report and "2 missing or damaged" in report
    assert f"warning: BraTS19_CBICA_AAB_1: {truncated}: cache file has 1000 bytes, the index records" in report
    assert f"warning: BraTS19_2013_0_1: {garbled}: cache file differs from the SHA-256" in report
    assert "the next run rebuilds it from its source" in report
    main([*args, "--read-files", "false"])  # sizes only
    assert "1 missing or damaged" in capsys.readouterr().out
    shutil.rmtree(folder / "HGG/BraTS19_CBICA_AAB_1")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    report = capsys.readouterr().out
    assert exit_info.value.code == 1 and "5 subjects found" in report
    assert f"error: BraTS19_CBICA_AAB_1: {truncated}: cache file has 1000 bytes" in report
    assert "its source files are gone: restore them, or this file from an intact copy of the cache" in report
