"""The utility task: its classifier, its intervals and seeds, and (slow) that it works on the embedded cohort."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from datamodules import TemplateCohortDataModule
from datamodules.template import synthesise_subject
from lightning_modules.critics.networks import PooledConvNet
from msrl.evaluation.utility import LabelledVolumes, UtilityNet, UtilityProtocol, summarise
from tests.conftest import REPO

TINY = dict(channels=(8, 8), downsample=1, epochs=10, batch_size=8, max_shift=1, lr=1e-2)


def _blobs(count: int, seed: int, size: int = 16) -> LabelledVolumes:
    """A toy task: noisy volumes; class 1 has a bright 3³ cube at a random place (as the lesion is)."""
    generator = torch.Generator().manual_seed(seed)
    volumes = torch.rand(count, 1, size, size, size, generator=generator) * 0.4 - 0.2
    labels = torch.arange(count) % 2
    for i in torch.nonzero(labels).flatten().tolist():
        x, y, z = torch.randint(2, size - 5, (3,), generator=generator).tolist()
        volumes[i, 0, x : x + 3, y : y + 3, z : z + 3] = 0.9
    return LabelledVolumes(volumes, labels)


def test_utility_classifier_is_not_the_reward_network() -> None:
    network = UtilityNet(1, 2, channels=(4, 8, 8), downsample=2)
    assert not any(isinstance(module, PooledConvNet) for module in network.modules())
    assert any(isinstance(module, torch.nn.BatchNorm3d) for module in network.modules())  # the reward's: instance
    assert network(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 2)


def test_protocol_learns_a_focal_lesion_and_reports_per_seed_runs() -> None:
    protocol = UtilityProtocol(**TINY, seeds=(0, 1))
    runs = protocol.runs(_blobs(40, seed=0), _blobs(24, seed=1), num_classes=2)
    assert len(runs) == 2 and all(set(run) == {"accuracy", "balanced_accuracy", "auroc", "predicted"} for run in runs)
    assert all(run["balanced_accuracy"] >= 0.9 for run in runs), runs
    labels = _blobs(24, seed=1).labels.tolist()
    for run in runs:  # each test volume's predicted class, in test order: the accuracy follows from it
        assert len(run["predicted"]) == 24
        right = sum(p == y for p, y in zip(run["predicted"], labels, strict=True))
        assert run["accuracy"] == pytest.approx(right / 24)


def test_batch_norm_statistics_are_those_of_the_training_volumes() -> None:
    """A few dozen steps leave running averages near their initial values: they are refitted exactly."""
    data = _blobs(16, seed=5)  # two full batches: the refit averages batch means
    network = UtilityProtocol(**{**TINY, "epochs": 1}, seeds=(0,)).train(data, num_classes=2, seed=0)
    stem = network.features[0]
    with torch.no_grad():
        features = stem.conv(data.volumes)
    assert torch.allclose(stem.adn.N.running_mean, features.mean(dim=(0, 2, 3, 4)), atol=1e-5)


def test_one_training_set_per_seed_trains_the_ith_set_with_the_ith_seed() -> None:
    first, second, test = _blobs(8, seed=2), _blobs(8, seed=3), _blobs(8, seed=4)
    both = UtilityProtocol(**{**TINY, "epochs": 2}, seeds=(5, 6)).runs([first, second], test, num_classes=2)
    alone = [UtilityProtocol(**{**TINY, "epochs": 2}, seeds=(seed,)).runs(data, test, num_classes=2)[0]
             for seed, data in ((5, first), (6, second))]
    assert both == alone
    with pytest.raises(ValueError, match="2 training sets for 3 seeds"):
        UtilityProtocol(**TINY, seeds=(0, 1, 2)).runs([first, second], test, num_classes=2)
    with pytest.raises(ValueError, match="two classes"):
        UtilityProtocol(**TINY, seeds=(0,)).runs(LabelledVolumes(first.volumes, first.labels * 0), test, 2)


def test_summary_is_mean_std_and_t_quantile_interval() -> None:
    runs = [{"accuracy": a, "balanced_accuracy": a, "auroc": a} for a in (0.8, 0.9, 1.0)]
    estimate = summarise(runs)["balanced_accuracy"]
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) · std / √n
    assert estimate.value == pytest.approx(0.9) and estimate.std == pytest.approx(0.1)
    assert estimate.ci95 == pytest.approx((0.9 - half, 0.9 + half), abs=1e-5)
    single = summarise(runs[:1])["auroc"]
    assert single.value == pytest.approx(0.8) and all(math.isnan(bound) for bound in single.ci95)


def rim_above_white_matter(healthy: torch.Tensor, lesion: torch.Tensor) -> float:
    """How far a lesion subject's brightest voxels (the rim) sit above its brightest white matter.

    The two subjects differ only in the lesion, so the healthy twin's brightest 1 % of the brain
    locates the brightest white matter; the result is the lesion subject's 99.9th brain percentile
    minus its median value at those positions.
    """
    brain = healthy[0] > -0.95
    white = brain & (healthy[0] >= torch.quantile(healthy[0][brain], 0.99))
    return float(torch.quantile(lesion[0][brain], 0.999) - lesion[0][white].median())


def test_lesion_rim_stands_apart_from_white_matter_after_preprocessing() -> None:
    """Intensity scaling must not map the enhancing rim onto the brightest white matter (+1 in both)."""
    module = TemplateCohortDataModule(spatial_size=32)
    healthy, lesion = (module.preprocess(synthesise_subject(1, label, seed=0, resolution=2)).image for label in (0, 1))
    assert rim_above_white_matter(healthy, lesion) >= 0.3


def _split(dataset: torch.utils.data.Dataset) -> LabelledVolumes:
    items = [dataset[i] for i in range(len(dataset))]
    return LabelledVolumes(torch.stack([item["image"] for item in items]),
                           torch.stack([item["label"] for item in items]))


def _demo_cohort() -> TemplateCohortDataModule:
    """The demo's cohort at 64³ (160 subjects: 64 train, 32 val, 64 test), built once and reused."""
    cache = Path(os.environ.get("MSRL_TEST_CACHE", REPO / "data/cache"))
    data = TemplateCohortDataModule(num_subjects=160, spatial_size=64, template_resolution=2, cache_dir=cache,
                                    val_fraction=0.2, test_fraction=0.4)
    data.prepare_data()
    data.setup("test")
    return data


@pytest.mark.slow
def test_real_trained_classifier_finds_the_lesion_on_the_64_cohort() -> None:
    """Issue #30: balanced accuracy ≥ 0.95 on ≥ 32 held-out volumes per class, trained on real volumes."""
    data = _demo_cohort()
    train, test = (_split(data.datasets[name]) for name in ("train", "test"))
    assert min(int((test.labels == label).sum()) for label in (0, 1)) >= 32
    start = time.perf_counter()
    runs = UtilityProtocol().runs(train, test, data.num_classes)
    seconds = (time.perf_counter() - start) / len(runs)  # reported, not asserted: it depends on the machine's load
    print(f"utility on the 64³ cohort: {runs}, {seconds:.1f} s per classifier")
    assert all(run["balanced_accuracy"] >= 0.95 for run in runs), runs


def _intensity_statistics(dataset: torch.utils.data.Dataset, healthy_only: bool) -> torch.Tensor:
    """Per volume: mean, std and the 5/25/50/75/95th percentiles of the healthy brain (or the whole brain)."""
    rows = []
    for index in range(len(dataset)):
        cached = torch.load(dataset.files[index], weights_only=True)
        region = cached["mask"] & (cached["seg"] == 0) if healthy_only else cached["mask"]
        values = cached["image"][region].double()
        quantiles = torch.quantile(values, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
        rows.append(torch.cat([values.mean()[None], values.std()[None], quantiles]))
    return torch.stack(rows)


def _logistic_balanced_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                                test_y: torch.Tensor) -> float:
    """An L2-regularised logistic regression on standardised features: balanced accuracy on the test set."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weights = torch.zeros(train_x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], max_iter=200)

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        logits = train_x @ weights[:-1] + weights[-1]
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, train_y.double())
        value = value + 1e-3 * (weights[:-1] ** 2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    predicted = (test_x @ weights[:-1] + weights[-1] > 0).long()
    return float(sum((predicted[test_y == k] == k).double().mean() for k in (0, 1)) / 2)


@pytest.mark.slow
def test_global_intensity_statistics_of_the_healthy_tissue_do_not_tell_the_class() -> None:
    """Issue #30: the class lives in the lesion: healthy-tissue statistics are at chance on the test split.

    The same classifier on the whole brain's statistics (lesion included) must find the class, so
    the test could fail: it is the lesion, not the classifier, that carries the label.
    """
    data = _demo_cohort()
    train, test = data.datasets["train"], data.datasets["test"]
    train_y = torch.tensor([r.label for r in train.records])
    test_y = torch.tensor([r.label for r in test.records])
    healthy = _logistic_balanced_accuracy(_intensity_statistics(train, True), train_y,
                                          _intensity_statistics(test, True), test_y)
    whole = _logistic_balanced_accuracy(_intensity_statistics(train, False), train_y,
                                        _intensity_statistics(test, False), test_y)
    print(f"balanced accuracy on {len(test_y)} test volumes: healthy-tissue statistics {healthy:.3f}, "
          f"whole-brain statistics {whole:.3f}")
    assert whole >= 0.8
    assert abs(healthy - 0.5) <= 0.15  # 64 volumes: one binomial sd of chance is 0.0625
