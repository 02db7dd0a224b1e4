"""The preprocessed cache's checks: damaged files rebuilt or refused before a run starts, and named when met later."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from datamodules import BraTS2019DataModule, DataError, TemplateCohortDataModule
from datamodules.cache_index import DamagedCacheError
from msrl.cli import main
from tests.conftest import REPO, TINY_MODEL_ARGS
from tests.datamodules.test_brats import CASES
from tests.fake_releases import make_brats


def _cohort(cache: Path, **settings: object) -> TemplateCohortDataModule:
    return TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, seed=0, **settings)


def _copy(cohort_cache: Path, tmp_path: Path) -> Path:
    """A copy of the session's tiny cohort cache that a test may damage."""
    return Path(shutil.copytree(cohort_cache, tmp_path / "cache"))


def _truncate(file: Path, size: int = 1000) -> None:
    file.write_bytes(file.read_bytes()[:size])


def _garble(file: Path) -> None:
    """Flip bytes in the middle of the file: same size, same name, different content."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    file.write_bytes(bytes(data))


def test_the_index_records_size_and_checksum(cohort_cache: Path) -> None:
    module = _cohort(cohort_cache)
    rows = json.loads((module.cache_path / "index.json").read_text())
    assert len(rows) == 8
    for row in rows:
        file = module.cache_path / row["cache_file"]
        assert row["size"] == file.stat().st_size and len(row["sha256"]) == 64
    assert "seg" in torch.load(module.cache_path / rows[0]["cache_file"], weights_only=True)  # lesion labels kept


def test_damaged_and_missing_files_are_rebuilt_with_one_warning_each(
        cohort_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    module = _cohort(_copy(cohort_cache, tmp_path))
    files = {name: module.cache_path / f"template_000{i}.pt" for i, name in enumerate(["truncated", "missing",
                                                                                      "garbled", "intact"])}
    originals = {name: file.read_bytes() for name, file in files.items()}
    _truncate(files["truncated"])
    files["missing"].unlink()
    _garble(files["garbled"])
    stamp = files["intact"].stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        module.prepare_data()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert f"subject template_0000: {files['truncated']} has 1000 bytes, the index records" in warnings[0]
    assert f"subject template_0001: {files['missing']} is missing" in warnings[1]
    assert f"subject template_0002: {files['garbled']} differs from the SHA-256" in warnings[2]
    for name, file in files.items():
        assert file.read_bytes() == originals[name], name  # rebuilt as they were (the synthesis is seeded)
    assert files["intact"].stat().st_mtime_ns == stamp  # not rewritten
    module.setup("fit")  # the index now agrees with every file


def test_size_checks_miss_what_checksums_catch(cohort_cache: Path, tmp_path: Path) -> None:
    """`verify_cache: size` is the cheap switch: it sees truncation, not a garbled block of the same size."""
    cache = _copy(cohort_cache, tmp_path)
    _garble(_cohort(cache).cache_path / "template_0004.pt")
    _cohort(cache, verify_cache="size").setup("fit")
    with pytest.raises(DataError, match="template_0004.pt: cache file differs from the SHA-256"):
        _cohort(cache).setup("fit")
    with pytest.raises(ValueError, match="verify_cache must be 'size' or 'checksum', got 'crc'"):
        _cohort(cache, verify_cache="crc")


def test_setup_refuses_what_prepare_data_did_not_mend(cohort_cache: Path, tmp_path: Path) -> None:
    """Another rank (or a file damaged since prepare_data): the run stops in setup, before any step."""
    module = _cohort(_copy(cohort_cache, tmp_path))
    module.prepare_data()
    file = module.cache_path / "template_0006.pt"
    _truncate(file)
    with pytest.raises(DataError) as error:
        _cohort(module.cache_dir).setup("fit")
    assert f"template_0006: {file}: cache file has 1000 bytes" in str(error.value)
    assert "run again" in str(error.value)


def test_a_file_damaged_during_training_is_named(cohort_cache: Path, tmp_path: Path) -> None:
    module = _cohort(_copy(cohort_cache, tmp_path))
    module.setup("fit")
    train = module.datasets["train"]
    file, subject = train.files[1], train.records[1].subject_id
    _truncate(file)
    with pytest.raises(DamagedCacheError) as error:
        next(iter(torch.utils.data.DataLoader(train, batch_size=2, num_workers=1)))
    message = str(error.value)
    assert str(file) in message and f"subject {subject}" in message and "failed finding central directory" in message
    assert "checkpoint" not in message  # PyTorch's "your checkpoint file is corrupted" is left out


def test_an_index_without_checksums_is_checked_by_loading_and_recorded(
        cohort_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An index written before the checks: its files are loaded once, damaged ones rebuilt, the rest recorded."""
    module = _cohort(_copy(cohort_cache, tmp_path))
    index = module.cache_path / "index.json"
    rows = json.loads(index.read_text())
    index.write_text(json.dumps([{k: v for k, v in row.items() if k not in ("size", "sha256")} for row in rows]))
    _truncate(module.cache_path / "template_0007.pt")
    with pytest.raises(DataError, match="template_0007.pt: cache file is unreadable"):
        _cohort(module.cache_dir).setup("fit")
    with caplog.at_level(logging.WARNING):
        module.prepare_data()
    assert "template_0007.pt is unreadable (PytorchStreamReader failed reading zip archive" in caplog.text
    assert json.loads(index.read_text()) == rows  # every size and checksum recorded, the rebuilt file's included


def test_a_damaged_file_whose_source_is_gone_stops_the_run_before_any_step(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A source that can no longer be read (here: zeroed, same size and time) cannot rebuild its damaged file."""
    root = make_brats(tmp_path / "data", CASES)
    module = BraTS2019DataModule(root=str(root), spatial_size=16, cache_dir=tmp_path / "cache", expected_shape=None,
                                 val_fraction=0.2)
    module.prepare_data()
    record = next(r for r in module.list_subjects() if r.subject_id == "BraTS19_TCIA01_131_1")
    cache_file = module._file(record)
    _truncate(cache_file)
    source = Path(record.files[0])
    stat = source.stat()
    source.write_bytes(bytes(stat.st_size))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the cache file's name still matches the source
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "-c", str(REPO / "configs/pretrain/base.yaml"),
              "-c", str(REPO / "configs/pretrain/brats2019.yaml"), "--trainer", str(REPO / "configs/trainer/cpu.yaml"),
              *TINY_MODEL_ARGS, "--model.autoencoder_checkpoint", "null", "--model.preview_every_n_epochs", "0",
              "--data.init_args.root", str(root), "--data.init_args.expected_shape", "null",
              "--data.init_args.spatial_size", "16", "--data.init_args.num_workers", "0",
              "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.val_fraction", "0.2",
              "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"BraTS19_TCIA01_131_1: {cache_file}: damaged, and rebuilding it failed" in error
    assert f"{source}: unreadable" in error and "Restore the subjects' source files" in error
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # stopped before any step
