"""`msrl sample --mask` / `--masks-from-split` with a ControlNet: volumes beside their masks with the masks'
geometry, labels from the masks, the same draws as `ControlNetModule.generate`, and every refusal before any write."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from lightning_modules import ControlNetModule
from msrl.cli import main
from tests.msrl.test_export import pretrained_kl_checkpoint  # noqa: F401  # fixture: an untrained KL latent model

AFFINE = np.array([[1.5, 0, 0, -12.0], [0, 1.5, 0, -20.0], [0, 0, 1.5, 4.0], [0, 0, 0, 1]])  # RAS+, not identity
SAMPLER = ["--steps", "3", "--guidance-scale", "2.0"]


@pytest.fixture(scope="module")
def controlnet_checkpoint(pretrained_kl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A ControlNet on the KL latent model whose zero-initialised layers are perturbed: the mask changes volumes."""
    torch.manual_seed(1)
    module = ControlNetModule(str(pretrained_kl_checkpoint), in_channels=1, spatial_size=16, num_classes=2)
    with torch.no_grad():
        for name, parameter in module.controlnet.named_parameters():
            if name.startswith("controlnet_"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    module.ema.module.load_state_dict(module.controlnet.state_dict())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("controlnet") / "controlnet.ckpt"
    trainer.save_checkpoint(path)
    return path


def lesion_mask(seed: int = 0) -> np.ndarray:
    """A 16³ label map with a ball of necrotic core (1) in oedema (2) with an enhancing rim (4), placed by `seed`."""
    grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"))
    centre = np.random.default_rng(seed).integers(5, 11, size=3)[:, None, None, None]
    distance = np.sqrt(((grid - centre) ** 2).sum(0))
    return np.select([distance < 1.5, distance < 3, distance < 4.5], [1, 4, 2], 0).astype(np.uint8)


def save_mask(labels: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    image = nib.Nifti1Image(labels, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    nib.save(image, path)
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_volumes_are_written_beside_their_masks_as_generate_draws_them(controlnet_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    folder.mkdir()
    lesion = save_mask(lesion_mask(), folder / "a.nii.gz")
    save_mask(np.zeros((16, 16, 16), np.uint8), folder / "b.nii.gz")
    main(["sample", "--checkpoint", str(controlnet_checkpoint), "--mask", str(folder), "--num-samples", "2",
          "--batch-size", "3", *SAMPLER])
    written = sorted(p.name for p in folder.iterdir())
    assert written == ["a.nii.gz", "a_sample_0.nii.gz", "a_sample_1.nii.gz", "b.nii.gz", "b_sample_0.nii.gz",
                       "b_sample_1.nii.gz", "samples.csv"]
    for name in ("a_sample_0", "b_sample_1"):
        image = nib.load(folder / f"{name}.nii.gz")
        assert image.shape == (16, 16, 16) and image.get_data_dtype() == np.float32
        assert np.array_equal(image.affine, AFFINE)
        assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (1, 2)
    manifest = rows(folder / "samples.csv")
    sha = hashlib.sha256(lesion.read_bytes()).hexdigest()
    assert [(r["file"], r["mask"], r["label"], r["seed"]) for r in manifest] == [
        ("a_sample_0.nii.gz", "a.nii.gz", "1", "0"), ("a_sample_1.nii.gz", "a.nii.gz", "1", "0"),
        ("b_sample_0.nii.gz", "b.nii.gz", "0", "0"), ("b_sample_1.nii.gz", "b.nii.gz", "0", "3")]
    assert manifest[0]["mask_sha256"] == sha and manifest[0]["checkpoint"] == str(controlnet_checkpoint)

    # the files are ControlNetModule.generate's batches: [a, a, b] seeded 0 with labels [1, 1, 0]
    module = ControlNetModule.from_msrl_checkpoint(controlnet_checkpoint)
    seg = torch.from_numpy(np.stack([lesion_mask(), lesion_mask(), np.zeros((16,) * 3, np.uint8)]))[:, None]
    expected = module.generate(seg, torch.tensor([1, 1, 0]), num_steps=3, guidance_scale=2.0, seed=0)
    for index, name in enumerate(("a_sample_0", "a_sample_1", "b_sample_0")):
        found = np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj)
        np.testing.assert_allclose(found, expected[index, 0].numpy(), atol=1e-5)
    plain = module.base.generate(3, torch.tensor([1, 1, 0]), num_steps=3, guidance_scale=2.0, seed=0)
    assert (expected - plain).abs().max() > 1e-2  # the mask steers the volumes: the check above could fail

    with pytest.raises(SystemExit):  # drawn already: refused, named, the file unchanged
        main(["sample", "--checkpoint", str(controlnet_checkpoint), "--mask", str(lesion), *SAMPLER])
    before = (folder / "a_sample_0.nii.gz").read_bytes()
    main(["sample", "--checkpoint", str(controlnet_checkpoint), "--mask", str(lesion), "--label", "0",
          "--overwrite", "true", "--seed", "7", *SAMPLER])
    assert (folder / "a_sample_0.nii.gz").read_bytes() != before
    manifest = {r["file"]: r for r in rows(folder / "samples.csv")}
    assert len(manifest) == 4 and manifest["a_sample_0.nii.gz"]["label"] == "0"  # replaced; other rows kept
    assert manifest["a_sample_0.nii.gz"]["seed"] == "7" and manifest["b_sample_1.nii.gz"]["seed"] == "3"


def test_every_refusal_names_the_file_and_writes_nothing(controlnet_checkpoint: Path,
                                                         pretrained_kl_checkpoint: Path,  # noqa: F811
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = save_mask(lesion_mask(), tmp_path / "good.nii.gz")
    three = lesion_mask()
    three[:2, :2, :1] = 3
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    bad = {
        "three": (three, AFFINE, r"holds labels \[3\] \(voxels per label: \{3: 4\}\) outside 0 and the model's mask "
                                 r"labels 1 \(necrotic core\), 2 \(oedema\), 4 \(enhancing tumour\)"),
        "small": (np.zeros((12, 12, 12), np.uint8), AFFINE, "is 12×12×12, the model draws 16×16×16 volumes"),
        "lps": (lesion_mask(), lps, r"has orientation LPS, expected RAS\+ .*msrl data masks"),
        "four_d": (np.zeros((16, 16, 16, 2), np.uint8), AFFINE, r"is 4-D \(16×16×16×2\)"),
        "fraction": (lesion_mask().astype(np.float32) * 0.5, AFFINE, r"holds non-integer values \(\d+ voxels, e.g. "),
    }
    for name, (labels, affine, message) in bad.items():
        path = save_mask(labels, tmp_path / f"{name}.nii.gz", affine)
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", "--checkpoint", str(controlnet_checkpoint), "--mask", str(good), "--mask", str(path),
                  *SAMPLER])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert "1 mask(s) refused, nothing was drawn" in err and f"{path}: " in err, err
        assert re.search(message, err), err
    twins = tmp_path / "twins"
    twins.mkdir()
    save_mask(lesion_mask(), twins / "case.nii")
    save_mask(lesion_mask(), twins / "case.nii.gz")
    for argv, message in [
        (["--checkpoint", str(pretrained_kl_checkpoint), "--mask", str(good)], "without mask conditioning"),
        (["--checkpoint", str(controlnet_checkpoint), "--mask", str(twins)], "share the name 'case' in one folder"),
        (["--checkpoint", str(controlnet_checkpoint)], "is a ControlNet (msrl train-controlnet)"),
        (["--checkpoint", str(controlnet_checkpoint), "--mask", str(good), "--out", str(tmp_path / "x")],
         "--out is not used with --mask"),
        (["--checkpoint", str(controlnet_checkpoint), "--mask", str(good), "--label", "2"], "has 2 classes"),
        (["--checkpoint", str(controlnet_checkpoint), "--mask", str(tmp_path / "none.nii.gz")], "does not exist"),
        (["--checkpoint", str(controlnet_checkpoint), "--masks-from-split", "test"], "needs --data"),
    ]:
        with pytest.raises(SystemExit):
            main(["sample", *argv, *SAMPLER])
        assert message in capsys.readouterr().err, argv
    assert not list(tmp_path.rglob("*sample*")) and not list(tmp_path.rglob("samples.csv"))
    assert not list(tmp_path.glob(".*"))  # no staged file left behind
    (tmp_path / "good_sample_0.nii.gz").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(controlnet_checkpoint), "--mask", str(good), *SAMPLER])
    assert "good_sample_0.nii.gz" in capsys.readouterr().err and (tmp_path / "good_sample_0.nii.gz").stat().st_size == 0


def data_yaml(cache: Path, path: Path, nested: bool = False) -> Path:
    """The tiny cohort as a data YAML (or, `nested`, as the `data:` of a training config); 2 test subjects."""
    data = {"class_path": "datamodules.TemplateCohortDataModule", "init_args": {
        "num_subjects": 8, "spatial_size": 16, "cache_dir": str(cache), "batch_size": 2, "val_fraction": 0.25,
        "test_fraction": 0.25}}
    path.write_text(yaml.safe_dump({"data": data, "trainer": {"max_epochs": 1}} if nested else data))
    return path


def test_masks_from_split_writes_masks_and_volumes_into_out(controlnet_checkpoint: Path, cohort_cache: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    main(["sample", "--checkpoint", str(controlnet_checkpoint), "--masks-from-split", "test", "--data",
          str(data_yaml(cohort_cache, tmp_path / "data.yaml")), "--out", str(out), *SAMPLER])
    masks = rows(out / "masks.csv")
    assert len(masks) == 2 and {m["label"] for m in masks} == {"0", "1"}
    samples = {r["mask"]: r for r in rows(out / "samples.csv")}
    for mask in masks:
        assert mask["file"] == f"{mask['subject_id']}_seg.nii.gz"
        assert samples[mask["file"]]["label"] == mask["label"]  # auto: a lesion ⇔ class 1, the cohort's rule
        assert (int(mask["lesion_voxels"]) > 0) == (mask["label"] == "1")
        volume = nib.load(out / f"{mask['subject_id']}_seg_sample_0.nii.gz")
        assert volume.shape == (16, 16, 16) and np.array_equal(volume.affine, np.eye(4))
