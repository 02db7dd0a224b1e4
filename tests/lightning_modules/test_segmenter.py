"""Tests of `SegmenterModule`: `msrl train-reward -c configs/rewards/segmenter.yaml` trains it on the cohort's masks,
ranks checkpoints by val/dice, and the reward loads it with its file and SHA-256; a batch without masks is refused."""

from pathlib import Path

import pytest
import torch

from datamodules.digest import sha256_of
from lightning_modules.critics import SegmenterModule, one_hot_masks
from msrl.cli import main
from tests.conftest import REPO, cli_data_args

CONFIG = str(REPO / "configs/rewards/segmenter.yaml")


def test_train_reward_trains_it_ranks_by_dice_and_it_loads_for_the_reward(cohort_cache: Path, tmp_path: Path) -> None:
    main(["train-reward", "-c", CONFIG, *cli_data_args(cohort_cache), "--model.init_args.channels", "[8,16]",
          "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    folder = tmp_path / "segmenter" / "version_0" / "checkpoints"
    best = [path for path in folder.glob("best-*.ckpt")]
    assert len(best) == 1 and (folder / "last.ckpt").is_file()
    checkpoint = torch.load(best[0], weights_only=True)
    monitors = [state for key, state in checkpoint["callbacks"].items() if key.startswith("ModelCheckpoint")
                and state.get("monitor") == "val/dice"]
    assert monitors and 0 <= float(monitors[0]["best_model_score"]) <= 1
    assert checkpoint["hyper_parameters"]["labels"] == [1, 2, 4]
    start = SegmenterModule(in_channels=1, spatial_size=16, channels=(8, 16))
    last = torch.load(folder / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(last[key], value) for key, value in start.state_dict().items())  # it trained
    network = SegmenterModule.load_for_reward(str(folder / "last.ckpt"), "MaskFidelityReward", "how")
    assert network.source_path == str(folder / "last.ckpt") and network.source_sha256 == sha256_of(folder / "last.ckpt")
    assert not any(p.requires_grad for p in network.parameters()) and not network.training
    probabilities = network.probabilities(torch.zeros(2, 1, 16, 16, 16))
    assert probabilities.shape == (2, 4, 16, 16, 16)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 16, 16, 16))


def test_masks_become_background_and_one_channel_per_label_and_a_batch_without_masks_is_refused() -> None:
    seg = torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)
    seg[0, 0, 0, 0, :] = torch.tensor([1, 2, 4, 0], dtype=torch.uint8)
    targets = one_hot_masks(seg)
    assert targets.shape == (1, 4, 4, 4, 4) and torch.equal(targets.sum(1), torch.ones(1, 4, 4, 4))
    assert targets[0, :, 0, 0, :].tolist() == [[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
    module = SegmenterModule(in_channels=1, spatial_size=16, channels=(8, 16))
    with pytest.raises(ValueError, match=r"trains on lesion masks \(the batch's 'seg' key\)"):
        module.training_step({"image": torch.zeros(2, 1, 16, 16, 16), "label": torch.zeros(2)}, 0)
    with pytest.raises(ValueError, match="spatial_size 18 must be a multiple of 4"):
        SegmenterModule(in_channels=1, spatial_size=18, channels=(8, 16))
