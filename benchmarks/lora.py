"""LoRA against full fine-tuning in PPO: trainable parameters, optimiser state, peak memory, reward gain.

    nice -n 10 python -m benchmarks.lora --pretrained runs/pretrain/version_0/checkpoints/last.ckpt \\
        --reward configs/rewards/multiscale.yaml [--config configs/finetune/template_latent.yaml] \\
        [--rank 8] [--lora-lr 0.003] [--seeds 3] [--iterations 5] [--out lora.json]

Each (variant, seed) builds a `PPOFinetuneModule` with the `model:` settings of a finetune config
(plus the variant's LoRA settings and learning rate, and the seed), and runs `iterations` PPO
iterations in a quiet Trainer on the CPU in fp32:

- trainable parameters and optimiser-state bytes (AdamW's exp_avg, exp_avg_sq and step at the end);
- peak memory of one PPO iteration (the first, so AdamW's state is allocated inside it; seed 0 only):
  the bytes of every tensor the run holds before it (policy, EMA, KL reference, reward networks,
  first stage; shared tensors once) plus the peak of the running sum of the tensor allocations and
  frees during it (the CPU profiler, as `benchmarks.memory.profiled_peak_bytes`);
- reward gain: the raw total reward (`ppo/reward_raw/total`) of the last iteration minus that of the
  first (rolled out before any update), with the mean and t-interval over seeds; the same seed rolls
  out the same first iteration for both variants, so LoRA − full is also given per seed (paired).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.evaluation.metrics import mean_t_ci
from rewards.loading import reward_from_config

MIB = 2**20


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors` (tied weights, such as LoRA's shared base, count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class IterationRecorder(L.Callback):
    """Raw total reward of every iteration; the first iteration's tensor peak under the CPU profiler."""

    def __init__(self, profile_first: bool) -> None:
        self.profile_first = profile_first
        self.rewards: list[float] = []
        self.first_ratio: list[float] = []  # max |r − 1| before each iteration's first optimiser step
        self.peak_bytes: int | None = None
        self._profiler: profile | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.profile_first and not self.rewards:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            events = sorted((event.start_ns(), event.nbytes()) for event in
                            self._profiler.profiler.kineto_results.events()
                            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
            running = peak = 0
            for _, nbytes in events:
                running += nbytes
                peak = max(peak, running)
            self.peak_bytes, self._profiler = peak, None
        self.rewards.append(float(trainer.callback_metrics["ppo/reward_raw/total"]))
        self.first_ratio.append(float(trainer.callback_metrics["ppo/first_ratio/max_abs_dev"]))


def run(model_args: dict[str, Any], reward_config: dict[str, Any], iterations: int, seed: int,
        profile_first: bool) -> dict[str, Any]:
    """One PPO run of `iterations` iterations; its sizes, memory and raw rewards."""
    L.seed_everything(seed, verbose=False)  # LoRA's A matrices are drawn at random
    module = PPOFinetuneModule(**{**model_args, "seed": seed, "iterations_per_epoch": iterations,
                                  "image_every_n_iterations": 0}, reward=reward_from_config(reward_config))
    first_stage = [] if module.policy.latent is None else list(module.policy.latent.autoencoder.parameters())
    held = tensor_bytes([*module.parameters(), *module.buffers(), *first_stage])
    recorder = IterationRecorder(profile_first)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    start = time.perf_counter()
    trainer.fit(module)
    state = [t for s in trainer.optimizers[0].state.values() for t in s.values() if torch.is_tensor(t)]
    return {"seed": seed, "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "optimizer_state_bytes": tensor_bytes(state), "held_bytes_before": held,
            "iteration_peak_bytes": recorder.peak_bytes, "rewards": recorder.rewards,
            "first_ratio_max_abs_dev": max(recorder.first_ratio),
            "gain": recorder.rewards[-1] - recorder.rewards[0], "seconds": time.perf_counter() - start}


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: sizes, memory (MiB), gain mean and interval; LoRA − full per seed and over seeds."""
    out: dict[str, Any] = {}
    for variant, runs in results.items():
        first = runs[0]
        gain = mean_t_ci([r["gain"] for r in runs])
        out[variant] = {"trainable_parameters": first["trainable_parameters"],
                        "optimizer_state_mib": first["optimizer_state_bytes"] / MIB,
                        "held_before_mib": first["held_bytes_before"] / MIB,
                        "iteration_peak_above_mib": first["iteration_peak_bytes"] / MIB,
                        "peak_mib": (first["held_bytes_before"] + first["iteration_peak_bytes"]) / MIB,
                        "gain_mean": gain.value, "gain_ci95": list(gain.ci95),
                        "gains": [r["gain"] for r in runs], "seconds": [r["seconds"] for r in runs]}
    paired = [lo["gain"] - fu["gain"] for lo, fu in zip(results["lora"], results["full"], strict=True)]
    difference = mean_t_ci(paired)
    full_ci = out["full"]["gain_ci95"]
    out["lora_minus_full"] = {"per_seed": paired, "mean": difference.value, "ci95": list(difference.ci95),
                              "lora_mean_within_full_interval": bool(full_ci[0] <= out["lora"]["gain_mean"]
                                                                     <= full_ci[1]),
                              "short_of_full_interval_by": max(0.0, full_ci[0] - out["lora"]["gain_mean"])}
    return out


def main() -> None:
    """Parse the options, run both variants over the seeds, print and write the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="msrl pretrain checkpoint (the init_checkpoint)")
    parser.add_argument("--reward", required=True, help="the reward's YAML ({class_path, init_args})")
    parser.add_argument("--config", default="configs/finetune/template_latent.yaml",
                        help="finetune config whose model: settings both variants use")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    parser.add_argument("--lora-lr", type=float, default=None, help="LoRA's learning rate (default: the config's)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 per variant")
    parser.add_argument("--iterations", type=int, default=5, help="PPO iterations per run")
    parser.add_argument("--set", nargs="*", default=[], help="model settings to override, key=yaml-value")
    parser.add_argument("--out", default=None, help="write the runs and the summary as JSON here")
    args = parser.parse_args()
    model = {k: v for k, v in yaml.safe_load(Path(args.config).read_text())["model"].items() if k != "reward"}
    model.update({key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)})
    model["init_checkpoint"] = args.pretrained
    reward = yaml.safe_load(Path(args.reward).read_text())
    variants = {"full": {**model, "lora_rank": 0},
                "lora": {**model, "lora_rank": args.rank, "lora_alpha": args.alpha,
                         "lr": args.lora_lr if args.lora_lr is not None else model.get("lr", 1e-5)}}
    results = {name: [run(settings, reward, args.iterations, seed, profile_first=seed == 0)
                      for seed in range(args.seeds)] for name, settings in variants.items()}
    report = {"settings": {"variants": variants, "iterations": args.iterations, "seeds": args.seeds},
              "summary": summary(results), "runs": results}
    print(json.dumps(report["summary"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
