"""Reward-hacking guard for fine-tuning: FID on held-out real volumes with an extractor the reward does not use.

A policy can raise a learned reward by exploiting its networks instead of by looking more like
real MRI. Before the first update (iteration 0: the pretrained policy), after the first
iteration and every k, this callback samples a fixed set of volumes (fixed seed, EMA weights) with
the sampler being trained (its DDIM steps, η and guidance; `sampler: deterministic` for η = 0),
computes their FID against held-out real volumes with an independent extractor, and logs it as
`<prefix>/heldout_fid`, under the fine-tuner's metric prefix (`ppo/`, `backprop/`; any `FinetuneBase`).
With `early_stop_on_heldout`, fine-tuning stops when the FID has worsened `patience` evaluations in a
row while the raw reward (`<prefix>/reward_raw/total`, not the normalised `<prefix>/reward/mean`,
which falls as its running mean catches up) rose over the same evaluations.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning as L
import torch

from datamodules.base import VolumeDataModule
from msrl.evaluation.extractors import FeatureExtractor, MedicalNetExtractor
from msrl.evaluation.metrics import fid

log = logging.getLogger(__name__)


class HeldoutFIDGuard(L.Callback):
    """Log `<prefix>/heldout_fid` every `every_n_iterations` iterations; optionally stop on reward hacking.

    Args:
        data: the data module whose held-out split is the real reference (e.g. `../data/template.yaml`).
        extractor: feature extractor for the FID; must share no network with the reward (None: a MedicalNet-layout
            ResNet-10 with seeded random weights, comparable only to itself).
        every_n_iterations: k, iterations between evaluations (also at iteration 0, before any update, and 1).
        num_samples: volumes generated per evaluation (labels alternate over the classes).
        sampler: "rollout": the trained sampler's η and guidance scale (PPO's rollouts); "deterministic":
            DDIM η = 0 with its guidance scale (what `msrl sample --eta 0` draws).
        num_steps: DDIM steps of those samples (None: the rollouts' `num_steps`).
        split: held-out split used as the reference ("val" or "test").
        early_stop_on_heldout: stop when FID worsens `patience` evaluations in a row while the raw reward rises.
        patience: m, the number of consecutive worsening evaluations that stops the run.
        seed: seed of the fixed noise (initial and, under η > 0, per-step): only the policy changes the samples.
    """

    REWARD_KEY = "reward_raw/total"  # under the module's prefix; raw: the normalised reward/mean can fall as it rises

    def __init__(self, data: VolumeDataModule, extractor: FeatureExtractor | None = None, every_n_iterations: int = 5,
                 num_samples: int = 8, sampler: Literal["rollout", "deterministic"] = "rollout",
                 num_steps: int | None = None, split: str = "val", early_stop_on_heldout: bool = False,
                 patience: int = 3, seed: int = 1234) -> None:
        if every_n_iterations < 1 or num_samples < 2 or patience < 1:
            raise ValueError(f"need every_n_iterations >= 1, num_samples >= 2, patience >= 1; got "
                             f"{every_n_iterations}, {num_samples}, {patience}")
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test' (held out from training), got {split!r}")
        if sampler not in ("rollout", "deterministic"):
            raise ValueError(f"sampler must be 'rollout' or 'deterministic', got {sampler!r}")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 or None (the rollouts' steps), got {num_steps}")
        extractor = MedicalNetExtractor(depth=10) if extractor is None else extractor
        self.data, self.extractor, self.every, self.num_samples = data, extractor, every_n_iterations, num_samples
        self.sampler, self.num_steps, self.split, self.stop, self.patience, self.seed = sampler, num_steps, split, \
            early_stop_on_heldout, patience, seed
        # (iteration, FID, mean raw reward of the iterations since the last evaluation; NaN at iteration 0)
        self.history: list[tuple[int, float, float]] = []
        self._rewards: list[float] = []
        self._real_features: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the extractor is independent of the reward; read the held-out real volumes' features."""
        refuse_shared_networks(self.extractor, pl_module.reward)
        self.data.prepare_data()
        self.data.setup("fit")
        dataset = self.data.datasets[self.split]
        if len(dataset) < 2:
            raise ValueError(f"HeldoutFIDGuard: the {self.split} split has {len(dataset)} volumes; need >= 2")
        size = pl_module.policy.hparams.spatial_size
        if self.data.spatial_size != size:
            raise ValueError(f"HeldoutFIDGuard: data spatial_size {self.data.spatial_size} differs from the "
                             f"model's {size}")
        volumes = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        self.extractor.to(pl_module.device)
        self._real_features = self._features(volumes)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Iteration 0: the held-out FID of the pretrained policy, before any PPO update (not on a resume)."""
        if not self.history and int(pl_module.iteration) == 0:
            self._record(trainer, pl_module, 0, self._evaluate(pl_module), float("nan"))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Collect the iteration's mean raw reward; every k iterations evaluate, log and maybe stop."""
        reward = trainer.callback_metrics.get(f"{pl_module.metric_prefix}/{self.REWARD_KEY}")
        if reward is not None:
            self._rewards.append(float(reward))
        iteration = int(pl_module.iteration)
        if iteration % self.every and iteration != 1:
            return
        score = self._evaluate(pl_module)
        mean_reward = sum(self._rewards) / len(self._rewards) if self._rewards else float("nan")
        self._rewards.clear()
        self._record(trainer, pl_module, iteration, score, mean_reward)
        if self.stop and self.hacking():
            log.warning("stopping fine-tuning at iteration %d: held-out FID rose %d evaluations in a row (%s) while "
                        "the reward rose (%s): the policy is likely exploiting the reward", iteration, self.patience,
                        [round(h[1], 3) for h in self.history[-self.patience - 1:]],
                        [round(h[2], 3) for h in self.history[-self.patience - 1:]])
            trainer.should_stop = True

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, iteration: int, score: float,
                mean_reward: float) -> None:
        self.history.append((iteration, score, mean_reward))
        # straight to the loggers: one point per evaluation, not one per step. Step = the iteration it was
        # measured after (0: before any update), also logged as <prefix>/heldout_fid_iteration: PPO's optimiser's
        # global_step counts micro-batch steps (2 per iteration in the demo), which put iteration 20 at 40
        prefix = pl_module.metric_prefix
        for logger in trainer.loggers:
            logger.log_metrics({f"{prefix}/heldout_fid": score, f"{prefix}/heldout_fid_iteration": float(iteration)},
                               step=iteration)

    def hacking(self) -> bool:
        """FID worse at each of the last `patience` evaluations and the raw reward higher than at their start.

        The reward at the start is the earliest known one of those evaluations (iteration 0 has none).
        """
        if len(self.history) <= self.patience:
            return False
        recent = self.history[-self.patience - 1:]
        worse = all(later[1] > earlier[1] for earlier, later in zip(recent, recent[1:], strict=False))
        known = [h[2] for h in recent if math.isfinite(h[2])]
        return worse and len(known) >= 2 and known[-1] > known[0] and math.isfinite(recent[-1][2])

    def state_dict(self) -> dict[str, Any]:
        """The evaluation history (so a resumed run keeps judging the same trend)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the evaluation history."""
        self.history = [tuple(h) for h in state_dict.get("history", [])]

    @torch.no_grad()
    def _evaluate(self, pl_module: L.LightningModule) -> float:
        """FID of a fixed set of EMA samples against the held-out reference (same on every rank)."""
        hp = pl_module.hparams
        eta = hp.eta if self.sampler == "rollout" else 0.0
        volumes = pl_module.policy.generate(self.num_samples, num_steps=self.num_steps or hp.num_steps, eta=eta,
                                            guidance_scale=hp.guidance_scale, seed=self.seed)
        return fid(self._real_features, self._features(volumes))

    def _features(self, volumes: torch.Tensor) -> torch.Tensor:
        features = self.extractor.extract(volumes)
        return features["3d"] if "3d" in features else features["pooled"]


def refuse_shared_networks(extractor: torch.nn.Module, reward: torch.nn.Module) -> None:
    """Raise if any weight tensor of the extractor also appears in the reward (same network, same file)."""
    reward_tensors: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for parameter in reward.parameters():
        reward_tensors.setdefault(tuple(parameter.shape), []).append(parameter.detach())
    for name, parameter in extractor.named_parameters():
        if parameter.numel() < 64:
            continue
        for candidate in reward_tensors.get(tuple(parameter.shape), []):
            if torch.equal(candidate.cpu(), parameter.detach().cpu()):
                raise ValueError(f"HeldoutFIDGuard: the extractor {getattr(extractor, 'name', type(extractor))} "
                                 f"shares weights with the reward ({name}); choose an extractor the reward does not "
                                 "use, or the guard measures the reward's own opinion")
