"""A 2-process CPU DDP pretraining run, in a subprocess (Lightning's launcher re-runs the command)."""

import shutil
import subprocess
from pathlib import Path

import torch

from tests.conftest import MSRL, REPO, TINY_MODEL_ARGS, cli_data_args, subprocess_env


def test_two_process_ddp_pretrain(cohort_cache: Path, tmp_path: Path) -> None:
    command = [MSRL, "pretrain", "-c", str(REPO / "configs/pretrain/template.yaml"), *cli_data_args(cohort_cache),
               *TINY_MODEL_ARGS, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
               "--trainer.check_val_every_n_epoch", "1", "--model.preview_every_n_epochs", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "pretrain/version_0/checkpoints/last.ckpt", weights_only=True)
    # 6 training subjects, batch 2: 3 per rank → 2 steps per epoch on 2 ranks (3 on one process).
    assert checkpoint["global_step"] == 2
    assert "distributed_backend=gloo" in result.stderr or "world_size=2" in result.stderr + result.stdout


def test_two_process_ddp_pretrain_mends_a_damaged_cache(cohort_cache: Path, tmp_path: Path) -> None:
    """Rank 0 rebuilds the damaged file in prepare_data while rank 1 waits; both then pass setup's check."""
    cache = Path(shutil.copytree(cohort_cache, tmp_path / "cache"))
    damaged = sorted(cache.rglob("template_*.pt"))[2]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    command = [MSRL, "pretrain", "-c", str(REPO / "configs/pretrain/template.yaml"), *cli_data_args(cache),
               *TINY_MODEL_ARGS, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "1",
               "--trainer.limit_val_batches", "0", "--model.preview_every_n_epochs", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stderr + result.stdout).count(f"{damaged} has 1000 bytes") == 1  # one warning: rank 0's
    assert damaged.stat().st_size > 1000
