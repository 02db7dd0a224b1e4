"""SLURM preemption: SIGUSR1 saves a checkpoint and requeues; the requeued job resumes by itself."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

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
    (tmp_path / "whole").mkdir()  # the same job, never preempted: the same weights, bit for bit
    whole = subprocess.run(command, cwd=tmp_path / "whole", env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = torch.load(tmp_path / "runs/pretrain/version_2/checkpoints/last.ckpt", weights_only=True)
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=0, msg=key)


class SignalInsideStep(Callback):
    """SIGUSR1 from inside the optimiser step of training batch `at` (after backward, before the update),
    where Python runs a signal handler; the run then stops at the next batch once Lightning has written
    its hpc checkpoint, as SLURM stops a requeued job."""

    def __init__(self, at: int) -> None:
        self.at, self.sent = at, False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.sent and trainer.fit_loop.epoch_loop.batch_progress.total.completed == self.at - 1:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")):
            raise Preempted


class Preempted(Exception):
    """The job stopped by SLURM after its requeue."""


def _slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process looks like a SLURM job step with a fake `scontrol`; returns the requeue record."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "requeued"}\n')
    (fake_bin / "scontrol").chmod(0o755)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    return tmp_path / "requeued"


def test_a_signal_inside_an_optimiser_step_is_served_after_it(pretrained_checkpoint: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PPO killed by a preemption in iteration 5 of 6 (mid-epoch) continues to the same weights and curve."""
    from tests.lightning_modules.test_ppo import _finetune, _scalars

    reward = json.dumps({"class_path": "rewards.MultiScaleReward", "init_args": {"components": [
        {"class_path": "tests.lightning_modules.test_ppo.BrightnessReward"},
        {"class_path": "rewards.InterSliceContinuityReward"}]}})
    # running reward and advantage statistics: state that must survive the preemption too
    short = ["--model.iterations_per_epoch", "3", "--trainer.max_epochs", "2", "--model.reward", reward,
             "--model.advantage_mode", "running"]
    whole = _finetune(pretrained_checkpoint, tmp_path / "whole", *short)
    requeued = _slurm_job(tmp_path, monkeypatch)
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")  # Lightning writes hpc_ckpt_<n>.ckpt into the working directory
    signal_at = json.dumps([{"class_path": "tests.lightning_modules.test_preemption.SignalInsideStep",
                             "init_args": {"at": 5}}])
    with pytest.raises(Preempted):
        _finetune(pretrained_checkpoint, tmp_path / "job/runs", *short, "--trainer.callbacks", signal_at)
    assert requeued.read_text().split() == ["requeue", "4242"]
    saved = torch.load(tmp_path / "job/hpc_ckpt_1.ckpt", weights_only=True)
    assert int(saved["state_dict"]["iteration"]) == 5  # the whole iteration in which the signal came
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert int(saved["state_dict"]["reward.running.count"].min()) == 5  # iterations 1-5 in the statistics
    assert int(saved["state_dict"]["advantages.running.count"].min()) == 5  # per class
    _finetune(pretrained_checkpoint, tmp_path / "job/runs", *short)  # the requeued job: no --ckpt_path
    first, second = tmp_path / "job/runs/finetune/version_0", tmp_path / "job/runs/finetune/version_1"
    assert _scalars(first, "ppo/reward/mean") + _scalars(second, "ppo/reward/mean") == _scalars(
        whole, "ppo/reward/mean")
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(second / "checkpoints/last.ckpt", weights_only=True)
    assert int(b["state_dict"]["iteration"]) == 6
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
