"""Checkpoints written before the layers move still load and compute what they computed then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules import (
    AutoencoderModule,
    ClassifierModule,
    DiffusionModule,
    FirstStageModule,
    KLAutoencoderModule,
    RealismCriticModule,
)
from lightning_modules.checkpoint_io import MOVED_CLASSES, resolve_class

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy"


# The outputs were recorded on another machine: CPU kernels (vector width, oneDNN's choices) change the last
# bits, seen up to 4.6e-6 on the KL decoder's output in [-1, 1]. Loading a wrong or missing weight changes them
# by orders of magnitude more, so a tolerance of 1e-5 still tells the checkpoints load as they did.
SAME = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(LEGACY / "expected.pt", weights_only=True)


@pytest.mark.parametrize(("name", "model_class"), [("vqgan", AutoencoderModule), ("kl", KLAutoencoderModule)])
def test_first_stages_of_before_the_move_load(name: str, model_class: type, expected: dict[str, torch.Tensor]) -> None:
    checkpoint = torch.load(LEGACY / f"{name}.ckpt", weights_only=True)
    assert checkpoint["msrl_autoencoder"]["class_path"] in MOVED_CLASSES  # an old dotted name
    model = FirstStageModule.from_msrl_checkpoint(LEGACY / f"{name}.ckpt")
    assert type(model) is model_class
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(expected["input"]), expected[name], **SAME)


def test_diffusion_model_of_before_the_move_samples_the_same(expected: dict[str, torch.Tensor]) -> None:
    model = DiffusionModule.from_msrl_checkpoint(LEGACY / "diffusion.ckpt")
    torch.testing.assert_close(model.generate(1, num_steps=3, seed=0), expected["diffusion"], **SAME)


def test_reward_networks_of_before_the_move_load(expected: dict[str, torch.Tensor]) -> None:
    critics = RealismCriticModule.load_for_reward(str(LEGACY / "critics.ckpt"), "test", "test")
    classifier = ClassifierModule.load_for_reward(str(LEGACY / "classifier.ckpt"), "test", "test")
    with torch.no_grad():
        torch.testing.assert_close(critics.volume_logits(expected["input"]), expected["critics"], **SAME)
        torch.testing.assert_close(classifier(expected["input"]), expected["classifier"], **SAME)


def test_every_alias_names_an_exported_class() -> None:
    """Each old name resolves to the class now exported under its new public name."""
    import importlib

    for old, new in MOVED_CLASSES.items():
        module, _, name = new.rpartition(".")
        assert getattr(importlib.import_module(module), name).__name__ == old.rpartition(".")[2]
    assert resolve_class("lightning_modules.autoencoder.AutoencoderModule", FirstStageModule, "x") is AutoencoderModule
    with pytest.raises(ValueError, match="not a FirstStageModule"):
        resolve_class("lightning_modules.diffusion.DiffusionModule", FirstStageModule, "x.ckpt")


def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`msrl sample` (and every reader, through load_weights) says what the file is, not "a pickle with objects"."""
    import nibabel as nib
    import numpy as np

    from msrl.cli import main

    volume = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4))
    files = {"notes.ckpt": "a text file", "empty.ckpt": "an empty file", "volume.nii.gz": "gzip-compressed",
             "volume.nii": "a NIfTI image"}
    (tmp_path / "notes.ckpt").write_text("epoch: 3\nloss: 0.1\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    nib.save(volume, tmp_path / "volume.nii.gz")
    nib.save(volume, tmp_path / "volume.nii")
    for name, what in files.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "out")])
        error = capsys.readouterr().err
        assert exit_info.value.code == 1 and f"{tmp_path / name} is not a checkpoint: it is {what}" in error, error
        assert "pickle" not in error and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is not a checkpoint: it is a text file"):
        RealismCriticModule.load_for_reward(str(tmp_path / "notes.ckpt"), "SliceCriticReward", "msrl train-reward")


def test_checkpoints_record_the_installed_msrl_version() -> None:
    from importlib import metadata

    from lightning_modules.checkpoint_io import VERSION_KEY, save_random_states

    checkpoint: dict = {}
    save_random_states(checkpoint)
    assert checkpoint[VERSION_KEY] == metadata.version("msrl") != "unknown"
