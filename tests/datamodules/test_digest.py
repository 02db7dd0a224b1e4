"""`sha256_of`: the digest every layer records a file by."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datamodules
from datamodules.digest import sha256_of


def test_sha256_of_is_the_digest_of_the_file_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # > 1 MiB: read in more than one block
    (tmp_path / "weights.ckpt").write_bytes(data)
    assert sha256_of(tmp_path / "weights.ckpt") == hashlib.sha256(data).hexdigest()
    assert sha256_of(str(tmp_path / "weights.ckpt")) == hashlib.sha256(data).hexdigest()  # a str path alike
    assert datamodules.sha256_of is sha256_of  # the package exports it
