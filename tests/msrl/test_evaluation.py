"""Feature extractors, the utility protocol, `msrl evaluate` (metrics.json schema) and `msrl report`."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from monai.networks.nets import resnet10
from torch.utils.tensorboard import SummaryWriter

from datamodules import TemplateCohortDataModule
from msrl.cli import main
from msrl.evaluation import ClassifierFeatureExtractor, MedicalNetExtractor, SliceExtractor
from msrl.evaluation.figures import brightest_cluster, slice_comparison
from msrl.evaluation.scores import FeatureCache, distribution_records
from msrl.evaluation.utility import LabelledVolumes, UtilityProtocol
from tests.conftest import REPO


def _cohort(cache: Path) -> TemplateCohortDataModule:
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, val_fraction=0.25,
                                    test_fraction=0.25)
    data.prepare_data()
    data.setup("fit")
    return data


def _split(data: TemplateCohortDataModule, name: str) -> LabelledVolumes:
    items = [data.datasets[name][i] for i in range(len(data.datasets[name]))]
    return LabelledVolumes(torch.stack([i["image"] for i in items]), torch.tensor([int(i["label"]) for i in items]))


def test_medicalnet_extractor_loads_a_state_dict_in_medicalnets_key_format(tmp_path: Path) -> None:
    # MedicalNet's released files: {"state_dict": {"module.conv1.weight": …, …, "module.conv_seg.…": …}}
    torch.manual_seed(5)
    source = resnet10(spatial_dims=3, n_input_channels=1, conv1_t_stride=2, feed_forward=False,
                      shortcut_type="B", bias_downsample=False)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.randn(32, 512, 3, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "resnet_10_23dataset.pth")
    extractor = MedicalNetExtractor(depth=10, weights_path=str(tmp_path / "resnet_10_23dataset.pth"))
    for name, tensor in source.state_dict().items():
        assert torch.equal(extractor.network.state_dict()[name], tensor), name
    assert extractor.name.startswith("medicalnet-resnet10-") and "random" not in extractor.name
    volumes = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    assert extractor(volumes)["3d"].shape == (2, 512)
    random = MedicalNetExtractor(depth=10)
    assert random.name == "medicalnet-resnet10-random-seed0"
    assert not torch.allclose(random(volumes)["3d"], extractor(volumes)["3d"])


def test_medicalnet_extractor_names_the_file_that_does_not_fit(tmp_path: Path) -> None:
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(64, 1, 7, 7, 7)}}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth does not fit"):
        MedicalNetExtractor(depth=10, weights_path=str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match="missing.pth does not exist"):
        MedicalNetExtractor(depth=10, weights_path=str(tmp_path / "missing.pth"))


def test_slice_extractor_views_are_grouped_by_volume() -> None:
    extractor = SliceExtractor(depth=10, slices_per_plane=3)
    volumes = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    features = extractor(volumes)
    assert set(features) == {"axial", "coronal", "sagittal", "pooled"}
    assert features["axial"].shape[0] == 6 and features["pooled"].shape[0] == 18
    alone = extractor(volumes[1:])["pooled"]
    assert torch.allclose(features["pooled"][9:], alone, atol=1e-5)  # volume 1 owns rows 9..17


def test_fid_of_real_against_itself_is_zero_and_against_noise_larger(cohort_cache: Path) -> None:
    data = _cohort(cohort_cache)
    real = _split(data, "train") + _split(data, "val") + _split(data, "test")
    cache = FeatureCache([MedicalNetExtractor(depth=10)], {"all": real})
    same = distribution_records(cache, cache.features(real.volumes), real.labels, num_bootstrap=5, kid_subsets=5)
    noise = torch.rand_like(real.volumes) * 2 - 1
    noise = distribution_records(cache, cache.features(noise), real.labels, num_bootstrap=5, kid_subsets=5)
    fid_same = next(r for r in same if r["metric"] == "fid" and r["class"] == "all")
    fid_noise = next(r for r in noise if r["metric"] == "fid" and r["class"] == "all")
    assert abs(fid_same["value"]) < 1e-4 and fid_noise["value"] > 1.0
    assert {r["class"] for r in same} == {"all", "0", "1"}


def test_utility_protocol_reports_all_three_training_sets(cohort_cache: Path) -> None:
    data = _cohort(cohort_cache)
    train, test = _split(data, "train"), _split(data, "test")
    synthetic = LabelledVolumes(train.volumes.flip(2), train.labels)  # stand-in for generated volumes
    protocol = UtilityProtocol(channels=(8, 8), epochs=2, batch_size=4, seeds=(0, 1))
    for train_set in (train, synthetic, train + synthetic):
        results = protocol.evaluate(train_set, test, num_classes=2)
        assert set(results) == {"accuracy", "balanced_accuracy", "auroc"}
        for estimate in results.values():
            assert 0.0 <= estimate.value <= 1.0 and estimate.std is not None and estimate.std >= 0


def _evaluate(cache: Path, out: Path, *sources: str) -> None:
    main(["evaluate", "--data-config", str(REPO / "configs/data/template.yaml"),
          "--data.init_args.num_subjects", "8", "--data.init_args.spatial_size", "16",
          "--data.init_args.cache_dir", str(cache), "--data.init_args.val_fraction", "0.25",
          "--data.init_args.test_fraction", "0.25", "--num-samples", "4", "--steps", "2",
          "--bootstrap", "4", "--kid-subsets", "4", "--ms-ssim-pairs", "4",
          "--utility.channels", "[8,8]", "--utility.epochs", "1", "--utility.seeds", "[0]",
          "--extractors", '[{"class_path": "msrl.evaluation.MedicalNetExtractor"}, '
                          '{"class_path": "msrl.evaluation.SliceExtractor", "init_args": {"depth": 10, '
                          '"slices_per_plane": 2}}]',
          *sources, "--out", str(out)])  # the sources' options last: they override the defaults above


def test_evaluate_writes_metrics_json_with_every_field_and_report_draws_it(
        cohort_cache: Path, pretrained_checkpoint: Path, tmp_path: Path) -> None:
    main(["sample", "--checkpoint", str(pretrained_checkpoint), "--num-samples", "4", "--steps", "2",
          "--out", str(tmp_path / "drawn")])
    _evaluate(cohort_cache, tmp_path / "eval", "--checkpoint", str(pretrained_checkpoint),
              "--generated", str(tmp_path / "drawn"))
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["schema_version"] == 2 and len(result["extractors"]) == 2
    assert result["data"]["real_split"] == "test" and result["primary"]["extractor"] == result["extractors"][0]
    assert [e["name"] for e in result["entries"]] == ["last", "drawn"]
    for entry in result["entries"]:
        metrics = {(r["metric"], r["extractor"], r["view"]) for r in entry["records"]}
        for extractor in result["extractors"]:
            for metric in ("fid", "kid", "mmd"):
                assert any(m == (metric, extractor, v) for m in metrics for v in ("3d", "pooled", "axial"))
        assert {"ms_ssim", "utility/auroc", "utility/balanced_accuracy", "utility/accuracy"} <= {m[0] for m in metrics}
        for row in entry["records"]:
            assert {"metric", "value", "ci95", "extractor", "num_generated", "num_real", "class"} <= set(row)
            assert row["num_generated"] > 0
        assert {r["train_set"] for r in entry["records"] if "train_set" in r} == {"synthetic", "real+synthetic",
                                                                                   "real"}  # real: class fidelity
        fidelity = {r["class"]: r for r in entry["records"] if r["metric"] == "class_fidelity/accuracy"}
        assert set(fidelity) == {"all", "0", "1"} and all(0.0 <= r["value"] <= 1.0 for r in fidelity.values())
        assert sorted(fidelity["1"]["per_volume"] + fidelity["0"]["per_volume"]) == \
            sorted(fidelity["all"]["per_volume"])  # one classifier (one utility seed): each volume 0 or 1
    ceiling = {r["class"] for r in result["real"]["records"] if r["metric"] == "class_fidelity/accuracy"}
    assert ceiling == {"all", "0", "1"}  # the same classifiers on the held-out real volumes
    assert "checkpoint" in result["entries"][0]["source"] and "generated" in result["entries"][1]["source"]
    assert "| real data |" in (tmp_path / "eval" / "metrics.md").read_text()
    assert "class fidelity ↑ (class 1)" in (tmp_path / "eval" / "metrics.md").read_text()
    assert (tmp_path / "eval" / "samples" / "last" / "manifest.csv").is_file()

    run = tmp_path / "runs" / "finetune" / "version_0"
    with SummaryWriter(str(run)) as writer:
        for step in range(5):
            writer.add_scalar("ppo/reward/slice2d", 0.1 * step, step)
            writer.add_scalar("ppo/heldout_fid", 3.0 - 0.2 * step, step)
    main(["report", str(tmp_path / "eval"), str(run), "--out", str(tmp_path / "report")])
    pngs = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert {"reward_curves.png", "eval0_metrics.png", "eval0_slices_class0.png", "eval0_slices_class1.png",
            "eval0_histograms.png"} <= pngs
    page = (tmp_path / "report" / "report.html").read_text()
    assert "brightest compact cluster" in page and "class fidelity ↑ (class 1)" in page
    assert all(name in page for name in pngs) and "<table>" in page


def test_tuning_on_val_never_reads_the_test_split(cohort_cache: Path, pretrained_checkpoint: Path,
                                                  tmp_path: Path) -> None:
    """With --real-split val the utility classifiers test on val too: a cohort with no test split evaluates."""
    _evaluate(cohort_cache, tmp_path / "eval", "--checkpoint", str(pretrained_checkpoint),
              "--data.init_args.test_fraction", "0.0", "--real-split", "val", "--extractors",
              '[{"class_path": "msrl.evaluation.MedicalNetExtractor"}]')
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["data"]["utility_test_split"] == "val" and result["data"]["num_test"] == 2
    assert any(r["metric"] == "utility/balanced_accuracy" for r in result["entries"][0]["records"])
    assert "(val split)" in (tmp_path / "eval" / "metrics.md").read_text()


def test_skip_utility_needs_no_test_split(cohort_cache: Path, pretrained_checkpoint: Path, tmp_path: Path) -> None:
    _evaluate(cohort_cache, tmp_path / "eval", "--checkpoint", str(pretrained_checkpoint),
              "--data.init_args.test_fraction", "0.0", "--real-split", "val", "--skip-utility", "true", "--extractors",
              '[{"class_path": "msrl.evaluation.MedicalNetExtractor"}]')
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["data"]["num_test"] is None
    assert not any(r["metric"].startswith(("utility/", "class_fidelity/")) for r in result["entries"][0]["records"])
    assert "no utility)" in (tmp_path / "eval" / "metrics.md").read_text()


def test_evaluate_refuses_missing_sources_before_any_compute(cohort_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _evaluate(cohort_cache, tmp_path / "eval", "--checkpoint", str(tmp_path / "nope.ckpt"))
    assert not (tmp_path / "eval").exists()


def test_classifier_extractor_uses_the_classifiers_penultimate_layer(tmp_path: Path) -> None:
    import lightning as L

    from lightning_modules.critics.networks import ClassifierModule

    module = ClassifierModule(in_channels=1, spatial_size=16, num_classes=2, channels=(8, 8))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "classifier.ckpt")
    extractor = ClassifierFeatureExtractor(str(tmp_path / "classifier.ckpt"))
    assert extractor.name.startswith("indomain-classifier-")
    assert extractor(torch.rand(3, 1, 16, 16, 16))["3d"].shape == (3, 16)


RULES_REWARD = ('{"class_path": "rewards.MultiScaleReward", "init_args": {"components": ['
                '{"class_path": "rewards.InterSliceContinuityReward"}, '
                '{"class_path": "rewards.BrainMaskPlausibilityReward"}], "weights": [1.0, 0.5]}}')


def test_evaluate_pairs_checkpoints_at_both_samplers_and_scores_the_trained_reward(
        cohort_cache: Path, pretrained_checkpoint: Path, tmp_path: Path) -> None:
    from tests.lightning_modules.test_ppo import _finetune

    run = _finetune(pretrained_checkpoint, tmp_path / "runs", "--model.reward", RULES_REWARD, "--model.num_steps", "4",
                    "--trainer.max_epochs", "1", "--model.iterations_per_epoch", "1")
    finetuned = run / "checkpoints" / "last.ckpt"
    _evaluate(cohort_cache, tmp_path / "eval", "--checkpoint", str(pretrained_checkpoint), "--checkpoint",
              str(finetuned), "--names", "[pre, fine]", "--utility.seeds", "[0, 1]", "--paired-bootstrap", "20")
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # each checkpoint at the evaluation sampler (2 steps, η 0) and at the fine-tuned run's rollout sampler (4, η 1)
    assert [e["name"] for e in result["entries"]] == ["pre", "pre [ddim4-eta1]", "fine", "fine [ddim4-eta1]"]
    assert [e["sampling"]["label"] for e in result["entries"]] == ["ddim2-eta0", "ddim4-eta1"] * 2
    assert all(row["sampler"] == entry["sampling"]["label"] for entry in result["entries"] for row in entry["records"])
    # the reward that trained "fine", raw, on every set of volumes (the real ones included)
    assert result["reward"]["from"] == str(finetuned)
    for records in [result["real"]["records"]] + [e["records"] for e in result["entries"]]:
        assert {"reward_raw/continuity", "reward_raw/mask", "reward_raw/total"} <= {r["metric"] for r in records}
    # the utility of the second seed is trained on an independent draw
    synthetic = next(r for r in result["entries"][0]["records"] if r["metric"] == "utility/auroc"
                     and r["train_set"] == "synthetic")
    assert len(synthetic["per_seed"]) == 2
    # accuracy rows keep each held-out test volume's prediction per seed; the comparison resamples those volumes
    balanced = next(r for r in result["entries"][0]["records"] if r["metric"] == "utility/balanced_accuracy"
                    and r["train_set"] == "synthetic")
    num_test = len(balanced["test_labels"])
    assert num_test == balanced["num_real"] and [len(p) for p in balanced["per_test_volume"]] == [num_test] * 2
    paired_utility = next(r for r in result["comparisons"][0]["records"] if r["metric"] == "utility/balanced_accuracy"
                          and r["train_set"] == "synthetic")
    assert paired_utility["num_volumes"] == num_test and paired_utility["num_seeds"] == 2
    # paired: fine − pre at each sampler, every distribution metric per extractor, reward and utility
    assert [(c["candidate"], c["baseline"]) for c in result["comparisons"]] == [
        ("fine", "pre"), ("fine [ddim4-eta1]", "pre [ddim4-eta1]")]
    for comparison in result["comparisons"]:
        metrics = {(r["metric"], r.get("extractor")) for r in comparison["records"] if r["class"] == "all"}
        for extractor in result["extractors"]:
            assert {("fid", extractor), ("kid", extractor), ("mmd", extractor)} <= metrics
        assert ("reward_raw/total", None) in metrics
        fidelity = {r["class"] for r in comparison["records"] if r["metric"] == "class_fidelity/accuracy"}
        assert fidelity == {"all", "0", "1"}  # paired volume by volume, every sampler
        for row in comparison["records"]:
            low, high = row["ci95"]
            assert row["verdict"] in ("better", "worse", "no difference") and low <= high
            assert row["difference"] == pytest.approx(row["candidate"] - row["baseline"], abs=1e-9) \
                or row["metric"].startswith(("fid", "kid", "mmd"))
    memorised = [r for r in result["entries"][0]["records"] if r["metric"].startswith("memorisation/")]
    assert {r["extractor"] for r in memorised} == {result["extractors"][0], None}  # features and voxels
    assert all(0.0 <= r["value"] <= 1.0 for r in memorised)
    text = (tmp_path / "eval" / "metrics.md").read_text()
    assert text.index("## Paired differences") < text.index("## Summary")
    assert "fine − pre" in text and ("Beyond their 95 % interval" in text or "No difference between" in text)


def test_evaluate_refuses_an_extractor_that_loads_a_reward_network(tmp_path: Path) -> None:
    from datamodules.digest import sha256_of
    from msrl.evaluation.independence import refuse_shared_weights

    torch.save({"weights": torch.zeros(3)}, tmp_path / "critic.ckpt")
    digest = sha256_of(tmp_path / "critic.ckpt")
    networks = [{"component": "slice2d", "path": "runs/critics/last.ckpt", "sha256": digest, "checkpoint": "fine.ckpt"}]
    extractor = MedicalNetExtractor(depth=10)
    refuse_shared_weights([extractor], networks, None)  # random weights: nothing shared
    extractor.checkpoint_path = str(tmp_path / "critic.ckpt")
    with pytest.raises(ValueError, match="reward component 'slice2d'"):
        refuse_shared_weights([extractor], networks, None)
    with pytest.raises(ValueError, match="shares weights with the reward"):  # the same tensors inside the reward
        refuse_shared_weights([extractor], [], torch.nn.Sequential(extractor.network))


@pytest.mark.parametrize("depth, speck", [(4, 11), (11, 5)])
def test_the_class1_figure_picks_the_axial_slice_through_a_bright_blob(depth: int, speck: int,
                                                                       tmp_path: Path) -> None:
    """A 3³ blob inside a noisy brain beats a brighter single voxel and the middle slice (8)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    brain = ((grid - 8) ** 2).sum(0) <= 36
    noise = 0.1 * torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(0))
    volume = torch.where(brain, noise, torch.tensor(-1.0))
    volume[7:10, 6:9, depth - 1 : depth + 2] = 0.8  # the blob, centred at (8, 7, depth)
    volume[8, 9, speck] = 1.0  # one bright voxel: noise, not a cluster
    assert brightest_cluster(volume[None]) == (8, 7, depth)
    labels = torch.tensor([1, 1])
    sources = {"real": (torch.stack([volume[None]] * 2), labels)}
    plain = slice_comparison(sources, 1, tmp_path / "plain.png")
    marked = slice_comparison(sources, 1, tmp_path / "marked.png", brightest=True)
    width = lambda path: plt.imread(path).shape[1]  # noqa: E731
    assert width(marked) == pytest.approx(width(plain) * 4 / 3, rel=0.02)  # a fourth column per volume
    with pytest.raises(ValueError, match="no voxel above the background"):
        brightest_cluster(torch.full((1, 4, 4, 4), -1.0))
