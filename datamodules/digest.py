"""`sha256_of`: the SHA-256 of a file's bytes, the one way msrl identifies a file it records.

Cache files (their index), autoencoders and base models (recorded in the checkpoints built on them),
reward networks, ControlNets and exported weights are all named by it. It lives in the lowest layer so
that every layer above can use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of the bytes of the file at `path`."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
