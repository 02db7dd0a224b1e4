"""PPO across 2 CPU processes: under Lightning's DDP launcher and under `fabric run` (torchrun)."""

import subprocess
import sys
from pathlib import Path

import torch

from lightning_modules.ppo.advantages import ClassAdvantageNormaliser
from tests.conftest import REPO, subprocess_env


def test_ddp_advantages_equal_single_process_and_ranks_agree(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    script = REPO / "tests/scripts/ppo_ddp_run.py"
    result = subprocess.run([sys.executable, str(script), str(pretrained_checkpoint), str(tmp_path)], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 2
    for first, second in zip(ranks[0]["records"], ranks[1]["records"], strict=True):
        assert not torch.equal(first["rewards"], second["rewards"])  # the ranks sampled different volumes
        for record in (first, second):  # every rank, every iteration: 2 of each class
            assert torch.bincount(record["labels"], minlength=2).tolist() == [2, 2]
        rewards = torch.cat([first["rewards"], second["rewards"]])
        labels = torch.cat([first["labels"], second["labels"]])
        expected = ClassAdvantageNormaliser(2)(rewards, labels)  # one process, the same total batch
        torch.testing.assert_close(torch.cat([first["advantages"], second["advantages"]]), expected)
        own = ClassAdvantageNormaliser(2)(first["rewards"], first["labels"])  # rank 0's statistics alone
        assert not torch.allclose(first["advantages"], own)  # so the statistics were the gathered ones
    for key, value in ranks[0]["reward_statistics"].items():  # the composite normalised alike on both ranks
        assert torch.equal(ranks[1]["reward_statistics"][key], value), key
    assert int(ranks[0]["reward_statistics"]["count"][0]) == 2
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][key], value), key  # gradients were all-reduced


def test_fabric_run_starts_a_two_process_finetune(pretrained_checkpoint: Path, tmp_path: Path) -> None:
    fabric = str(Path(sys.executable).with_name("fabric"))
    command = [fabric, "run", "--accelerator", "cpu", "--devices", "2", str(REPO / "scripts/finetune.py"),
               "-c", str(REPO / "configs/finetune/template.yaml"),
               "--model.init_checkpoint", str(pretrained_checkpoint),
               "--model.reward", "tests.lightning_modules.test_ppo.BrightnessReward", "--model.num_steps", "5",
               "--model.iterations_per_epoch", "2", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar",
               "false", "--trainer.callbacks", "[]",  # the config's held-out FID guard reads 32³ data
               "--trainer.logger.init_args.save_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MEMBER: 2/2" in output  # both torchrun processes joined one world, none spawned more
    checkpoint = torch.load(tmp_path / "finetune/version_0/checkpoints/last.ckpt", weights_only=True)
    assert int(checkpoint["state_dict"]["iteration"]) == 2
