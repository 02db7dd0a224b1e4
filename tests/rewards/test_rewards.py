"""Tests of the reward contract, the rule-based and learned rewards, and the multi-scale composite."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import TemplateCohortDataModule
from lightning_modules.slices import SliceSampler
from msrl.cli import main
from rewards import (
    BrainMaskPlausibilityReward,
    ClassifierReward,
    HemisphericSymmetryReward,
    IntensityHistogramReward,
    InterSliceContinuityReward,
    MultiScaleReward,
    SliceCriticReward,
    VolumeCriticReward,
    score_components,
)
from rewards.slice2d import aggregate
from tests.conftest import REPO


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> TemplateCohortDataModule:
    """24 template subjects at 16³ (enough held-out volumes to measure a critic)."""
    data = TemplateCohortDataModule(num_subjects=24, spatial_size=16, cache_dir=tmp_path_factory.mktemp("c24"),
                                    val_fraction=0.25, test_fraction=0.0, batch_size=4)
    data.prepare_data()
    data.setup("fit")
    return data


def _real(cohort: TemplateCohortDataModule, split: str = "val",
          label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    items = [item for item in (cohort.datasets[split][i] for i in range(len(cohort.datasets[split])))
             if label is None or int(item["label"]) == label]
    return torch.stack([i["image"] for i in items]), torch.stack([i["label"] for i in items])


def _noise_like(volumes: torch.Tensor) -> torch.Tensor:
    return torch.rand(volumes.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _degraded(volumes: torch.Tensor) -> torch.Tensor:
    from lightning_modules.critics.realism_data import mri_artefacts

    torch.manual_seed(0)
    return torch.stack([mri_artefacts()(v).clamp(-1, 1).float() for v in volumes])


@pytest.mark.parametrize("make", [
    lambda data: InterSliceContinuityReward(),
    lambda data: HemisphericSymmetryReward(),
    lambda data: BrainMaskPlausibilityReward(),
    lambda data: IntensityHistogramReward(data),
], ids=["continuity", "symmetry", "mask", "histogram"])
def test_rule_rewards_keep_the_contract_and_prefer_real_volumes(make, cohort: TemplateCohortDataModule) -> None:
    reward = make(cohort)
    real, labels = _real(cohort, label=0)
    noise = _noise_like(real)
    for volumes in (real, noise, real.double()):
        values, components = score_components(reward, volumes, labels)
        assert values.shape == (len(real),) and torch.isfinite(values).all() and reward.name in components
    # the median real volume: since generator version 7 a lesion sets its volume's intensity scaling, so the
    # pooled training histogram (both classes) sits between a healthy and a lesion volume's, and on this
    # 8-subject 16³ cohort one healthy volume scores like noise on the histogram reward (seen: -0.199 vs -0.180)
    assert reward(real, labels).median() > reward(noise, labels).max()


def test_symmetry_can_leave_lesion_classes_alone() -> None:
    volumes = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    rewards = HemisphericSymmetryReward(classes=[0])(volumes, torch.tensor([0, 1]))
    assert rewards[0] < 0 and rewards[1] == 0


def test_slice_sampler_draws_from_all_three_planes_inside_the_brain() -> None:
    size = 12
    x = torch.arange(size).float().view(size, 1, 1).expand(size, size, size)
    volume = (x / size * 2 - 1).clone()
    volume[:, :, :3] = -1.0  # the bottom axial slices are background: never drawn
    slices = SliceSampler(slices_per_plane=3, mode="fixed")(volume[None, None])
    assert slices.shape == (1, 9, 1, size, size)
    axial, coronal, sagittal = slices[0, :3, 0], slices[0, 3:6, 0], slices[0, 6:, 0]
    assert all(s.std() > 0 for s in axial) and all(s.std() > 0 for s in coronal)
    assert all(s.unique().numel() == 1 for s in sagittal[:, :, 3:])  # fixed x: constant within the brain
    assert (axial > -1).float().mean() > 0.5  # axial slices come from the brain, not the empty bottom
    random = SliceSampler(slices_per_plane=3, mode="random")
    draws = [random(volume[None, None], torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert aggregate(scores, "mean") == 2.5 and aggregate(scores, "min") == 1.0
    assert aggregate(scores, "quantile", 0.0) == 1.0


class _Scaled(torch.nn.Module):
    def __init__(self, scale: float, name: str) -> None:
        super().__init__()
        self.scale, self.name = scale, name

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * volumes.mean(dim=(1, 2, 3, 4))


def test_multiscale_normalises_each_component_so_weights_mean_what_they_say() -> None:
    volumes = torch.randn(16, 1, 4, 4, 4)
    composite = MultiScaleReward([_Scaled(1000.0, "big"), _Scaled(0.001, "small")], weights=[1.0, 1.0])
    total, components = composite.score(volumes)
    assert set(components) == {"big", "small"}
    standard = (components["big"] - components["big"].mean()) / components["big"].std(unbiased=False)
    torch.testing.assert_close(total, 2 * standard, atol=1e-4, rtol=1e-4)  # equal say despite 10⁶× scales
    only_small = MultiScaleReward([_Scaled(1000.0, "big"), _Scaled(0.001, "small")], weights=[0.0, 3.0])
    torch.testing.assert_close(only_small(volumes), 3 * standard, atol=1e-3, rtol=1e-3)
    raw = MultiScaleReward([_Scaled(2.0, "a"), _Scaled(1.0, "b")], weights=[1.0, 0.5], normalise=False)
    torch.testing.assert_close(raw(volumes), 2.5 * volumes.mean(dim=(1, 2, 3, 4)))


def test_multiscale_scales_frozen_after_warm_up_keep_a_saturated_component_quiet() -> None:
    """A component whose spread collapses (saturation) must not get huge advantages from its noise."""
    def run(freeze_after: int | None) -> torch.Tensor:
        composite = MultiScaleReward([_Scaled(1.0, "saturating")], freeze_after=freeze_after, momentum=0.5)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):  # warm-up: the component varies (std ~1)
            composite.score(torch.randn(16, 1, 4, 4, 4, generator=generator) * 8)
        for _ in range(40):  # saturated: the same value up to noise of 1e-3 per volume
            noise = 1e-3 * torch.randn(16, 1, 1, 1, 1, generator=generator)
            total, _ = composite.score((1 + noise).expand(-1, 1, 4, 4, 4))
        return total

    assert run(freeze_after=None).std() > 0.5  # the running std shrinks to the noise's: noise becomes signal
    assert run(freeze_after=3).std() < 0.01  # scales of the warm-up: the noise stays small
    with pytest.raises(ValueError, match="freeze_after"):
        MultiScaleReward([_Scaled(1.0, "a")], freeze_after=0)


def test_continuity_with_a_real_target_lets_neither_blur_nor_a_blank_volume_win(
        cohort: TemplateCohortDataModule) -> None:
    real, labels = _real(cohort, label=0)
    target = float(InterSliceContinuityReward(background=-0.95).jump(real).mean())
    blurred = torch.nn.functional.avg_pool3d(real, 3, stride=1, padding=1, count_include_pad=False)
    blank = torch.full_like(real, -1.0)
    plain, anchored = InterSliceContinuityReward(background=-0.95), \
        InterSliceContinuityReward(background=-0.95, target=target)
    assert plain(blurred).mean() > plain(real).mean() and plain(blank).mean() >= plain(real).mean()  # the flaw
    assert anchored(real).mean() > anchored(blurred).mean()
    assert anchored(real).mean() > anchored(blank).mean()
    assert anchored(real).mean() > anchored(_noise_like(real)).mean()


def test_multiscale_names_the_component_that_returns_nan() -> None:
    class Broken(torch.nn.Module):
        name = "broken"

        def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            return torch.full((volumes.shape[0],), float("nan"))

    with pytest.raises(FloatingPointError, match="broken"):
        MultiScaleReward([_Scaled(1.0, "fine"), Broken()])(torch.randn(2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="distinct"):
        MultiScaleReward([_Scaled(1.0, "same"), _Scaled(2.0, "same")])


def test_learned_rewards_without_checkpoint_say_how_to_train_one() -> None:
    with pytest.raises(ValueError, match="msrl train-reward -c configs/rewards/critics.yaml"):
        SliceCriticReward()
    with pytest.raises(ValueError, match="msrl train-reward -c configs/rewards/classifier.yaml"):
        ClassifierReward(checkpoint="nowhere.ckpt")


@pytest.fixture(scope="module")
def trained_rewards(cohort: TemplateCohortDataModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Critics and classifier trained briefly through `msrl train-reward` on the 16³ cohort."""
    runs = tmp_path_factory.mktemp("reward_runs")
    data = {".init_args.num_subjects": "24", ".init_args.spatial_size": "16",
            ".init_args.cache_dir": str(cohort.cache_dir), ".init_args.val_fraction": "0.25",
            ".init_args.test_fraction": "0.0"}
    common = ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs),
              "--model.init_args.channels", "[8,16,16]"]
    main(["train-reward", "-c", str(REPO / "configs/rewards/critics.yaml"), *common, "--trainer.max_epochs", "30",
          *[item for key, value in data.items() for item in (f"--data.init_args.data{key}", value)]])
    main(["train-reward", "-c", str(REPO / "configs/rewards/classifier.yaml"), *common, "--trainer.max_epochs", "2",
          *[item for key, value in data.items() for item in (f"--data{key}", value)]])
    return runs


def test_trained_critics_beat_chance_and_score_real_above_degraded(trained_rewards: Path,
                                                                   cohort: TemplateCohortDataModule) -> None:
    events = EventAccumulator(str(trained_rewards / "critics/version_0")).Reload()
    assert events.Scalars("val/auroc_volume3d")[-1].value > 0.7  # seen: 0.75–0.89 after epoch 10
    assert events.Scalars("val/auroc_slice2d")[-1].value > 0.55  # seen: 0.6–0.77 over the last epochs
    checkpoint = str(trained_rewards / "critics/version_0/checkpoints/last.ckpt")
    real, labels = _real(cohort)
    degraded = _degraded(real)
    for reward in (VolumeCriticReward(checkpoint), SliceCriticReward(checkpoint, how="quantile", quantile=0.25)):
        values, _ = score_components(reward, real, labels)
        assert values.shape == (len(real),) and torch.isfinite(values).all()
        assert reward(real, labels).mean() > reward(degraded, labels).mean(), reward.name


def test_classifier_reward_scores_the_conditioned_class(trained_rewards: Path,
                                                        cohort: TemplateCohortDataModule) -> None:
    reward = ClassifierReward(str(trained_rewards / "classifier/version_0/checkpoints/last.ckpt"))
    real, labels = _real(cohort)
    log_p = reward(real, labels)
    assert log_p.shape == labels.shape and (log_p <= 0).all()
    torch.testing.assert_close(log_p.exp() + reward(real, 1 - labels).exp(), torch.ones_like(log_p))
    with pytest.raises(ValueError, match="class labels"):
        reward(real, None)


@pytest.mark.parametrize("name, expected", [
    ("multiscale.yaml", ["slice2d", "volume3d", "continuity", "mask", "classifier"]),
    ("multiscale_differentiable.yaml", ["slice2d", "volume3d", "continuity", "classifier"]),  # reward backpropagation's
])
def test_multiscale_yaml_builds_with_trained_networks(trained_rewards: Path, tmp_path: Path, name: str,
                                                      expected: list[str]) -> None:
    from rewards import non_differentiable_parts

    text = (REPO / "configs/rewards" / name).read_text()
    text = text.replace("runs/critics/version_0", str(trained_rewards / "critics/version_0"))
    text = text.replace("runs/classifier/version_0", str(trained_rewards / "classifier/version_0"))
    config = tmp_path / "multiscale.yaml"
    config.write_text(text)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(torch.nn.Module, "reward")  # as `model.reward` of a finetune config
    reward = parser.instantiate_classes(parser.parse_args(["--reward", str(config)])).reward
    assert isinstance(reward, MultiScaleReward)
    assert reward.names == expected
    assert bool(non_differentiable_parts(reward)) == ("mask" in expected)  # only the mask rule has no gradient
    total, components = reward.score(torch.rand(3, 1, 16, 16, 16) * 2 - 1, torch.tensor([0, 1, 0]))
    assert total.shape == (3,) and len(components) == len(expected)


def test_random_flips_mirror_spatial_axes_only_and_every_one_of_them() -> None:
    """Channels keep their order (BraTS modalities) and each of D, H, W is mirrored in some draws."""
    import torch

    from lightning_modules.critics import random_flips

    torch.manual_seed(0)
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(1, 2, 3, 4, 5)
    volumes = base.repeat(64, 1, 1, 1, 1)
    out = random_flips(volumes)
    seen = set()
    for volume in out:
        match = [dims for dims in ([], [1], [2], [3], [1, 2], [1, 3], [2, 3], [1, 2, 3])
                 if torch.equal(volume, base[0].flip(dims) if dims else base[0])]
        assert match, "a volume that is not a mirror of the input along spatial axes (channels moved?)"
        seen.update(match[0])
    assert seen == {1, 2, 3}  # D, H and W (dims 1-3 of one volume) were each mirrored at least once
