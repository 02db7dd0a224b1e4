"""SLURM preemption: SIGUSR1 saves a checkpoint and requeues; the requeued job resumes by itself."""

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from tests.conftest import MSRL, REPO, TINY_MODEL_ARGS, cli_data_args, subprocess_env

SLURM = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "msrl",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}


def _wait_for(path: Path, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if process.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{path} did not appear (process exit code {process.poll()})")
        time.sleep(0.2)


def test_sigusr1_saves_requeues_and_the_requeued_job_resumes(cohort_cache: Path, tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    requeued = tmp_path / "requeued"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {requeued}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {**subprocess_env(), **SLURM, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    command = [MSRL, "pretrain", "-c", str(REPO / "configs/pretrain/template.yaml"),
               "--trainer", str(REPO / "configs/trainer/slurm_ddp.yaml"), "--trainer.accelerator", "cpu",
               "--trainer.devices", "1", "--trainer.precision", "32-true", "--trainer.strategy", "auto",
               "--trainer.max_epochs", "40", "--trainer.check_val_every_n_epoch", "40",
               "--model.preview_every_n_epochs", "0", *cli_data_args(cohort_cache), *TINY_MODEL_ARGS,
               "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        _wait_for(tmp_path / "runs/pretrain/version_0/hparams.yaml", 120, first)
        time.sleep(3)  # some steps into the run
        first.send_signal(signal.SIGUSR1)  # what sbatch --signal=SIGUSR1@90 sends
        _wait_for(tmp_path / "hpc_ckpt_1.ckpt", 60, first)
        _wait_for(requeued, 30, first)
    finally:
        first.kill()  # SLURM stops the job once it is requeued
        first.communicate()
    assert requeued.read_text().split() == ["requeue", "4242"]
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < 40 * 3
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in again.stdout + again.stderr  # restored without --ckpt_path
    final = torch.load(tmp_path / "runs/pretrain/version_1/checkpoints/last.ckpt", weights_only=True)
    assert final["global_step"] == 40 * 3 and final["epoch"] == 39
