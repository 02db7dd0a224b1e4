"""A process killed while writing a checkpoint or a cached volume leaves a whole, readable file."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules.base import _atomic_save
from tests.conftest import REPO, subprocess_env


@pytest.mark.parametrize("writer", ["lightning", "cache"])
def test_killed_writers_leave_the_previous_or_the_new_file(writer: str, tmp_path: Path) -> None:
    """Lightning's checkpoint writer (fsspec transaction) and msrl's cache writer (rename).

    A plain `torch.save(obj, path)` fails this test (checked once: a truncated file that torch.load rejects).
    """
    target = tmp_path / "last.ckpt"
    for delay in (0.13, 0.41, 0.77):  # somewhere inside one of the next writes (each takes ~0.3 s)
        process = subprocess.Popen([sys.executable, str(REPO / "tests/scripts/write_forever.py"), str(target), writer],
                                   env=subprocess_env(), cwd=tmp_path)
        previous = target.stat().st_mtime_ns if target.exists() else None
        deadline = time.time() + 60
        while time.time() < deadline and (not target.exists() or target.stat().st_mtime_ns == previous):
            time.sleep(0.02)  # until this process has landed a write of its own
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)  # no handler can run: as a node failure or OOM kill
        process.wait()
        saved = torch.load(target, weights_only=True)  # would raise on a half-written file
        assert saved["weights"].numel() == 16 * 1024 * 1024
        assert torch.all(saved["weights"] == saved["version"])


def test_a_failing_cache_write_keeps_the_old_file_and_no_temporary(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "subject.pt"
    _atomic_save({"image": torch.ones(3)}, target)

    def broken_save(obj, path):  # writes half a file, then the disk fills up
        Path(path).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        _atomic_save({"image": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["image"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["subject.pt"]
