"""`msrl export` of a model fine-tuned under a ControlNet (`msrl_masks`): the bundle carries the fine-tuned UNet (LoRA
merged) and the recorded ControlNet, takes a mask, draws what `msrl sample --mask` draws, and its card names the
ControlNet and the reward; a missing or changed ControlNet file is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.digest import sha256_of
from lightning_modules import DiffusionModule
from lightning_modules.finetune.masks import MASKS_KEY
from msrl.cli import main
from tests.msrl.test_export import TOLERANCE, _run, pretrained_kl_checkpoint, python_without_msrl  # noqa: F401
from tests.msrl.test_mask_finetuned import finetuned_under_controlnet, save_module
from tests.msrl.test_sample_mask import AFFINE, lesion_mask, save_mask
from tests.rewards.test_mask_reward import segmenter_checkpoint  # noqa: F401  (a fixture)

SAMPLER = ["--steps", "3", "--guidance-scale", "2.0", "--batch-size", "2", "--num-samples", "2"]


@pytest.fixture(scope="module")
def checkpoints(pretrained_kl_checkpoint: Path, cohort_cache: Path, segmenter_checkpoint: Path,  # noqa: F811
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A perturbed ControlNet of the random KL latent model, and a LoRA PPO checkpoint fine-tuned under it whose
    adapters (B, zero at the start) are perturbed: its merged UNet is not the base's."""
    folder = tmp_path_factory.mktemp("mask_finetuned_export")
    controlnet, module = finetuned_under_controlnet(pretrained_kl_checkpoint, cohort_cache, segmenter_checkpoint,
                                                    folder, lora_rank=2, lora_b=0.2)
    module.mask_record["mask_data"] = {"class_path": "datamodules.TemplateCohortDataModule",
                                       "init_args": {"num_subjects": 8, "spatial_size": 16}}
    return controlnet, save_module(module, folder / "finetuned.ckpt")


def _masks(folder: Path) -> Path:
    folder.mkdir()
    save_mask(lesion_mask(3), folder / "case.nii.gz")
    save_mask(np.zeros((16, 16, 16), np.uint8), folder / "empty.nii.gz")
    return folder


def _volumes(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj)
            for name in ("case_sample_0", "case_sample_1", "empty_sample_0", "empty_sample_1")}


def test_the_bundle_carries_the_finetuned_unet_and_its_controlnet_and_the_card_names_them(
        pretrained_kl_checkpoint: Path, checkpoints: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    controlnet, finetuned = checkpoints
    bundle = tmp_path / "bundle"
    main(["export", "--checkpoint", str(finetuned), "--out", str(bundle), *SAMPLER])
    config = json.loads((bundle / "configs/inference.json").read_text())
    assert config["controlnet_def"]["_target_"] == "monai.networks.nets.ControlNet" and "classes" not in config
    assert config["sampler"]["_target_"] == "scripts.sampler.MaskSampler" and config["mask"] is None
    assert config["mask_rules"]["labels"] == [1, 2, 4] and config["label"] == "auto"
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["autoencoder.pt", "controlnet.pt",
                                                                      "diffusion_unet.pt", "noise_schedule.pt"]
    exported = torch.load(bundle / "models/diffusion_unet.pt", weights_only=True)
    merged = DiffusionModule.from_msrl_checkpoint(finetuned).ema.module.state_dict()  # what msrl sample draws with
    base = DiffusionModule.from_msrl_checkpoint(pretrained_kl_checkpoint).ema.module.state_dict()
    assert exported.keys() == merged.keys() == base.keys()  # plain MONAI UNet names, no adapters
    assert all(torch.equal(exported[key], merged[key]) for key in exported)
    assert sum(not torch.equal(exported[key], base[key]) for key in exported) >= 10  # the fine-tuned UNet
    carried = torch.load(bundle / "models/controlnet.pt", weights_only=True)
    trained = torch.load(controlnet, weights_only=True)["state_dict"]
    assert all(torch.equal(value, trained[f"ema.module.{key}"]) for key, value in carried.items())

    card = (bundle / "docs/README.md").read_text()
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert "PPO fine-tuned under a ControlNet (mask-conditioned)" in card.splitlines()[0]
    assert f"frozen ControlNet `{controlnet}` (sha256 `{sha256_of(controlnet)}`)" in card
    assert f"trained on `{pretrained_kl_checkpoint}`" in card and "--mask seg.nii.gz" in card
    assert "- reward: `rewards.MultiScaleReward`, components (weight):" in card
    assert "(`rewards.InterSliceContinuityReward`)" in card and "(`rewards.MaskFidelityReward`)" in card
    record = torch.load(finetuned, weights_only=True)[MASKS_KEY]
    assert f"TemplateCohortDataModule` ({record['pool_size']} masks, sha256 `{record['pool_sha256']}`)" in card
    assert "- LoRA: rank 2" in card and "LoRA adapters merged" in meta["msrl"]["exported_weights"]
    assert meta["msrl"]["mask_finetuning"]["controlnet_sha256"] == sha256_of(controlnet)
    assert meta["network_data_format"]["inputs"]["mask"]["channel_def"]["4"] == "enhancing tumour"
    assert meta["task"].startswith("lesion-mask-conditioned")
    for digest in meta["weights_sha256"].values():
        assert digest in card


def test_a_missing_or_changed_controlnet_or_default_classes_are_refused(checkpoints: tuple[Path, Path],
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    controlnet, finetuned = checkpoints
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(finetuned), "--out", str(tmp_path / "bundle"), "--classes", "[1]"])
    assert "a ControlNet bundle draws per mask" in capsys.readouterr().err
    copy = tmp_path / "copy.ckpt"
    shutil.copy(controlnet, copy)
    moved = torch.load(finetuned, weights_only=True)
    moved[MASKS_KEY]["controlnet_checkpoint"] = str(copy)
    torch.save(moved, tmp_path / "finetuned.ckpt")
    with copy.open("ab") as handle:
        handle.write(b"changed")
    changed, recorded = sha256_of(copy), sha256_of(controlnet)
    for message in (f"ControlNet checkpoint {copy} is not the one fine-tuned checkpoint {tmp_path / 'finetuned.ckpt'} "
                    f"records: its sha256 is {changed[:16]}…, recorded {recorded[:16]}…",
                    f"ControlNet checkpoint {copy} does not exist (fine-tuned checkpoint"):
        with pytest.raises(SystemExit):
            main(["export", "--checkpoint", str(tmp_path / "finetuned.ckpt"), "--out", str(tmp_path / "bundle")])
        assert message in capsys.readouterr().err
        copy.unlink(missing_ok=True)
    assert not (tmp_path / "bundle").exists()  # nothing half-written


@pytest.mark.slow  # runs the bundle in a Python without msrl (~15 s): make test-full
def test_the_bundle_draws_what_msrl_sample_draws_from_the_finetuned_checkpoint(
        checkpoints: tuple[Path, Path], python_without_msrl: Path, tmp_path: Path) -> None:  # noqa: F811
    controlnet, finetuned = checkpoints
    bundle = tmp_path / "bundle"
    main(["export", "--checkpoint", str(finetuned), "--out", str(bundle), *SAMPLER])
    masks = _masks(tmp_path / "masks")
    result = _run(python_without_msrl, ["-m", "monai.bundle", "run", "--config_file",
                                        str(bundle / "configs/inference.json"), "--mask", str(masks), "--seed", "5"],
                  tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, source in (("reference", finetuned), ("controlnet", controlnet)):
        main(["sample", "--checkpoint", str(source), "--mask", str(_masks(tmp_path / name)), *SAMPLER, "--seed", "5"])
    exported, reference, plain = (_volumes(tmp_path / name) for name in ("masks", "reference", "controlnet"))
    for name, volume in exported.items():
        assert volume.shape == (16, 16, 16)
        assert np.array_equal(nib.load(masks / f"{name}.nii.gz").affine, AFFINE)
        difference = float(np.abs(volume - reference[name]).max())
        assert difference <= TOLERANCE, f"{name}: bundle vs msrl sample, max |difference| {difference:.3g}"
        # the fine-tuned UNet draws its own volumes: the comparison above could fail
        assert float(np.abs(volume - plain[name]).max()) > 1000 * TOLERANCE, name
    refused = tmp_path / "refused"
    refused.mkdir()
    odd = save_mask(np.full((16, 16, 16), 3, np.uint8), refused / "odd.nii.gz")
    result = _run(python_without_msrl, ["-m", "monai.bundle", "run", "--config_file",
                                        str(bundle / "configs/inference.json"), "--mask", str(odd)], tmp_path)
    assert result.returncode != 0 and f"{odd}: holds labels [3]" in result.stderr
    assert sorted(p.name for p in refused.iterdir()) == ["odd.nii.gz"]  # nothing written
