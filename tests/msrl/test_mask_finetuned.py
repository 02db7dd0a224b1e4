"""A model fine-tuned under a ControlNet (`msrl_masks`), drawn from masks with that ControlNet's residuals on its own
UNet: `ControlNetModule.generate(model=...)`, `msrl sample --mask`, `msrl evaluate` beside its ControlNet and base (mask
fidelity paired, the mask reward scored against the masks), and a missing or changed ControlNet file refused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules import TemplateCohortDataModule
from lightning_modules import ControlNetModule, DiffusionModule
from lightning_modules.finetune.masks import MASKS_KEY
from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.cli import main
from msrl.evaluation.mask_fidelity import MASK_FIDELITY_METRIC
from msrl.evaluation.reward_scores import reward_scores
from msrl.samples import read_samples
from rewards import InterSliceContinuityReward, MaskFidelityReward, MultiScaleReward
from tests.msrl.test_evaluate_masks import _controlnet, _evaluate
from tests.msrl.test_export import pretrained_kl_checkpoint  # noqa: F401  (a fixture: random weights, KL latents)
from tests.msrl.test_sample_mask import lesion_mask, save_mask
from tests.rewards.test_mask_reward import segmenter_checkpoint  # noqa: F401  (a fixture)

SAMPLER = ["--steps", "3", "--guidance-scale", "2.0"]


def _reward_config(segmenter: Path) -> dict:
    """The fine-tuned run's reward as `msrl finetune` records it: slice continuity and the mask reward, unnormalised."""
    return {"class_path": "rewards.MultiScaleReward", "init_args": {"normalise": False, "components": [
        {"class_path": "rewards.InterSliceContinuityReward"},
        {"class_path": "rewards.MaskFidelityReward", "init_args": {"checkpoint": str(segmenter)}}]}}


def finetuned_under_controlnet(pretrained: Path, cohort_cache: Path, segmenter: Path, folder: Path,
                               lora_rank: int | None = None, lora_b: float = 0.0) -> tuple[Path, PPOFinetuneModule]:
    """A perturbed ControlNet of the KL latent model, and a PPO checkpoint fine-tuned under it with zero steps.

    Args:
        lora_rank: LoRA rank of the fine-tuned UNet (None: the module's default).
        lora_b: > 0 adds noise of this scale to the LoRA B matrices (zero at the start), so the merged UNet is
            not the base's.
    """
    controlnet = _controlnet(pretrained, folder / "controlnet.ckpt", 0.5)
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, val_fraction=0.25,
                                    test_fraction=0.25)
    reward = MultiScaleReward([InterSliceContinuityReward(), MaskFidelityReward(str(segmenter))], normalise=False)
    rank = {} if lora_rank is None else {"lora_rank": lora_rank}
    module = PPOFinetuneModule(str(pretrained), reward, controlnet_checkpoint=str(controlnet), mask_data=data,
                               num_steps=3, samples_per_iteration=2, iterations_per_epoch=1, **rank)
    if lora_b:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, value in module.state_dict(keep_vars=True).items():
                if ".lora_B" in name:
                    value.add_(lora_b * torch.randn(value.shape, generator=generator))
    module.reward_config = _reward_config(segmenter)  # what `msrl finetune` records from its config
    return controlnet, module


def save_module(module: PPOFinetuneModule, path: Path) -> Path:
    """`module` saved as a Lightning checkpoint (no training step), as `msrl finetune` would have written it."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(pretrained_kl_checkpoint: Path, cohort_cache: Path, segmenter_checkpoint: Path,  # noqa: F811
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A perturbed ControlNet of the KL latent model, and a zero-update PPO checkpoint fine-tuned under it.

    The KL model's random weights make every volume depend on its noise, mask and weights (a trained tiny VQ
    model's collapsed decoder would hide them)."""
    folder = tmp_path_factory.mktemp("mask_finetuned")
    controlnet, module = finetuned_under_controlnet(pretrained_kl_checkpoint, cohort_cache, segmenter_checkpoint,
                                                    folder)
    return controlnet, save_module(module, folder / "finetuned.ckpt")


def _masks(folder: Path) -> Path:
    folder.mkdir()
    save_mask(lesion_mask(0), folder / "a.nii.gz")
    save_mask(np.zeros((16, 16, 16), np.uint8), folder / "b.nii.gz")
    return folder


def _drawn(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(nib.load(folder / f"{stem}_sample_0.nii.gz").dataobj) for stem in ("a", "b")])


def test_a_zero_update_finetuned_checkpoint_draws_what_its_controlnet_draws_and_a_changed_one_its_own(
        checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    controlnet, finetuned = checkpoints
    assert torch.load(finetuned, weights_only=True)[MASKS_KEY]["controlnet_checkpoint"] == str(controlnet)
    for name, checkpoint in (("controlnet", controlnet), ("finetuned", finetuned)):
        main(["sample", "--checkpoint", str(checkpoint), "--mask", str(_masks(tmp_path / name)), *SAMPLER])
    np.testing.assert_array_equal(_drawn(tmp_path / "finetuned"), _drawn(tmp_path / "controlnet"))
    # a fine-tuned model that moved: its own UNet predicts, with the ControlNet's residuals added
    moved = torch.load(finetuned, weights_only=True)
    weight = moved["state_dict"]["policy.ema.module.out.2.conv.weight"]
    weight += 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    torch.save(moved, tmp_path / "moved.ckpt")
    main(["sample", "--checkpoint", str(tmp_path / "moved.ckpt"), "--mask", str(_masks(tmp_path / "moved")), *SAMPLER])
    drawn = torch.from_numpy(_drawn(tmp_path / "moved"))[:, None]
    assert not torch.allclose(drawn, torch.from_numpy(_drawn(tmp_path / "controlnet"))[:, None], atol=1e-3)
    model = DiffusionModule.from_msrl_checkpoint(tmp_path / "moved.ckpt").eval()
    net = ControlNetModule.from_msrl_checkpoint(controlnet).eval()
    seg = torch.from_numpy(np.stack([lesion_mask(0), np.zeros((16, 16, 16), np.uint8)]))[:, None]
    labels = torch.tensor([1, 0])  # each mask's own: 1 with a lesion
    expected = net.generate(seg, labels, num_steps=3, guidance_scale=2.0, seed=0, model=model)
    torch.testing.assert_close(drawn, expected, rtol=0, atol=1e-6)
    plain = model.generate(2, labels, num_steps=3, guidance_scale=2.0, seed=0)  # the same noise without residuals
    assert not torch.allclose(drawn, plain, atol=1e-3)
    other = DiffusionModule(in_channels=1, spatial_size=16, num_classes=2, channels=(8, 16), attention_levels=(False,
                            False), num_res_blocks=1, num_head_channels=8, norm_num_groups=8)
    with pytest.raises(ValueError, match="that base's architecture only"):
        net.generate(seg, labels, num_steps=1, model=other)


def test_a_missing_or_changed_controlnet_file_is_refused_by_name(checkpoints: tuple[Path, Path], cohort_cache: Path,
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    controlnet, finetuned = checkpoints
    copy = tmp_path / "copy.ckpt"
    shutil.copy(controlnet, copy)
    moved = torch.load(finetuned, weights_only=True)
    moved[MASKS_KEY]["controlnet_checkpoint"] = str(copy)
    torch.save(moved, tmp_path / "finetuned.ckpt")
    masks = _masks(tmp_path / "masks")
    with copy.open("ab") as handle:
        handle.write(b"changed")
    for message in (f"ControlNet checkpoint {copy} is not the one fine-tuned checkpoint",
                    f"ControlNet checkpoint {copy} does not exist (fine-tuned checkpoint"):
        with pytest.raises(SystemExit):
            main(["sample", "--checkpoint", str(tmp_path / "finetuned.ckpt"), "--mask", str(masks), *SAMPLER])
        assert message in capsys.readouterr().err
        with pytest.raises(SystemExit):  # before any real volume is read or anything drawn
            _evaluate(cohort_cache, tmp_path / "eval", "--checkpoint", str(tmp_path / "finetuned.ckpt"))
        assert message in capsys.readouterr().err
        copy.unlink(missing_ok=True)
    assert not list(masks.glob("*sample*")) and not (tmp_path / "eval").exists()


def test_evaluate_pairs_the_finetuned_model_with_its_controlnet_and_scores_the_mask_reward(
        cohort_cache: Path, pretrained_kl_checkpoint: Path, checkpoints: tuple[Path, Path],  # noqa: F811
        tmp_path: Path) -> None:
    controlnet, finetuned = checkpoints
    out = tmp_path / "eval"
    result = _evaluate(cohort_cache, out, "--checkpoint", str(pretrained_kl_checkpoint), "--checkpoint",
                       str(controlnet), "--checkpoint", str(finetuned), "--names", "[plain, controlnet, finetuned]",
                       "--baseline", "controlnet", "--skip-utility", "true", "--rollout-sampler", "false")
    entries = {entry["name"]: entry for entry in result["entries"]}
    assert [entries[n]["source"]["mask_conditioned"] for n in ("plain", "controlnet", "finetuned")] == \
        [False, True, True]
    assert entries["finetuned"]["source"]["controlnet_checkpoint"] == str(controlnet)
    assert result["reward"]["from"] == str(finetuned)
    drawn = {name: read_samples(out / entries[name]["samples_dir"])[0] for name in entries}
    assert torch.equal(drawn["finetuned"], drawn["controlnet"])  # no update yet: the same volumes at the same seeds
    assert not torch.equal(drawn["plain"], drawn["controlnet"])
    for name in ("controlnet", "finetuned"):  # mask fidelity of both, on the volumes with a lesion mask
        rows = [r for r in entries[name]["records"] if r["metric"] == MASK_FIDELITY_METRIC]
        assert rows and all(r["volumes"] == [1, 3] for r in rows)
    comparisons = {c["candidate"]: c for c in result["comparisons"]}
    assert set(comparisons) == {"plain", "finetuned"}
    paired = [r for r in comparisons["finetuned"]["records"] if r["metric"] == MASK_FIDELITY_METRIC]
    assert paired and all(r["num_volumes"] == 2 and r["difference"] == 0 for r in paired)
    assert any(r["metric"] == MASK_FIDELITY_METRIC for r in comparisons["plain"]["records"])
    # the reward: each volume against the mask it was drawn from (judged against, for the plain model and real volumes)
    reward = {name: {r["metric"]: r for r in entry["records"] if r["metric"].startswith("reward_raw/")}
              for name, entry in entries.items()}
    reward["real"] = {r["metric"]: r for r in result["real"]["records"] if r["metric"].startswith("reward_raw/")}
    for rows in reward.values():
        assert set(rows) == {"reward_raw/continuity", "reward_raw/mask_fidelity", "reward_raw/total"}
        assert all(0 <= v <= 1 for v in rows["reward_raw/mask_fidelity"]["per_volume"])
        np.testing.assert_allclose(rows["reward_raw/total"]["per_volume"], np.add(
            rows["reward_raw/continuity"]["per_volume"], rows["reward_raw/mask_fidelity"]["per_volume"]), rtol=1e-5)
    assert reward["finetuned"]["reward_raw/mask_fidelity"]["per_volume"] == \
        reward["controlnet"]["reward_raw/mask_fidelity"]["per_volume"]
    assert reward["plain"]["reward_raw/mask_fidelity"]["per_volume"] != \
        reward["controlnet"]["reward_raw/mask_fidelity"]["per_volume"]


def test_volumes_without_masks_are_scored_by_the_parts_that_read_none(
        segmenter_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    mask_reward = MaskFidelityReward(str(segmenter_checkpoint))
    composite = MultiScaleReward([InterSliceContinuityReward(), mask_reward], weights=[1.0, 2.0], normalise=False)
    volumes, labels = torch.rand(3, 1, 16, 16, 16) * 2 - 1, torch.tensor([0, 1, 0])
    masks = torch.from_numpy(np.stack([np.zeros((16, 16, 16), np.uint8), lesion_mask(1), lesion_mask(2)]))[:, None]
    full = reward_scores(composite, volumes, labels, masks, 2, torch.device("cpu"))
    torch.testing.assert_close(full["total"], full["continuity"] + 2 * full["mask_fidelity"])
    with caplog.at_level(logging.WARNING, logger="msrl.evaluation.reward_scores"):
        partial = reward_scores(composite, volumes, labels, None, 2, torch.device("cpu"), "folder x")
        assert reward_scores(mask_reward, volumes, labels, None, 2, torch.device("cpu"), "folder y") == {}
    assert set(partial) == {"continuity"} and torch.equal(partial["continuity"], full["continuity"])
    notes = [r.getMessage() for r in caplog.records]
    skipped = "the volumes of folder x carry no lesion masks: reward parts mask_fidelity (MaskFidelityReward)"
    assert any(n.startswith(skipped) and "only continuity, without the weighted total" in n for n in notes)
    assert any(n.startswith("the volumes of folder y carry no lesion masks") for n in notes)
