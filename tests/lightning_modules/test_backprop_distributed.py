"""Reward backpropagation across 2 CPU processes gives the weights of one process with the whole batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, subprocess_env


def _run(checkpoint: Path, out: Path, devices: int) -> dict:
    script = REPO / "tests/scripts/backprop_ddp_run.py"
    result = subprocess.run([sys.executable, str(script), str(checkpoint), str(out), str(devices)], cwd=out.parent,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow  # two subprocesses starting torch and Lightning: ~40 s on 2 cores
def test_two_processes_train_like_one_with_the_whole_batch(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    ddp = _run(pretrained_checkpoint, tmp_path / "ddp.pt", devices=2)  # 2 samples per rank
    single = _run(pretrained_checkpoint, tmp_path / "single.pt", devices=1)  # all 4 samples in one process
    assert ddp["iteration"] == single["iteration"] == 2
    # DDP's average over ranks = the whole batch's gradient; weights whose gradient is 0 in exact arithmetic
    # (biases a GroupNorm cancels) get float noise ~1e-16, so the tolerance is relative to the whole gradient
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in single["gradients"].values())))
    for key, value in single["gradients"].items():
        torch.testing.assert_close(ddp["gradients"][key], value, rtol=1e-4, atol=1e-6 * norm, msg=key)
    start = torch.load(pretrained_checkpoint, weights_only=True)["state_dict"]
    moved = False
    for key, value in single["weights"].items():
        # Adam steps every weight by about lr whatever its gradient's size, so a gradient ~0 whose sign the
        # ranks' summation order decides may move a weight either way by up to lr per step (2 steps, lr 1e-3)
        tiny = float(single["gradients"][key].abs().max()) < 1e-6 * norm
        torch.testing.assert_close(ddp["weights"][key], value, rtol=1e-4, atol=2e-3 if tiny else 1e-6, msg=key)
        moved |= not torch.allclose(value, start[f"ema.module.{key}"])
    assert moved  # both trained: equal weights are not the untouched pretrained ones
