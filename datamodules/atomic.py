"""All-or-nothing writes: a file or a command's output folder appears complete or not at all.

The one place msrl writes atomically: cache files and histograms (`atomic_save`,
`atomic_write_text`) through a temporary name and `os.replace`, and whole output folders of
`msrl sample`, `evaluate` and `report` (`atomic_folder`) through a staging folder swapped in.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one system call (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns False where the system or the file system cannot (then nothing was changed).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0


def _remove_abandoned_staging(out: Path, prefix: str) -> None:
    """Staging folders of this host's processes that no longer run (killed mid-write) are deleted."""
    for folder in out.parent.glob(f"{prefix}*"):
        try:
            pid = int(folder.name[len(prefix):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("removing %s, left by a process killed while writing %s", folder, out)
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or a process of another user that still runs


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside `out`; on success it replaces `out` in one step, on error it vanishes.

    A process killed or failing half-way leaves the previous `out` whole (or nothing) and no
    half-written results that a later command would read: the staging folder is hidden
    (`.<name>-<host>-<pid>-…`) and a later run on the same host removes it. An existing `out` is
    swapped with the staging folder in one system call on Linux; elsewhere it is renamed aside
    first, which leaves a moment in which `out` is missing (but never partial).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}-{socket.gethostname()}-"
    _remove_abandoned_staging(out, prefix)
    staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))
    try:
        yield staging
        if not out.exists():
            staging.rename(out)
        elif not exchange_paths(staging, out):  # now `staging` holds the previous results
            previous = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))
            out.rename(previous / out.name)
            staging.rename(out)
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: a killed run never leaves a half file."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: Path) -> None:
    """Write text through a temporary file and a rename."""
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it over `path`.

    The rename is atomic on POSIX file systems: readers see the old file or the new one. A write
    that fails removes its temporary file; one killed outright leaves only a `.tmp<pid>` file that
    nothing reads.
    """
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
