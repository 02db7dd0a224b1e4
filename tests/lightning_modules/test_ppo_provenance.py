"""Raw rewards in PPO's logs, the held-out guard at iteration 0 on raw rewards, and what a fine-tuned
checkpoint records (rollout sampler, reward config and networks) to rebuild its reward."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules import TemplateCohortDataModule
from datamodules.digest import sha256_of
from lightning_modules.critics.networks import RealismCriticModule
from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.evaluation import MedicalNetExtractor
from msrl.evaluation.heldout_guard import HeldoutFIDGuard
from msrl.evaluation.metrics import fid
from rewards import (
    MultiScaleReward,
    VolumeCriticReward,
    raw_reward_scores,
    reward_from_checkpoint,
)
from tests.lightning_modules.test_ppo import _finetune, _scalars

ITERATIONS = 4


class RisingReward(torch.nn.Module):
    """Raw reward rising linearly from 0 to 3 over `ITERATIONS` calls, whatever the volumes (spread 0.1)."""

    name = "rising"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        value = 3.0 * self.calls / (ITERATIONS - 1) + 0.1 * torch.linspace(-1, 1, volumes.shape[0])
        self.calls += 1
        return value.to(volumes.device)


@pytest.fixture(scope="module")
def critic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny 16³ realism critic saved as `msrl train-reward` would (weights and hyper-parameters)."""
    torch.manual_seed(0)
    critic = RealismCriticModule(spatial_size=16, channels=(4, 4))
    path = tmp_path_factory.mktemp("critic") / "last.ckpt"
    torch.save({"state_dict": critic.state_dict(), "hyper_parameters": dict(critic.hparams)}, path)
    return path


def _reward_config(critic: Path) -> dict:
    return {"class_path": "rewards.MultiScaleReward", "init_args": {
        "components": [{"class_path": "tests.lightning_modules.test_ppo_provenance.RisingReward"},
                       {"class_path": "rewards.VolumeCriticReward", "init_args": {"checkpoint": str(critic)}}],
        "weights": [1.0, 0.0]}}


@pytest.fixture(scope="module")
def run(pretrained_checkpoint: Path, cohort_cache: Path, critic_checkpoint: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 PPO iterations (2 DDIM steps, 4 samples) against the rising reward, the held-out guard every 2 iterations."""
    guard = [{"class_path": "msrl.evaluation.HeldoutFIDGuard", "init_args": {
        "data": {"class_path": "datamodules.TemplateCohortDataModule", "init_args": {
            "num_subjects": 8, "spatial_size": 16, "cache_dir": str(cohort_cache), "val_fraction": 0.25}},
        "extractor": {"class_path": "msrl.evaluation.MedicalNetExtractor"}, "every_n_iterations": 2,
        "num_samples": 2}}]
    return _finetune(pretrained_checkpoint, tmp_path_factory.mktemp("provenance"), "--trainer.max_epochs", "1",
                     "--model.iterations_per_epoch", str(ITERATIONS), "--model.num_steps", "2", "--model.eta", "0.7",
                     "--model.samples_per_iteration", "4",  # 2 per class: advantages ±1 (1 per class would be 0)
                     "--model.reward", json.dumps(_reward_config(critic_checkpoint)),
                     "--trainer.callbacks", json.dumps(guard))


def test_raw_reward_rises_while_the_normalised_one_falls(run: Path) -> None:
    normalised, raw = _scalars(run, "ppo/reward/mean"), _scalars(run, "ppo/reward_raw/total")
    assert raw == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-5)  # the weighted raw sum (critic weight 0)
    assert _scalars(run, "ppo/reward_raw/rising") == pytest.approx(raw, abs=1e-5)
    assert len(_scalars(run, "ppo/reward_raw/volume3d")) == ITERATIONS
    assert all(later < earlier for earlier, later in zip(normalised[1:], normalised[2:], strict=False)), normalised
    heldout = _scalars(run, "ppo/heldout_fid")  # iterations 0 (before any update), 1, 2, 4
    assert len(heldout) == 4 and all(v > 0 and math.isfinite(v) for v in heldout)
    assert _scalars(run, "ppo/heldout_fid_iteration") == [0.0, 1.0, 2.0, 4.0]  # logged at those steps too


def test_checkpoint_records_rollout_sampler_and_reward(run: Path, critic_checkpoint: Path) -> None:
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["msrl_rollout"] == {"num_steps": 2, "eta": 0.7, "guidance_scale": 1.0}
    record = checkpoint["msrl_reward"]
    assert record["config"]["class_path"] == "rewards.MultiScaleReward"
    assert record["config"]["init_args"]["weights"] == [1.0, 0.0]
    assert record["networks"] == [{"component": "volume3d", "path": str(critic_checkpoint),
                                   "sha256": sha256_of(critic_checkpoint)}]


def test_guard_measures_the_pretrained_policy_at_iteration_0(run: Path, pretrained_checkpoint: Path,
                                                             cohort_cache: Path) -> None:
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("HeldoutFIDGuard")]
    assert [h[0] for h in state["history"]] == [0, 1, 2, 4]
    # the FID at iteration 0 is the pretrained policy's, sampled like the rollouts (2 steps, η = 0.7)
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cohort_cache, val_fraction=0.25)
    guard = HeldoutFIDGuard(data, MedicalNetExtractor(), num_samples=2)
    pretrained = PPOFinetuneModule(str(pretrained_checkpoint), RisingReward(), num_steps=2, eta=0.7)
    guard.setup(None, pretrained, "fit")

    def heldout_fid(eta: float) -> float:
        volumes = pretrained.policy.generate(2, num_steps=2, eta=eta, seed=guard.seed)
        return fid(guard._real_features, guard._features(volumes))

    assert state["history"][0][1] == pytest.approx(heldout_fid(0.7), rel=1e-5)
    assert heldout_fid(0.0) != pytest.approx(heldout_fid(0.7), rel=1e-4)  # η = 0 would be another sampler
    assert state["history"][1][1] != pytest.approx(state["history"][0][1], rel=1e-6)  # one iteration moved the policy


def test_reward_from_checkpoint_rebuilds_the_same_raw_scores(run: Path, critic_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    rebuilt = reward_from_checkpoint(checkpoint)
    original = MultiScaleReward([RisingReward(), VolumeCriticReward(str(critic_checkpoint))], weights=[1.0, 0.0])
    volumes, labels = torch.rand(3, 1, 16, 16, 16) * 2 - 1, torch.tensor([0, 1, 0])
    expected = raw_reward_scores(original, volumes, labels)
    scores = raw_reward_scores(rebuilt, volumes, labels)  # its normalisation statistics are empty: not needed
    assert set(scores) == {"rising", "volume3d", "total"} and int(rebuilt.running.count.max()) == 0
    for key, value in expected.items():
        torch.testing.assert_close(scores[key], value, msg=key)
    assert not torch.equal(scores["volume3d"], torch.zeros(3))
    # a missing or changed network file is refused, naming the component
    moved = dict(checkpoint["msrl_reward"], networks=[dict(checkpoint["msrl_reward"]["networks"][0],
                                                           path=str(tmp_path / "gone.ckpt"))])
    with pytest.raises(ValueError, match="'volume3d'.*gone.ckpt, which does not exist"):
        reward_from_checkpoint({"msrl_reward": moved})
    changed = dict(checkpoint["msrl_reward"],
                   networks=[dict(checkpoint["msrl_reward"]["networks"][0], sha256="0" * 64)])
    with pytest.raises(ValueError, match="has changed since fine-tuning"):
        reward_from_checkpoint({"msrl_reward": changed})
    with pytest.raises(ValueError, match="built in Python"):
        reward_from_checkpoint({"msrl_reward": {"config": None, "networks": []}})


def test_raw_scores_leave_the_statistics_alone_and_sum_with_weights() -> None:
    reward = MultiScaleReward([RisingReward(), _Constant(2.0)], weights=[0.5, 2.0])
    volumes = torch.zeros(4, 1, 2, 2, 2)
    scores = raw_reward_scores(reward, volumes, None)
    torch.testing.assert_close(scores["total"], 0.5 * scores["rising"] + 2.0 * scores["constant"])
    assert int(reward.running.count.max()) == 0
    plain = raw_reward_scores(_Constant(1.5), volumes, None)
    assert set(plain) == {"constant", "total"} and torch.equal(plain["total"], torch.full((4,), 1.5))
    with pytest.raises(ValueError, match="total"):
        MultiScaleReward([_Constant(1.0, name="total")])


class _Constant(torch.nn.Module):
    def __init__(self, value: float, name: str = "constant") -> None:
        super().__init__()
        self.value, self.name = value, name

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full((volumes.shape[0],), self.value)


def test_guard_judges_the_raw_reward() -> None:
    """Worsening FIDs while the raw reward rises and the normalised one falls (as measured: 1.63 → 0.99): hacking."""
    guard = HeldoutFIDGuard(None, MedicalNetExtractor(), every_n_iterations=1, early_stop_on_heldout=True,
                            patience=3)
    fids = iter([1.0, 1.1, 1.2, 1.3, 1.4])
    guard._evaluate = lambda module: next(fids)
    trainer = SimpleNamespace(loggers=[], global_step=0, should_stop=False, callback_metrics={})
    module = SimpleNamespace(iteration=torch.tensor(0), metric_prefix="ppo")  # the guard reads its prefix
    guard.on_train_start(trainer, module)
    for iteration, (raw, normalised) in enumerate(zip([0.75, 1.5, 2.25, 3.0], [1.63, 1.41, 1.21, 0.99],
                                                      strict=True), start=1):
        trainer.callback_metrics = {"ppo/reward_raw/total": torch.tensor(raw),
                                    "ppo/reward/mean": torch.tensor(normalised)}
        module.iteration = torch.tensor(iteration)
        guard.on_train_batch_end(trainer, module, None, None, iteration - 1)
    assert [h[0] for h in guard.history] == [0, 1, 2, 3, 4]
    assert trainer.should_stop
