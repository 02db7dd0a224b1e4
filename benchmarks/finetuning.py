"""The PPO pairs: msrl's rollout and update against plain MONAI / PyTorch, and one PPO iteration's split.

Everything is built in-process: a freshly initialised `DiffusionModule` saved as a pretraining
checkpoint, and the multi-scale reward of `configs/rewards/multiscale.yaml` with untrained critics
and classifier (the reward classes take checkpoint paths, so the untrained networks are written
to a temporary folder and their paths substituted). Untrained networks cost what trained ones do.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from benchmarks.pretraining import (
    NUM_CLASSES,
    BatchStamps,
    autocast,
    diffusion_module,
    quiet_trainer,
    synchroniser,
)
from benchmarks.settings import BenchConfig, Net, PPOSize
from lightning_modules.critics.networks import ClassifierModule, RealismCriticModule
from lightning_modules.diffusion.sampling import sample
from lightning_modules.finetune.base import FinetuneBase
from lightning_modules.ppo.module import PPOFinetuneModule

REPO = Path(__file__).resolve().parents[1]
MULTISCALE_CONFIG = REPO / "configs/rewards/multiscale.yaml"


class CostPPO(PPOFinetuneModule):
    """A `PPOFinetuneModule` that rolls out any sample count: labels 0, 1, 0, … even where K does not divide it.

    The benchmarks time and size 1- and 3-sample iterations (the memory plan's per-sample slope); a pass
    costs the same whatever the class mix, while a training run refuses such counts
    (lightning_modules/finetune/labels.py).
    """

    def rollout_labels(self) -> torch.Tensor | None:
        """0, 1, …, K−1, 0, 1, … for `samples_per_iteration` rollouts, balanced where the count allows."""
        if self.policy.null_class is None:
            return None
        count, classes = self.hparams.samples_per_iteration, self.policy.hparams.num_classes
        return torch.arange(count, device=self.device) % classes


def _class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def untrained_reward(workdir: Path, net: Net, config: Path = MULTISCALE_CONFIG) -> nn.Module:
    """The reward `config` describes, its critics and classifier freshly initialised (not trained)."""
    paths = {}
    for name, network in (("critics", RealismCriticModule(spatial_size=net.spatial_size)),
                          ("classifier", ClassifierModule(spatial_size=net.spatial_size))):
        paths[name] = workdir / f"{name}.ckpt"
        torch.save({"hyper_parameters": dict(network.hparams), "state_dict": network.state_dict()}, paths[name])
    spec = yaml.safe_load(config.read_text())
    components = []
    for component in spec["init_args"]["components"]:
        args = dict(component.get("init_args") or {})
        if "checkpoint" in args:
            args["checkpoint"] = str(paths["classifier" if "Classifier" in component["class_path"] else "critics"])
        components.append(_class(component["class_path"])(**args))
    others = {key: value for key, value in spec["init_args"].items() if key != "components"}
    return _class(spec["class_path"])(components=components, **others)


def pretrained_checkpoint(net: Net, workdir: Path, autoencoder_checkpoint: Path | None = None) -> Path:
    """A fresh `DiffusionModule` of this size (latent with an autoencoder), saved as `msrl pretrain` saves it."""
    latent = {} if autoencoder_checkpoint is None else {"autoencoder_checkpoint": str(autoencoder_checkpoint)}
    pretrained = diffusion_module(net, **latent)
    checkpoint = workdir / "pretrained.ckpt"
    torch.save({"msrl_diffusion": pretrained.diffusion_spec(), "state_dict": pretrained.state_dict()}, checkpoint)
    return checkpoint


def ppo_module(size: PPOSize, workdir: Path, config: BenchConfig,
               autoencoder_checkpoint: Path | None = None) -> PPOFinetuneModule:
    """A `PPOFinetuneModule` of this size (η = 1, one iteration per fit) on a fresh pretrained model.

    With `autoencoder_checkpoint` the pretrained model is a latent one: the policy rolls out in that
    autoencoder's latent space and the reward scores the decoded volumes (`size.net.spatial_size`).
    """
    checkpoint = pretrained_checkpoint(size.net, workdir, autoencoder_checkpoint)
    module = CostPPO(init_checkpoint=str(checkpoint), reward=untrained_reward(workdir, size.net),
                     samples_per_iteration=size.samples, num_steps=size.num_steps, eta=1.0,
                     timestep_fraction=size.timestep_fraction, micro_batch_size=size.micro_batch_size,
                     iterations_per_epoch=1, image_every_n_iterations=0)
    if config.device == "cuda":  # charge queued kernels to the phase that queued them (ppo/time/*)
        _synchronise_after(module, ("rollout", "update"), synchroniser(config.device))
    return module.to(config.device)


def _synchronise_after(module: PPOFinetuneModule, names: tuple[str, ...], sync: Callable[[], None]) -> None:
    """Make these methods wait for the device before returning (PPO's own timers read the clock right after)."""
    for name in names:
        original = getattr(module, name)

        def finished(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            result = _original(*args, **kwargs)
            sync()
            return result

        setattr(module, name, finished)


def trained_steps(size: PPOSize) -> int:
    """DDIM steps a PPO update trains on: `timestep_fraction` of the stochastic ones, at least one.

    The last DDIM step is deterministic (ᾱ_prev = 1) and never trained, as in `PPOFinetuneModule`.
    """
    return max(1, math.ceil(size.timestep_fraction * (size.num_steps - 1)))


def update_passes(size: PPOSize) -> int:
    """UNet forward+backward passes of one PPO update: micro-batches × trained steps."""
    return math.ceil(size.samples / size.micro_batch_size) * trained_steps(size)


def finetune_iteration(module: FinetuneBase, config: BenchConfig) -> dict[str, float]:
    """One iteration of a fine-tuner (PPO or reward backpropagation) through a fresh Trainer: its phases'
    seconds (as the module logs them under <metric_prefix>/time/*: rollout, decode, reward (decode
    included), update), the whole iteration's seconds, and the UNet calls with gradients."""
    stamps = BatchStamps(synchroniser(config.device))
    passes: list[int] = []
    hook = module.policy.unet.register_forward_hook(
        lambda *_: passes.append(1) if torch.is_grad_enabled() else None)
    trainer = quiet_trainer(config, [stamps], max_epochs=1, limit_train_batches=1)
    try:
        trainer.fit(module)
    finally:
        hook.remove()
    metrics = {key: float(trainer.callback_metrics[f"{module.metric_prefix}/time/{key}"])
               for key in ("rollout", "decode", "reward", "update")}
    return {**metrics, "iteration": stamps.seconds_from(0), "passes": float(len(passes))}


def ppo_update_per_pass(module: PPOFinetuneModule, config: BenchConfig,
                        iterations: list[dict[str, float]]) -> Callable[[], float]:
    """A of `ppo_update_ratio`: a whole PPO iteration; its update's seconds per UNet pass.

    Every iteration's split is appended to `iterations` (for `reward_share` and the split table).
    """
    def run() -> float:
        split = finetune_iteration(module, config)
        iterations.append(split)
        return split["update"] / split["passes"]

    return run


def unet_forward_backward(module: PPOFinetuneModule, size: PPOSize, config: BenchConfig) -> Callable[[], float]:
    """B of `ppo_update_ratio`: forward+backward of the same UNet on a micro-batch; seconds per pass.

    A copy of the policy's UNet (the policy's own weights stay untouched), as many passes as one
    PPO update makes, gradients accumulating as PPO's do.
    """
    unet = copy.deepcopy(module.policy.unet).train()
    side, batch, device = size.net.spatial_size, size.micro_batch_size, config.device
    x = torch.randn((batch, 1, side, side, side), device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    passes, sync = update_passes(size), synchroniser(device)

    def run() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(passes):
            with autocast(device, config.precision):
                prediction = unet(x, timesteps, class_labels=labels)
            prediction.float().square().mean().backward()
        sync()
        elapsed = time.perf_counter() - start
        unet.zero_grad(set_to_none=True)
        return elapsed / passes

    return run


def msrl_rollout(module: PPOFinetuneModule, config: BenchConfig) -> Callable[[], None]:
    """A of `rollout_ratio`: `PPOFinetuneModule.rollout`, the DDIM sampler keeping x_t and log-probs."""
    def run() -> None:
        with autocast(config.device, config.precision):
            module.rollout()

    return run


class StochasticDDIM(DDIMScheduler):
    """MONAI's `DDIMScheduler` with a fixed η (`DiffusionInferer.sample` calls `step()` without one)."""

    def __init__(self, eta: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eta = eta

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return super().step(model_output, timestep, sample, self.eta if eta is None else eta, generator)


class ConditionedUNet(nn.Module):
    """A UNet with its class labels bound (`DiffusionInferer.sample` passes only x, timesteps, context)."""

    def __init__(self, unet: nn.Module, labels: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.labels = unet, labels

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, timesteps, context=context, class_labels=self.labels)


def monai_ddim(module: PPOFinetuneModule) -> StochasticDDIM:
    """MONAI's DDIM over the policy's noise schedule, with the rollout's η (as msrl's sampler builds it)."""
    train = module.policy.noise_scheduler
    scheduler = StochasticDDIM(eta=module.hparams.eta, num_train_timesteps=train.num_train_timesteps,
                               clip_sample=True, set_alpha_to_one=True, prediction_type=train.prediction_type)
    scheduler.betas, scheduler.alphas = train.betas.clone(), train.alphas.clone()
    scheduler.alphas_cumprod = train.alphas_cumprod.clone()
    return scheduler


def monai_rollout(module: PPOFinetuneModule, size: PPOSize, config: BenchConfig) -> Callable[[], None]:
    """B of `rollout_ratio`: MONAI's `DiffusionInferer.sample` with a `DDIMScheduler`, same UNet, steps, η."""
    scheduler = monai_ddim(module)
    inferer = DiffusionInferer(scheduler)
    side, device = size.net.spatial_size, config.device
    model = ConditionedUNet(module.policy.unet, torch.arange(size.samples, device=device) % NUM_CLASSES)

    def run() -> None:
        scheduler.set_timesteps(size.num_steps, device=device)
        noise = torch.randn((size.samples, 1, side, side, side), device=device)
        module.policy.unet.eval()
        with autocast(device, config.precision):
            inferer.sample(noise, model, scheduler, verbose=False)
        module.policy.unet.train()

    return run


class ConstantModel(nn.Module):
    """Stands in for the UNet: returns the same prediction whatever it is asked."""

    def __init__(self, prediction: torch.Tensor) -> None:
        super().__init__()
        self.prediction = prediction

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.prediction


def sampler_arithmetic(module: PPOFinetuneModule, size: PPOSize, config: BenchConfig,
                       rollouts: int = 20) -> tuple[Callable[[], float], Callable[[], float]]:
    """Both rollouts with the UNet taken out: what each sampler itself costs, in seconds per rollout.

    A: msrl's `sample` as PPO calls it (trajectory and log-probs kept); B: `DiffusionInferer.sample`.
    """
    side, device, hp = size.net.spatial_size, config.device, module.hparams
    model = ConstantModel(torch.randn((size.samples, 1, side, side, side), device=device))
    noise = torch.randn((size.samples, 1, side, side, side), device=device)
    labels = torch.arange(size.samples, device=device) % NUM_CLASSES
    scheduler, sync = monai_ddim(module), synchroniser(device)
    inferer = DiffusionInferer(scheduler)

    def timed(rollout: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            sync()
            start = time.perf_counter()
            for _ in range(rollouts):
                rollout()
            sync()
            return (time.perf_counter() - start) / rollouts
        return run

    def msrl() -> None:
        sample(model, module.scheduler, noise, labels, num_steps=size.num_steps, eta=hp.eta,
               guidance_scale=hp.guidance_scale, null_class=module.policy.null_class, return_trajectory=True,
               reduction=hp.logprob_reduction)

    def monai() -> None:
        scheduler.set_timesteps(size.num_steps, device=device)
        inferer.sample(noise, model, scheduler, verbose=False)

    return timed(msrl), timed(monai)
