"""`msrl evaluate` with lesion masks: ControlNet checkpoints, segmentation utility, mask fidelity, mask_contours.png."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import pytest
import torch

from lightning_modules.controlnet import ControlNetModule
from msrl.cli import main
from msrl.commands.evaluate_masks import segmentation_wanted
from msrl.commands.evaluate_sources import assign_masks
from msrl.evaluation.figures import lesion_centre_slice, mask_contours
from msrl.evaluation.mask_fidelity import MASK_FIDELITY_METRIC
from msrl.evaluation.segmentation import SEGMENTATION_METRIC
from msrl.samples import read_samples
from msrl.study.aggregate import arm_rows
from msrl.study.units import FinishedUnit, row_key
from tests.conftest import REPO

REGIONS = {"1", "2", "4", "whole_tumour"}
TINY_SEGMENTER = ["--segmentation.blocks_down", "[1]", "--segmentation.steps", "3", "--segmentation.batch_size", "2",
                  "--segmentation.seeds", "[0,1]"]


def _controlnet(base: Path, path: Path, scale: float) -> Path:
    """A tiny ControlNet on `base`: zero-initialised (scale 0: draws exactly what its base draws) or perturbed."""
    module = ControlNetModule(str(base), in_channels=1, spatial_size=16, num_classes=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in module.controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                weight.copy_(scale * torch.randn(weight.shape, generator=generator))
        module.ema.module.load_state_dict(module.controlnet.state_dict())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def controlnets(latent_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("controlnets")
    return _controlnet(latent_checkpoint, folder / "zero.ckpt", 0.0), _controlnet(latent_checkpoint,
                                                                                   folder / "other.ckpt", 0.5)


def _evaluate(cache: Path, out: Path, *options: str) -> dict:
    main(["evaluate", "--data-config", str(REPO / "configs/data/template.yaml"),
          "--data.init_args.num_subjects", "8", "--data.init_args.spatial_size", "16",
          "--data.init_args.cache_dir", str(cache), "--data.init_args.val_fraction", "0.25",
          "--data.init_args.test_fraction", "0.25", "--num-samples", "4", "--steps", "2",
          "--bootstrap", "4", "--kid-subsets", "4", "--ms-ssim-pairs", "4", "--paired-bootstrap", "20",
          "--utility.channels", "[8,8]", "--utility.epochs", "1", "--utility.seeds", "[0]", *TINY_SEGMENTER,
          "--extractors", '[{"class_path": "msrl.evaluation.MedicalNetExtractor"}]', *options, "--out", str(out)])
    return json.loads((out / "metrics.json").read_text())


def _rows(records: list[dict], metric: str) -> dict[tuple, dict]:
    return {(row.get("train_set"), row["label"]): row for row in records if row["metric"] == metric}


def test_evaluate_measures_segmentation_utility_and_mask_fidelity_paired_per_volume(
        cohort_cache: Path, latent_checkpoint: Path, autoencoder_checkpoint: Path, controlnets: tuple[Path, Path],
        tmp_path: Path) -> None:
    zero, other = controlnets
    out = tmp_path / "eval"
    result = _evaluate(cohort_cache, out, "--checkpoint", str(latent_checkpoint), "--checkpoint", str(zero),
                       "--checkpoint", str(other), "--autoencoder", str(autoencoder_checkpoint),
                       "--names", "[plain, zero, other, recon]", "--baseline", "zero", "--num-samples", "6")
    data = result["data"]
    assert (data["segmentation_test_split"], data["num_segmentation_test"], data["num_segmentation_train"]) == \
        ("test", 2, 4)
    entries = {entry["name"]: entry for entry in result["entries"]}
    assert [entries[n]["source"].get("mask_conditioned") for n in ("plain", "zero", "other", "recon")] == \
        [False, True, True, None]
    # the real-trained segmenters: Dice per region on the held-out real split, one value per seed
    real = _rows(result["real"]["records"], SEGMENTATION_METRIC)
    assert set(real) == {("real", region) for region in REGIONS}
    assert all(row["seeds"] == [0, 1] and len(row["per_seed"]) == 2 and row["num_real"] == 2 for row in real.values())
    ceiling = _rows(result["real"]["records"], MASK_FIDELITY_METRIC)  # the held-out volumes with their own masks
    assert {region for _, region in ceiling} == REGIONS and all(r["volumes"] == [1] for r in ceiling.values())
    # a ControlNet trains segmenters on pairs drawn from the 4 training masks, alone and beside the real pairs
    for name in ("zero", "other"):
        synthetic = _rows(entries[name]["records"], SEGMENTATION_METRIC)
        assert set(synthetic) == {(s, r) for s in ("synthetic", "real+synthetic") for r in REGIONS}
        assert {row["num_generated"] for (s, _), row in synthetic.items() if s == "synthetic"} == {4}
        assert {row["num_generated"] for (s, _), row in synthetic.items() if s == "real+synthetic"} == {8}
    assert not _rows(entries["plain"]["records"], SEGMENTATION_METRIC)  # no masks, no pairs
    # the utility classifiers too: a ControlNet's volumes drawn from held-out masks never train them
    utility = {name: next(r["num_generated"] for r in entries[name]["records"]
                          if r["metric"] == "utility/auroc" and r["train_set"] == "synthetic") for name in entries
               if name != "recon"}
    assert utility == {"plain": 6, "zero": 4, "other": 4}
    # every source drawn from (or judged against) the held-out masks: volumes 1, 3 and 5 show the class-1 lesion
    for name in ("plain", "zero", "other"):
        fidelity = _rows(entries[name]["records"], MASK_FIDELITY_METRIC)
        assert {region for _, region in fidelity} == REGIONS
        assert all(row["volumes"] == [1, 3, 5] and len(row["per_volume"]) == 3 for row in fidelity.values())
    assert all(r["volumes"] == [1] for r in _rows(entries["recon"]["records"], MASK_FIDELITY_METRIC).values())
    # same seeds, same labels: a zero-initialised ControlNet draws exactly its base's volumes, so they pair
    plain, _ = read_samples(out / entries["plain"]["samples_dir"])
    drawn, _ = read_samples(out / entries["zero"]["samples_dir"])
    assert torch.equal(plain, drawn)
    comparisons = {c["candidate"]: c for c in result["comparisons"]}
    assert set(comparisons) == {"plain", "other"} and all(c["baseline"] == "zero" for c in comparisons.values())
    no_mask = [r for r in comparisons["plain"]["records"] if r["metric"] == MASK_FIDELITY_METRIC]
    assert {r["label"] for r in no_mask} == REGIONS
    assert all(r["difference"] == 0 and r["verdict"] == "no difference" and r["num_volumes"] == 3 for r in no_mask)
    paired = {(r["metric"], r["train_set"], r["label"]): r for r in comparisons["other"]["records"]
              if "label" in r}
    assert set(paired) == {(SEGMENTATION_METRIC, s, r) for s in ("synthetic", "real+synthetic") for r in REGIONS} | {
        (MASK_FIDELITY_METRIC, "real", r) for r in REGIONS}
    assert all(r["num_seeds"] == 2 for (metric, _, _), r in paired.items() if metric == SEGMENTATION_METRIC)
    text = (out / "metrics.md").read_text()
    assert "## Segmentation utility" in text and "## Mask fidelity" in text and "ignored (class label only)" in text
    assert "| other − zero | segmentation/dice [whole tumour] | synthetic |" in text
    assert plt.imread(out / "mask_contours.png").shape[0] > plt.imread(out / "mask_contours.png").shape[1]  # 5 rows
    main(["report", str(out), "--out", str(tmp_path / "report")])
    page = (tmp_path / "report" / "report.html").read_text()
    assert (tmp_path / "report" / "eval0_mask_contours.png").is_file() and "eval0_mask_contours.png" in page
    assert "Dice whole tumour" in page


def test_skip_segmentation_still_draws_from_the_masks(cohort_cache: Path, controlnets: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    result = _evaluate(cohort_cache, tmp_path / "eval", "--checkpoint", str(controlnets[1]), "--skip-utility", "true",
                       "--skip-segmentation", "true")
    records = result["entries"][0]["records"]
    assert result["entries"][0]["source"]["mask_conditioned"] is True
    assert not any(r["metric"] in (SEGMENTATION_METRIC, MASK_FIDELITY_METRIC) for r in records)
    assert result["data"]["segmentation_test_split"] is None
    assert (tmp_path / "eval" / "mask_contours.png").is_file()
    assert "## Segmentation utility" not in (tmp_path / "eval" / "metrics.md").read_text()


def test_segmentation_runs_by_default_only_for_a_controlnet_on_data_with_masks() -> None:
    assert segmentation_wanted(None, controlnets=True, serves_masks=True)
    assert not segmentation_wanted(None, controlnets=False, serves_masks=True)
    assert not segmentation_wanted(None, controlnets=True, serves_masks=False)
    assert not segmentation_wanted(True, controlnets=True, serves_masks=True)
    assert segmentation_wanted(False, controlnets=False, serves_masks=True)
    with pytest.raises(ValueError, match="serves none"):
        segmentation_wanted(False, controlnets=False, serves_masks=False)


def test_each_drawn_volume_gets_the_next_held_out_mask_of_its_class() -> None:
    heldout = torch.tensor([1, 0, 1, 1, 0])
    assert assign_masks(torch.tensor([0, 1, 0, 1, 0, 1, 1]), heldout, 7).tolist() == [1, 0, 4, 2, 1, 3, 0]
    assert assign_masks(None, heldout, 7).tolist() == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(ValueError, match="no volume of class 2"):
        assign_masks(torch.tensor([2]), heldout, 1)


def test_mask_contours_slice_through_the_lesions_centre(tmp_path: Path) -> None:
    masks = torch.zeros(2, 1, 16, 16, 16, dtype=torch.uint8)
    masks[0, 0, 4:8, 4:8, 9:14] = 2  # oedema around a core: centre of mass at z = 11
    masks[0, 0, 5:7, 5:7, 10:13] = 1
    masks[1, 0, 8:10, 8:10, 2:4] = 4
    assert [lesion_centre_slice(m) for m in masks] == [11, 2]  # z 2.5 rounds to even
    with pytest.raises(ValueError, match="no lesion voxel"):
        lesion_centre_slice(torch.zeros(1, 4, 4, 4))
    volumes = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    one = mask_contours({"real": volumes}, masks, tmp_path / "one.png")
    three = mask_contours({"real": volumes, "a": volumes, "b": volumes}, masks, tmp_path / "three.png")
    assert plt.imread(three).shape[0] > 2 * plt.imread(one).shape[0] * 0.9  # a row per source


def test_evaluate_print_config_has_the_segmentation_group(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "-c", str(REPO / "configs/evaluate/template.yaml"), "--out", "x", "--print_config"])
    printed = capsys.readouterr().out
    assert "segmentation:" in printed and "init_filters:" in printed and "skip_segmentation:" in printed


def test_study_rows_keep_the_regions_of_one_metric_apart() -> None:
    rows = [{"metric": MASK_FIDELITY_METRIC, "view": "3d", "class": "all", "train_set": "real", "label": label,
             "value": value} for label, value in (("1", 0.2), ("whole_tumour", 0.7))]
    keyed = {row_key(row): row for row in rows}
    assert len(keyed) == 2
    unit = FinishedUnit("arm", 0, Path("."), {}, {}, {}, keyed, {}, {})
    aggregated = {row["label"]: row["mean"] for row in arm_rows([unit])}
    assert aggregated == {"1": 0.2, "whole_tumour": 0.7}


def test_the_figure_shows_the_real_volume_first_then_each_source_drawn_from_the_same_masks() -> None:
    from msrl.commands.evaluate_masks import contour_panels
    from msrl.commands.evaluate_sources import Heldout, Sampler, SourceVolumes
    from msrl.evaluation.segmenter import MaskedVolumes
    from msrl.evaluation.utility import LabelledVolumes

    masks = torch.zeros(3, 1, 8, 8, 8, dtype=torch.uint8)
    masks[1, 0, 2:4, 2:4, 2:4], masks[2, 0, 4:6, 4:6, 4:6] = 2, 1  # held-out volume 0 has no lesion
    index = torch.tensor([0, 2, 1, 2])  # drawn volume i was drawn from held-out mask index[i]
    heldout = Heldout(masks, index, MaskedVolumes(torch.zeros(1, 1, 8, 8, 8), masks[:1]), torch.tensor([0]), 0)
    real = LabelledVolumes(torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 1, 8, 8, 8), torch.tensor([0, 1, 1]))
    drawn = LabelledVolumes(10 + torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 1, 8, 8, 8), torch.zeros(4))
    evaluation, other = Sampler(2, 0.0), Sampler(4, 1.0)
    sources = [SourceVolumes("plain", "checkpoint", "p", drawn, evaluation, 0, {"mask_conditioned": False},
                             masks[index]),
               SourceVolumes("ctrl", "checkpoint", "c", drawn, evaluation, 0, {"mask_conditioned": True}, masks[index]),
               SourceVolumes("ctrl", "checkpoint", "c", drawn, other, 0, {"entry_name": "ctrl [x]"}, masks[index]),
               SourceVolumes("folder", "generated", "g", drawn),
               SourceVolumes("recon", "autoencoder", "a", LabelledVolumes(real.volumes + 20, real.labels), masks=masks)]
    rows, shown = contour_panels(sources, heldout, real, evaluation)
    assert list(rows) == ["real", "plain (class label only)", "ctrl (mask-conditioned)", "recon (reconstruction)"]
    assert torch.equal(shown, masks[[2, 1]])  # in the order the checkpoints drew them, lesion-free mask left out
    assert [rows[name][:, 0, 0, 0, 0].tolist() for name in rows] == [[2, 1], [11, 12], [11, 12], [22, 21]]
