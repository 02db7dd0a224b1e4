"""All-or-nothing output folders: a command's results appear complete or not at all."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a staging folder beside `out`; on success it replaces `out` in one rename, on error it vanishes.

    A process killed or failing half-way leaves the previous `out` (or nothing) and no half-written
    results that a later command would read (the staging folder is hidden: `.<name>-…`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
