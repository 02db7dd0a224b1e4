"""Shared fixtures: a tiny template cohort (16³, built once per session) and tiny model settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MSRL = str(Path(sys.executable).with_name("msrl"))

# A 3D UNet small enough for 16³ on 2 cores (MONAI's own tests use channels=(8, 8, 8)).
TINY_MODEL_ARGS = [
    "--model.channels", "[8,8,8]", "--model.attention_levels", "[false,false,true]",
    "--model.norm_num_groups", "8", "--model.num_head_channels", "8", "--model.preview_steps", "4",
]
TINY_MODEL = dict(channels=(8, 8, 8), attention_levels=(False, False, True), norm_num_groups=8,
                  num_head_channels=8, num_res_blocks=1)


# `make test` runs the suite in two pytest-xdist workers (one per core): each uses one thread then.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Two cores: keep torch from oversubscribing when tests spawn processes or run in two workers."""
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def cohort_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the 8-subject, 16³ template cohort (seed 0), built once."""
    from datamodules import TemplateCohortDataModule

    cache = tmp_path_factory.mktemp("cache")
    TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, seed=0).prepare_data()
    return cache


def cli_data_args(cache: Path) -> list[str]:
    """Command-line options that point `msrl pretrain` at the session's tiny cohort."""
    return [
        "--data.init_args.num_subjects", "8", "--data.init_args.spatial_size", "16",
        "--data.init_args.cache_dir", str(cache), "--data.init_args.batch_size", "2",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.0",
    ]


def subprocess_env() -> dict[str, str]:
    """Environment for a child process: the repo importable, few threads."""
    env = dict(os.environ)
    # a child starts its own distributed world: nothing of one an earlier in-process run set up leaks in
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def pretrained_checkpoint(cohort_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional 16³ DiffusionModule after a few training steps, as a checkpoint."""
    import lightning as L

    from datamodules import TemplateCohortDataModule
    from lightning_modules.diffusion.module import DiffusionModule

    torch.manual_seed(0)
    model = DiffusionModule(in_channels=1, spatial_size=16, num_classes=2, preview_every_n_epochs=0, lr=1e-3,
                            **TINY_MODEL)
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, batch_size=2)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, data)
    path = tmp_path_factory.mktemp("pretrained") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


# A VQ-GAN small enough for 16³ (4× down to 4³, 4 latent channels).
TINY_AUTOENCODER = dict(spatial_size=16, channels=(8, 8), num_res_channels=(8, 8), num_embeddings=32, embedding_dim=4)


def tiny_training(**settings: object) -> object:
    """`FirstStageTraining` of the tiny first stages (8-channel, 2-layer discriminators), with `settings` changed."""
    from lightning_modules import FirstStageTraining

    return FirstStageTraining(**{"discriminator_channels": 8, "discriminator_layers": 2, "adversarial_start_step": 1000,
                                 **settings})


@pytest.fixture(scope="session")
def autoencoder_checkpoint(cohort_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 16³ VQ-GAN after 3 epochs (reconstruction only), saved with its latent scale."""
    import lightning as L

    from datamodules import TemplateCohortDataModule
    from lightning_modules.first_stage.vqgan import AutoencoderModule

    torch.manual_seed(0)
    model = AutoencoderModule(training=tiny_training(lr=3e-3), **TINY_AUTOENCODER)
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, batch_size=2)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, data)
    path = tmp_path_factory.mktemp("autoencoder") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def latent_checkpoint(autoencoder_checkpoint: Path, cohort_cache: Path, tmp_path_factory: pytest.TempPathFactory
                      ) -> Path:
    """A tiny class-conditional latent DiffusionModule (on the tiny VQ-GAN's 4×4³ latents) after a few steps."""
    import lightning as L

    from datamodules import TemplateCohortDataModule
    from lightning_modules.diffusion.module import DiffusionModule

    torch.manual_seed(0)
    # two levels on the 4³ latent (a third would leave 1³, where GroupNorm has one value per channel)
    model = DiffusionModule(in_channels=1, spatial_size=16, num_classes=2, preview_every_n_epochs=0, lr=1e-3,
                            autoencoder_checkpoint=str(autoencoder_checkpoint),
                            **{**TINY_MODEL, "channels": (8, 8), "attention_levels": (False, True)})
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, batch_size=2)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, data)
    path = tmp_path_factory.mktemp("latent") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path
