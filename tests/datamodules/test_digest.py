"""`sha256_of`: the digest every layer records a file by; `check_recorded_file`: a recorded file, unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import datamodules
from datamodules.digest import check_recorded_file, sha256_of


def test_sha256_of_is_the_digest_of_the_file_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # > 1 MiB: read in more than one block
    (tmp_path / "weights.ckpt").write_bytes(data)
    assert sha256_of(tmp_path / "weights.ckpt") == hashlib.sha256(data).hexdigest()
    assert sha256_of(str(tmp_path / "weights.ckpt")) == hashlib.sha256(data).hexdigest()  # a str path alike
    assert datamodules.sha256_of is sha256_of  # the package exports it


def test_check_recorded_file_names_the_file_and_what_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "base.ckpt"
    path.write_bytes(b"weights")
    recorded = hashlib.sha256(b"weights").hexdigest()
    assert check_recorded_file(str(path), recorded, "base checkpoint", "checkpoint run.ckpt") == path
    assert datamodules.check_recorded_file is check_recorded_file
    path.write_bytes(b"weights, changed")
    found = hashlib.sha256(b"weights, changed").hexdigest()
    with pytest.raises(ValueError) as changed:
        check_recorded_file(path, recorded, "base checkpoint", "checkpoint run.ckpt", "retrain it")
    assert str(changed.value) == (f"base checkpoint {path} is not the one checkpoint run.ckpt records: its sha256 is "
                                  f"{found[:16]}…, recorded {recorded[:16]}…: retrain it")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"^base checkpoint {path} does not exist \(checkpoint run.ckpt "
                                                rf"records it with sha256 {recorded[:16]}…\): restore the original"):
        check_recorded_file(path, recorded, "base checkpoint", "checkpoint run.ckpt")
    monkeypatch.chdir(tmp_path)  # a relative path: the message says where it was looked for
    with pytest.raises(FileNotFoundError, match=rf"gone.ckpt does not exist .*looked for from {tmp_path}\)"):
        check_recorded_file("gone.ckpt", recorded, "ControlNet checkpoint", "checkpoint run.ckpt")
