"""Same seed, same command, same result: a run never depends on whether a cache already existed.

Each training verb that can build a cache (preprocessed volumes, generated "not real" volumes, the
held-out reference of the PPO guard) runs twice with one cache folder: cold, then warm. The final
weights must be equal bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from msrl.cli import main
from tests.conftest import REPO, TINY_MODEL_ARGS, cli_data_args
from tests.datamodules.test_brats import CASES
from tests.fake_releases import make_brats
from tests.lightning_modules.test_first_stage import TINY_ARGS as TINY_AUTOENCODER_ARGS
from tests.lightning_modules.test_ppo import _finetune

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(next(run.rglob("last.ckpt")), weights_only=True)["state_dict"]


def _cold_then_warm(tmp_path: Path, run: Callable[[Path, Path], None],
                    between: Callable[[Path], None] | None = None) -> None:
    """`run(cache, runs)` twice on one cache folder (`between(cache)` in between); identical final weights."""
    cache = tmp_path / "cache"
    run(cache, tmp_path / "cold")
    assert any(cache.rglob("*.pt")), "the first run built no cache"
    if between is not None:
        between(cache)
    run(cache, tmp_path / "warm")
    cold, warm = _weights(tmp_path / "cold"), _weights(tmp_path / "warm")
    assert cold.keys() == warm.keys()
    for key, value in cold.items():
        torch.testing.assert_close(warm[key], value, rtol=0, atol=0, msg=key)


def test_pretrain_on_the_embedded_cohort(tmp_path: Path) -> None:
    _cold_then_warm(tmp_path, lambda cache, runs: main([
        "pretrain", "-c", str(REPO / "configs/pretrain/template.yaml"), *cli_data_args(cache), *TINY_MODEL_ARGS,
        "--seed_everything", "11", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
        "--model.preview_every_n_epochs", "0", *QUIET, "--trainer.logger.init_args.save_dir", str(runs)]))


def test_pretrain_on_a_damaged_cache(tmp_path: Path) -> None:
    """Cache files truncated (a copy cut short) and deleted after the first run: the second mends them first."""
    def damage(cache: Path) -> None:
        files = sorted(cache.rglob("template_*.pt"))
        files[0].write_bytes(files[0].read_bytes()[:1000])
        files[3].unlink()

    _cold_then_warm(tmp_path, lambda cache, runs: main([
        "pretrain", "-c", str(REPO / "configs/pretrain/template.yaml"), *cli_data_args(cache), *TINY_MODEL_ARGS,
        "--seed_everything", "11", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
        "--model.preview_every_n_epochs", "0", *QUIET, "--trainer.logger.init_args.save_dir", str(runs)]), damage)


def test_pretrain_on_a_fake_brats_tree(tmp_path: Path) -> None:
    root = make_brats(tmp_path / "data", CASES)
    _cold_then_warm(tmp_path, lambda cache, runs: main([
        "pretrain", "-c", str(REPO / "configs/pretrain/base.yaml"), "-c", str(REPO / "configs/pretrain/brats2019.yaml"),
        "--trainer", str(REPO / "configs/trainer/cpu.yaml"), *TINY_MODEL_ARGS, "--model.autoencoder_checkpoint", "null",
        "--model.activation_checkpointing", "false", "--model.preview_every_n_epochs", "0",
        "--data.init_args.root", str(root), "--data.init_args.expected_shape", "null",
        "--data.init_args.spatial_size", "16", "--data.init_args.num_workers", "0", "--data.init_args.cache_dir",
        str(cache), "--data.init_args.val_fraction", "0.2", "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "0", *QUIET, "--trainer.logger.init_args.save_dir", str(runs)]))


def test_train_autoencoder(tmp_path: Path) -> None:
    _cold_then_warm(tmp_path, lambda cache, runs: main([
        "train-autoencoder", "-c", str(REPO / "configs/autoencoder/template.yaml"), *cli_data_args(cache),
        *TINY_AUTOENCODER_ARGS, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "0", *QUIET, "--trainer.logger.init_args.save_dir", str(runs)]))


@pytest.mark.parametrize("reward", ["classifier", "critics"])
def test_train_reward(reward: str, tmp_path: Path, pretrained_checkpoint: Path) -> None:
    """The critics' cache holds the generated volumes too (their generator is built only when it is cold)."""
    prefix = "--data.init_args.data.init_args." if reward == "critics" else "--data.init_args."
    data = [arg.replace("--data.init_args.", prefix) for arg in cli_data_args(tmp_path / "cache")]
    generator = (["--data.init_args.generator_checkpoint", str(pretrained_checkpoint), "--data.init_args.num_generated",
                  "4", "--data.init_args.generation_steps", "2", "--data.init_args.batch_size", "4"]
                 if reward == "critics" else [])
    _cold_then_warm(tmp_path, lambda cache, runs: main([
        "train-reward", "-c", str(REPO / f"configs/rewards/{reward}.yaml"), *data, *generator,
        "--model.init_args.channels", "[8,8]", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        *QUIET, "--trainer.logger.init_args.save_dir", str(runs)]))


# ~13 s, in make test since issue 34. PPO draws from its own (seed, iteration, rank) generators;
# this checks the guard's cache
def test_finetune_with_the_heldout_guard(tmp_path: Path, pretrained_checkpoint: Path) -> None:
    """The guard builds its held-out reference's cache inside the PPO run."""
    def run(cache: Path, runs: Path) -> None:
        guard = ('[{"class_path": "msrl.evaluation.HeldoutFIDGuard", "init_args": {'
                 '"data": {"class_path": "datamodules.TemplateCohortDataModule", "init_args": {"num_subjects": 8, '
                 f'"spatial_size": 16, "cache_dir": "{cache}", "val_fraction": 0.25}}}}, '
                 '"extractor": {"class_path": "msrl.evaluation.MedicalNetExtractor"}, "every_n_iterations": 2, '
                 '"num_samples": 2, "num_steps": 2}}]')
        _finetune(pretrained_checkpoint, runs, "--trainer.max_epochs", "1", "--model.iterations_per_epoch", "2",
                  "--model.num_steps", "4", "--trainer.callbacks", guard)

    _cold_then_warm(tmp_path, run)
