"""`msrl export`: the MONAI bundle runs without msrl and reproduces `msrl sample`; the card; refusals."""

from __future__ import annotations

import importlib.util
import json
import site
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from msrl.cli import main
from tests.conftest import TINY_MODEL, tiny_training

# msrl sample vs the bundle at the same seed and sampler: the same MONAI arithmetic in the same order; measured
# max |difference| 4.8e-6 on volumes in [-1, 1] (thread counts differ between the processes), and besides
# MONAI's VQVAE.decode_stage_2_outputs (straight-through quantiser, q = z + (e − z)) where msrl decodes e itself.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def python_without_msrl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python that sees this environment's packages (torch, MONAI, nibabel, fire) but cannot import msrl.

    A fresh venv whose only addition is a `.pth` line naming this environment's site-packages: a path
    line adds the folder without running the `.pth` files in it, so the editable install's import
    hook for msrl, lightning_modules, datamodules and rewards is never installed.
    """
    assert importlib.util.find_spec("fire") is not None, \
        "`python -m monai.bundle` needs the `fire` package (MONAI's CLI): pip install fire"
    venv = tmp_path_factory.mktemp("without_msrl") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    child_site = subprocess.run([str(python), "-I", "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(child_site, "parent_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _run(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -I …` in `cwd` (outside the repository), without PYTHONPATH, one thread."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    return subprocess.run([str(python), "-I", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _volumes(folder: Path) -> list[np.ndarray]:
    return [np.asarray(nib.load(f).dataobj) for f in sorted(folder.glob("sample_*.nii.gz"))]


def _data_config(cache: Path, folder: Path) -> Path:
    """The tiny cohort's data YAML (what the fixtures trained on)."""
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump({"class_path": "datamodules.TemplateCohortDataModule", "init_args": {
        "num_subjects": 8, "spatial_size": 16, "cache_dir": str(cache), "batch_size": 2}}))
    return path


def _run_bundle(python: Path, bundle: Path, out: Path, tmp_path: Path, *overrides: str) -> None:
    """`python -m monai.bundle run` of the bundle's inference.json (its bundle_root found from the config's folder)."""
    result = _run(python, ["-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.json"),
                           "--output_dir", str(out), *overrides], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_latent_bundle_samples_like_msrl_sample_without_msrl(latent_checkpoint: Path, cohort_cache: Path,
                                                              python_without_msrl: Path, tmp_path: Path) -> None:
    for module in ("msrl", "lightning_modules", "datamodules", "rewards"):  # the child cannot see msrl at all
        probe = _run(python_without_msrl, ["-c", f"import {module}"], tmp_path)
        assert probe.returncode != 0 and f"No module named '{module}'" in probe.stderr
    bundle = tmp_path / "bundle"
    main(["export", "--checkpoint", str(latent_checkpoint), "--out", str(bundle), "--steps", "4", "--eta", "0.5",
          "--guidance-scale", "2.0", "--batch-size", "2", "--data-config", str(_data_config(cohort_cache, tmp_path))])
    config = json.loads((bundle / "configs/inference.json").read_text())
    assert config["network_def"]["_target_"] == "monai.networks.nets.DiffusionModelUNet"
    assert config["autoencoder_def"]["_target_"] == "monai.networks.nets.VQVAE"
    assert config["inferer"]["_target_"] == "monai.inferers.LatentDiffusionInferer"
    assert "msrl" not in (bundle / "scripts/sampler.py").read_text().split('"""')[2]  # imports after the docstring
    for weights in (bundle / "models").iterdir():
        assert all(torch.is_tensor(v) for v in torch.load(weights, weights_only=True).values())

    _run_bundle(python_without_msrl, bundle, tmp_path / "bundle_samples", tmp_path, "--num_samples", "3",
                "--classes", "[1]", "--seed", "5", "--meta_file", str(bundle / "configs/metadata.json"),
                "--bundle_root", str(bundle))
    main(["sample", "--checkpoint", str(latent_checkpoint), "--num-samples", "3", "--label", "1", "--steps", "4",
          "--eta", "0.5", "--guidance-scale", "2.0", "--batch-size", "2", "--seed", "5", "--out",
          str(tmp_path / "msrl_samples")])
    exported, reference = _volumes(tmp_path / "bundle_samples/class_1"), _volumes(tmp_path / "msrl_samples")
    assert len(exported) == len(reference) == 3 and exported[0].shape == (16, 16, 16)
    assert np.allclose(nib.load(sorted((tmp_path / "bundle_samples/class_1").glob("*.nii.gz"))[0]).affine, np.eye(4))
    difference = max(float(np.abs(a - b).max()) for a, b in zip(exported, reference, strict=True))
    assert difference <= TOLERANCE, f"bundle vs msrl sample: max |difference| {difference:.3g}"
    # (the tiny VQ-GAN decodes every latent to nearly one volume: the KL test below shows the comparison can fail)

    card = (bundle / "docs/README.md").read_text()
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for digest in meta["weights_sha256"].values():
        assert digest in card
    assert "not for diagnosis" in card and meta["msrl"]["first_stage"]["class"] == "AutoencoderModule"
    assert meta["msrl"]["first_stage"]["latent_shape"] == [4, 4, 4, 4]
    assert meta["msrl"]["data"]["spatial_size"] == 16 and meta["msrl"]["data"]["subjects"] == 8
    assert sum(s["subjects"] for s in meta["msrl"]["data"]["splits"].values()) == 8


@pytest.fixture(scope="module")
def pretrained_kl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained latent model on an untrained KL autoencoder, saved as msrl pretrain saves one.

    No training: random weights (the EMA perturbed away from MONAI's zero output layer) make every volume depend
    on its noise, labels and guidance, which a trained tiny model's collapsed decoder would not.
    """
    from lightning_modules import DiffusionModule, KLAutoencoderModule

    folder = tmp_path_factory.mktemp("pretrained_kl")
    torch.manual_seed(0)
    autoencoder = KLAutoencoderModule(spatial_size=16, channels=(8, 8, 8), norm_num_groups=8, latent_channels=4,
                                      training=tiny_training())
    autoencoder.latent_scale.fill_(0.7)
    torch.save({"state_dict": autoencoder.state_dict(), "msrl_autoencoder": autoencoder.autoencoder_spec()},
               folder / "autoencoder.ckpt")
    model = DiffusionModule(in_channels=1, spatial_size=16, num_classes=2, preview_every_n_epochs=0,
                            autoencoder_checkpoint=str(folder / "autoencoder.ckpt"),
                            **{**TINY_MODEL, "channels": (8, 8), "attention_levels": (False, True)})
    with torch.no_grad():
        for parameter in model.ema.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save({"state_dict": model.state_dict(), "msrl_diffusion": model.diffusion_spec(),
                "hyper_parameters": dict(model.hparams)}, folder / "pretrained.ckpt")
    return folder / "pretrained.ckpt"


def _ppo_checkpoint(pretrained: Path, path: Path, **options: object) -> Path:
    """A PPO checkpoint as PPOFinetuneModule writes it (no iteration run), LoRA adapters perturbed if any."""
    from lightning_modules import PPOFinetuneModule
    from rewards import BrainMaskPlausibilityReward, InterSliceContinuityReward, MultiScaleReward

    reward = MultiScaleReward([InterSliceContinuityReward(), BrainMaskPlausibilityReward()], weights=[1.0, 0.5])
    ppo = PPOFinetuneModule(str(pretrained), reward, num_steps=4, eta=1.0, lr=3e-4, **options)
    with torch.no_grad():
        for name, value in ppo.state_dict(keep_vars=True).items():
            if ".lora_B" in name:  # PEFT starts B at 0: a merge would change nothing
                value.add_(0.05 * torch.randn_like(value))
    ppo.reward_config = {"class_path": "rewards.MultiScaleReward", "init_args": {
        "components": [{"class_path": "rewards.InterSliceContinuityReward", "init_args": {"name": "continuity"}},
                       {"class_path": "rewards.BrainMaskPlausibilityReward", "init_args": {"name": "mask"}}],
        "weights": [1.0, 0.5]}}
    checkpoint = {"state_dict": ppo.state_dict(), "hyper_parameters": dict(ppo.hparams), "epoch": 0,
                  "global_step": 0}
    ppo.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def finetuned_kl_checkpoint(pretrained_kl_checkpoint: Path) -> Path:
    """A full PPO fine-tuning checkpoint of the KL latent model."""
    return _ppo_checkpoint(pretrained_kl_checkpoint, pretrained_kl_checkpoint.with_name("finetuned.ckpt"))


# The part of msrl evaluate's metrics.json the model card reads (one model, one paired difference).
METRICS = {
    "data": {"class_path": "datamodules.TemplateCohortDataModule", "spatial_size": 16, "real_split": "test",
             "num_real": 8, "num_test": None, "num_train": None},
    "extractors": ["indomain"], "primary": {"metric": "fid", "extractor": "indomain", "view": "3d",
                                            "reference": "test"},
    "real": {"records": []},
    "entries": [{"name": "finetuned", "num_samples": 8, "sampling": {"label": "eval"}, "records": [
        {"metric": "fid", "extractor": "indomain", "view": "3d", "class": "all", "reference": "test", "value": 16.93,
         "ci95": [15.21, 18.84], "num_real": 8, "num_generated": 8}]}],
    "comparisons": [{"candidate": "finetuned", "baseline": "pretrained", "num_volumes": 8, "records": [
        {"metric": "fid", "extractor": "indomain", "class": "all", "difference": 1.76, "ci95": [1.13, 2.48],
         "verdict": "worse"}]}],
}


@pytest.mark.slow  # the latent VQ-GAN bundle test above runs the bundle in the default suite
def test_finetuned_kl_bundle_reproduces_msrl_sample_and_its_card(finetuned_kl_checkpoint: Path,
                                                                  python_without_msrl: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    bundle = tmp_path / "bundle"
    main(["export", "--checkpoint", str(finetuned_kl_checkpoint), "--out", str(bundle), "--metrics", str(metrics),
          "--steps", "4", "--eta", "0.5", "--guidance-scale", "2.0", "--batch-size", "2", "--num-samples", "3",
          "--classes", "[0]", "--seed", "5"])
    assert json.loads((bundle / "configs/inference.json").read_text())["autoencoder_def"]["_target_"] \
        == "monai.networks.nets.AutoencoderKL"
    _run_bundle(python_without_msrl, bundle, tmp_path / "bundle_samples", tmp_path)
    main(["sample", "--checkpoint", str(finetuned_kl_checkpoint), "--num-samples", "3", "--label", "0", "--steps",
          "4", "--eta", "0.5", "--guidance-scale", "2.0", "--batch-size", "2", "--seed", "5", "--out",
          str(tmp_path / "msrl_samples")])
    exported, reference = _volumes(tmp_path / "bundle_samples/class_0"), _volumes(tmp_path / "msrl_samples")
    assert len(exported) == len(reference) == 3
    difference = max(float(np.abs(a - b).max()) for a, b in zip(exported, reference, strict=True))
    assert difference <= TOLERANCE, f"bundle vs msrl sample: max |difference| {difference:.3g}"
    spread = min(float(np.abs(exported[i] - exported[j]).max()) for i, j in ((0, 1), (0, 2), (1, 2)))
    assert spread > 1000 * TOLERANCE  # every volume its own: the comparison above could have failed

    card = (bundle / "docs/README.md").read_text()
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert "PPO fine-tuned" in card and "continuity (`rewards.InterSliceContinuityReward`): 1.0" in card
    assert "mask (`rewards.BrainMaskPlausibilityReward`): 0.5" in card
    assert "16.9 [15.2, 18.8]" in card and "+1.76 [+1.13, +2.48]" in card
    assert meta["msrl"]["finetuning"]["rollout_sampler"] == {"num_steps": 4, "eta": 1.0, "guidance_scale": 1.0}
    assert meta["eval_metrics"]["paired_differences"][0]["records"][0]["ci95"] == [1.13, 2.48]
    assert meta["msrl"]["first_stage"]["class"] == "KLAutoencoderModule"
    assert meta["msrl"]["data"] is None and "Not recorded" in card


def test_lora_checkpoint_is_exported_with_its_adapters_merged(pretrained_kl_checkpoint: Path, tmp_path: Path) -> None:
    from lightning_modules import DiffusionModule

    lora = _ppo_checkpoint(pretrained_kl_checkpoint, tmp_path / "lora.ckpt", lora_rank=2)
    assert "msrl_lora" in torch.load(lora, weights_only=True)
    main(["export", "--checkpoint", str(lora), "--out", str(tmp_path / "bundle")])
    exported = torch.load(tmp_path / "bundle/models/diffusion_unet.pt", weights_only=True)
    merged = DiffusionModule.from_msrl_checkpoint(lora).ema.module.state_dict()  # what msrl sample draws with
    base = DiffusionModule.from_msrl_checkpoint(pretrained_kl_checkpoint).ema.module.state_dict()
    assert exported.keys() == merged.keys() == base.keys()  # plain MONAI UNet names, no adapters
    assert all(torch.equal(exported[key], merged[key]) for key in exported)
    assert sum(not torch.equal(exported[key], base[key]) for key in exported) >= 10
    meta = json.loads((tmp_path / "bundle/configs/metadata.json").read_text())
    assert meta["msrl"]["finetuning"]["lora"]["rank"] == 2
    assert "LoRA adapters merged" in meta["msrl"]["exported_weights"]
    assert "- LoRA: rank 2" in (tmp_path / "bundle/docs/README.md").read_text()


@pytest.mark.slow
def test_voxel_bundle_samples_like_msrl_sample(pretrained_checkpoint: Path, python_without_msrl: Path,
                                               tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    main(["export", "--checkpoint", str(pretrained_checkpoint), "--out", str(bundle), "--steps", "3",
          "--num-samples", "2", "--classes", "[0]"])
    assert "autoencoder_def" not in json.loads((bundle / "configs/inference.json").read_text())
    _run_bundle(python_without_msrl, bundle, tmp_path / "bundle_samples", tmp_path)
    main(["sample", "--checkpoint", str(pretrained_checkpoint), "--num-samples", "2", "--label", "0", "--steps", "3",
          "--out", str(tmp_path / "msrl_samples")])
    exported, reference = _volumes(tmp_path / "bundle_samples/class_0"), _volumes(tmp_path / "msrl_samples")
    assert len(exported) == 2
    assert max(float(np.abs(a - b).max()) for a, b in zip(exported, reference, strict=True)) <= TOLERANCE


def test_export_refuses_what_it_cannot_export(autoencoder_checkpoint: Path, pretrained_checkpoint: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lora = tmp_path / "lora.ckpt"  # LoRA adapters whose base checkpoint is gone: nothing to merge them into
    checkpoint = torch.load(pretrained_checkpoint, weights_only=True)
    torch.save({**checkpoint, "msrl_lora": {"rank": 4, "base_checkpoint": str(tmp_path / "gone.ckpt"),
                                            "base_sha256": "0" * 64}}, lora)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "file").write_text("x")
    for argv, message in [
        (["--checkpoint", str(autoencoder_checkpoint)], "is a first stage"),
        (["--checkpoint", str(lora)], "gone.ckpt does not exist"),
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "missing.ckpt does not exist"),
        (["--checkpoint", str(pretrained_checkpoint), "--classes", "[2]"], "has 2 classes"),
        (["--checkpoint", str(pretrained_checkpoint), "--out", str(existing)], "--overwrite"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--out", str(tmp_path / "bundle"), *argv])
        assert exit_info.value.code == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()  # nothing half-written


def test_card_finds_the_data_in_the_run_config(pretrained_checkpoint: Path, cohort_cache: Path,
                                               tmp_path: Path) -> None:
    """A checkpoint in runs/<name>/version_<n>/checkpoints/ has its data counted from the run's config.yaml."""
    run = tmp_path / "runs/pretrain/version_0"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints/last.ckpt"
    checkpoint.write_bytes(pretrained_checkpoint.read_bytes())
    data = yaml.safe_load(_data_config(cohort_cache, tmp_path).read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {**data, "init_args": {
        **data["init_args"], "val_fraction": 0.25, "test_fraction": 0.25}}}))
    main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "bundle")])
    meta = json.loads((tmp_path / "bundle/configs/metadata.json").read_text())
    splits = meta["msrl"]["data"]["splits"]
    assert {name: split["subjects"] for name, split in splits.items()} == {"train": 4, "val": 2, "test": 2}
    assert meta["msrl"]["checkpoint"]["kind"] == "pretrained" and meta["msrl"]["finetuning"] is None
    card = (tmp_path / "bundle/docs/README.md").read_text()
    assert "datamodules.TemplateCohortDataModule" in card and "test: 2 subjects" in card
