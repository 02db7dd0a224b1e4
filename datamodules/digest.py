"""`sha256_of`: the SHA-256 of a file's bytes, the one way msrl identifies a file it records.

Cache files (their index), autoencoders and base models (recorded in the checkpoints built on them),
reward networks, ControlNets and exported weights are all named by it. It lives in the lowest layer so
that every layer above can use it; `check_recorded_file` is the one check that a recorded file is still there,
unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of the bytes of the file at `path`."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_recorded_file(path: str | Path, expected_sha256: str, what: str, recorded_by: str,
                        remedy: str = "restore the original file") -> Path:
    """The file a checkpoint records, refused if it is missing or its bytes are not the recorded ones.

    Args:
        path: the recorded file (a relative path is looked for from the working directory).
        expected_sha256: the SHA-256 recorded with it.
        what: what the file is, e.g. "base checkpoint".
        recorded_by: what records it, e.g. "ControlNet checkpoint runs/…/last.ckpt".
        remedy: what the user can do, ending both messages.

    Raises:
        FileNotFoundError: no file at `path` (the message names it, what records it and the recorded SHA-256).
        ValueError: the file's SHA-256 differs (the message names it and both SHA-256s).
    """
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f", looked for from {Path.cwd()}"
        raise FileNotFoundError(f"{what} {path} does not exist ({recorded_by} records it with sha256 "
                                f"{expected_sha256[:16]}…{where}): {remedy}")
    found = sha256_of(path)
    if found != expected_sha256:
        raise ValueError(f"{what} {path} is not the one {recorded_by} records: its sha256 is {found[:16]}…, "
                         f"recorded {expected_sha256[:16]}…: {remedy}")
    return path
