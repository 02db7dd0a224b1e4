"""End-to-end tests of `msrl pretrain` and `msrl sample` through the CLI entry point."""

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from msrl.cli import main
from tests.conftest import REPO, TINY_MODEL_ARGS, cli_data_args

TEMPLATE = str(REPO / "configs/pretrain/template.yaml")


def _pretrain(cache: Path, runs: Path, *extra: str) -> None:
    main(["pretrain", "-c", TEMPLATE, *cli_data_args(cache), *TINY_MODEL_ARGS,
          "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
          "--model.preview_every_n_epochs", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(runs), *extra])


@pytest.fixture(scope="module")
def trained_run(cohort_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch 16³ pretraining run through the CLI; returns its version folder."""
    runs = tmp_path_factory.mktemp("runs")
    _pretrain(cohort_cache, runs)
    return runs / "pretrain" / "version_0"


def test_pretrain_writes_config_checkpoints_and_tensorboard(trained_run: Path) -> None:
    assert (trained_run / "config.yaml").is_file()
    assert "TemplateCohortDataModule" in (trained_run / "config.yaml").read_text()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((trained_run / "checkpoints").glob("best-*.ckpt"))) == 1
    events = EventAccumulator(str(trained_run)).Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    assert "val/samples" in events.Tags()["images"]
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 6 and all(np.isfinite(losses))  # 6 train subjects, batch 2, 2 epochs
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6 and checkpoint["hyper_parameters"]["spatial_size"] == 16


def test_resume_continues_from_last_checkpoint(trained_run: Path, cohort_cache: Path, tmp_path: Path) -> None:
    _pretrain(cohort_cache, tmp_path, "--trainer.max_epochs", "3",
              "--ckpt_path", str(trained_run / "checkpoints" / "last.ckpt"))
    resumed = torch.load(tmp_path / "pretrain/version_0/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 9 and resumed["epoch"] == 2  # one more epoch, not three
    _pretrain(cohort_cache, tmp_path / "whole", "--trainer.max_epochs", "3")  # the same run, never stopped
    whole = torch.load(tmp_path / "whole/pretrain/version_0/checkpoints/last.ckpt", weights_only=True)
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


def test_sample_writes_readable_nifti_and_manifest(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples"
    main(["sample", "--checkpoint", str(ckpt), "--num-samples", "3", "--label", "1", "--steps", "3",
          "--eta", "0.0", "--batch-size", "2", "--out", str(out)])
    files = sorted(out.glob("*.nii.gz"))
    assert [f.name for f in files] == ["sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz"]
    image = nib.load(files[0])
    assert image.shape == (16, 16, 16) and np.allclose(image.affine, np.eye(4))
    data = image.get_fdata()
    assert data.min() >= -1 and data.max() <= 1 and data.std() > 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["label"] for r in rows] == ["1", "1", "1"] and [r["seed"] for r in rows] == ["0", "0", "2"]
    assert rows[0]["checkpoint"] == str(ckpt)
    assert (out / "slices.png").stat().st_size > 1000


def test_sample_errors_name_the_problem(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    for argv, message in [
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "missing.ckpt does not exist"),
        (["--checkpoint", ckpt, "--label", "7", "--out", str(tmp_path / "x")], "--label 7"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", *argv])
        assert exit_info.value.code == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_print_config_works_for_every_verb(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "-c", TEMPLATE, "--print_config"])
    printed = capsys.readouterr().out
    assert "noise_scheduler:" in printed and "TemplateCohortDataModule" in printed and "ema_decay:" in printed
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "x.ckpt", "--print_config"])
    assert "num_samples: null" in capsys.readouterr().out


def test_unknown_verb_and_bad_key_are_reported(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrian"])
    assert exit_info.value.code == 2 and "unknown verb 'pretrian'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "-c", TEMPLATE, "--model.chanels", "[8,8,8]"])
    assert "chanels" in capsys.readouterr().err  # jsonargparse names the misspelled key


def test_last_ckpt_is_the_last_epoch_even_when_the_best_is_older(cohort_cache: Path, tmp_path: Path) -> None:
    # mode "max" on a falling val/loss keeps epoch 0 as "best"; Lightning's own save_last would then
    # leave last.ckpt at epoch 0 as well
    _pretrain(cohort_cache, tmp_path, "--checkpoint.mode", "max")
    checkpoints = tmp_path / "pretrain" / "version_0" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 1
    assert [p.name.split("-step")[0] for p in checkpoints.glob("best-*.ckpt")] == ["best-epoch000"]


def test_default_root_dir_holds_the_whole_run(cohort_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """`--trainer.default_root_dir DIR` puts events, config and checkpoints under DIR, not the config's runs/."""
    monkeypatch.chdir(tmp_path)
    main(["pretrain", "-c", TEMPLATE, *cli_data_args(cohort_cache), *TINY_MODEL_ARGS, "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "0", "--model.preview_every_n_epochs", "0",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "elsewhere")])
    run = tmp_path / "elsewhere" / "pretrain" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*")) and not (tmp_path / "runs").exists()


def test_help_lists_every_verb_in_one_table(capsys: pytest.CaptureFixture) -> None:
    from msrl.cli import VERBS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for verb in ("pretrain", "train-autoencoder", "train-reward", "train-extractor", "train-controlnet", "finetune",
                 "sample", "evaluate", "report", "data", "study", "export", "merge-lora"):
        assert f"  {verb} " in printed and verb in VERBS


def test_version_prints_the_pyproject_version(capsys: pytest.CaptureFixture) -> None:
    """`msrl --version` (or -V) prints the installed version, which must be pyproject.toml's (else reinstall)."""
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert declared is not None
    for flag in ("--version", "-V"):
        main([flag])
        assert capsys.readouterr().out == f"msrl {declared.group(1)}\n"
