"""A process killed while writing a checkpoint or a cached volume leaves a whole, readable file."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules.atomic import atomic_folder, atomic_save
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


def test_a_killed_evaluation_leaves_the_previous_or_the_new_results(tmp_path: Path) -> None:
    """`atomic_folder` (msrl sample/evaluate/report): metrics.json always matches the volume beside it.

    Writing into the folder in place fails this test (a missing or truncated metrics.json).
    """
    out = tmp_path / "evaluation"
    for delay in (0.05, 0.23, 0.41, 0.67):  # inside a volume write, a metrics.json write, or the swap
        process = subprocess.Popen([sys.executable, str(REPO / "tests/scripts/write_forever.py"), str(out), "folder"],
                                   env=subprocess_env(), cwd=tmp_path)
        previous = (out / "metrics.json").stat().st_mtime_ns if out.exists() else None
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or (out / "metrics.json").stat().st_mtime_ns == previous):
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "volume.pt"]
        version = json.loads((out / "metrics.json").read_text())["version"]
        assert torch.all(torch.load(out / "volume.pt", weights_only=True) == version)
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(visible) == ["evaluation"]
    with atomic_folder(out) as staging:  # the next run on this host removes what the killed ones left
        (staging / "metrics.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation"]


def test_a_failing_cache_write_keeps_the_old_file_and_no_temporary(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "subject.pt"
    atomic_save({"image": torch.ones(3)}, target)

    def broken_save(obj, path):  # writes half a file, then the disk fills up
        Path(path).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"image": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["image"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["subject.pt"]


@pytest.mark.parametrize("swap", [True, False])
def test_atomic_folder_replaces_on_success_and_keeps_the_previous_on_error(swap: bool, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-call swap (Linux) and the rename-aside fallback (elsewhere) give the same results."""
    import datamodules.atomic as atomic_output

    if not swap:
        monkeypatch.setattr(atomic_output, "exchange_paths", lambda first, second: False)
    out = tmp_path / "samples"
    for version in (1, 2):
        with atomic_folder(out) as staging:
            (staging / "manifest.csv").write_text(f"version {version}")
    with pytest.raises(RuntimeError, match="sampling failed"), atomic_folder(out) as staging:
        (staging / "manifest.csv").write_text("version 3, half")
        raise RuntimeError("sampling failed")
    assert (out / "manifest.csv").read_text() == "version 2"
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]  # no staging or previous folder left
