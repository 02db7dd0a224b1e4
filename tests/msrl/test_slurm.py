"""SLURM: the Trainer picks SLURMEnvironment from SLURM_* variables; `make pretrain` uses srun."""

import os
import subprocess
from pathlib import Path

import pytest
from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment

from datamodules import VolumeDataModule
from lightning_modules.diffusion.module import DiffusionModule
from msrl.commands.training import MsrlCLI
from tests.conftest import REPO

SLURM_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "msrl",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}


def _cluster_environment(tmp_path: Path) -> object:
    cli = MsrlCLI(DiffusionModule, VolumeDataModule, subclass_mode_data=True, run=False,
                  auto_configure_optimizers=False, args=["-c", str(REPO / "configs/pretrain/template.yaml"),
                        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    return cli.trainer._accelerator_connector.cluster_environment


def test_slurm_variables_select_slurm_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert isinstance(_cluster_environment(tmp_path), LightningEnvironment)
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    environment = _cluster_environment(tmp_path)
    assert isinstance(environment, SLURMEnvironment) and environment.job_id() == 1234


def test_make_pretrain_runs_srun_with_one_task_per_gpu(tmp_path: Path) -> None:
    """scripts/pretrain.sh (what `make pretrain` runs) inside an allocation, with a recording srun."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "srun-args"
    (fake_bin / "srun").write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    (fake_bin / "srun").chmod(0o755)
    env = {**os.environ, **SLURM_TASK, "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "PATH": f"{fake_bin}:{os.environ['PATH']}", "CONFIG": "configs/pretrain/template_gpu.yaml", "GPUS": ""}
    subprocess.run(["bash", "scripts/pretrain.sh", "--trainer.max_epochs", "3"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    args = record.read_text().split()
    assert args[:2] == ["--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    command = " ".join(args[2:])
    assert command.startswith("msrl pretrain -c configs/pretrain/template_gpu.yaml")
    for expected in ("--trainer.devices 4", "--trainer.num_nodes 2", "--trainer.max_epochs 3"):
        assert expected in command
    assert "--trainer.strategy" not in command  # the config's DDP strategy keeps its process-group timeout


def test_sbatch_template_asks_for_the_requeue_signal() -> None:
    sbatch = (REPO / "scripts/slurm/pretrain.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in sbatch and "make pretrain" in sbatch


def test_finetune_sbatch_starts_one_task_per_gpu_on_every_node(tmp_path: Path) -> None:
    """`sbatch --nodes 2 scripts/slurm/finetune.sbatch CKPT`: srun gets 4 tasks per node and the Trainer 2 nodes."""
    fake_bin, submit = tmp_path / "bin", tmp_path / "submit"
    fake_bin.mkdir()
    (submit / ".venv/bin").mkdir(parents=True)
    (submit / ".venv/bin/activate").write_text("")  # the job activates the repository's environment
    record = tmp_path / "srun-args"
    (fake_bin / "srun").write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    (fake_bin / "srun").chmod(0o755)
    env = {**os.environ, **SLURM_TASK, "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_SUBMIT_DIR": str(submit), "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO / "scripts/slurm/finetune.sbatch"), "pretrained.ckpt"], env=env, check=True,
                   capture_output=True)
    args = record.read_text().split()
    assert args[:2] == ["--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    command = " ".join(args[2:])
    assert command.startswith("msrl finetune -c configs/finetune/base.yaml -c configs/finetune/brats2019.yaml")
    for expected in ("--model.init_checkpoint pretrained.ckpt", "--trainer.devices 4", "--trainer.num_nodes 2"):
        assert expected in command


def test_sbatch_templates_say_how_to_run_on_several_nodes() -> None:
    for name in ("pretrain", "finetune"):
        text = (REPO / f"scripts/slurm/{name}.sbatch").read_text()
        assert f"sbatch --nodes N scripts/slurm/{name}.sbatch" in text and "#SBATCH --nodes=1" in text
