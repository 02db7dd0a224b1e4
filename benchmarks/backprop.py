"""Reward backpropagation at 64³: peak memory with gradient checkpointing against without, and its seconds
per iteration beside a PPO iteration with the same reward calls.

Both fine-tuners run the latent PPO iteration's size (`BenchConfig.latent.iteration`: at `make bench`, 2
volumes of 64³ through the demo's VQ-GAN (8×16³ latents) and latent UNet, 10 DDIM steps, η = 1, full
fine-tuning), so each scores the same volumes once per iteration. `RewardBackpropModule` backpropagates
through the last K = the PPO update's trained steps (3 of 10): both train the UNet on as many steps per
volume. Its reward is `configs/rewards/multiscale_differentiable.yaml` with untrained critics and
classifier (PPO's is `multiscale.yaml`, the mask rule included); no penalty to the base, as PPO's KL is off.

- `backprop_iteration_ratio` (no goal): seconds of one reward-backpropagation iteration (gradient
  checkpointing on, the default) over one PPO iteration, each through a fresh Trainer, alternating.
- `backprop_ckpt_memory_ratio` (≤ 0.60): peak tensor memory of one iteration with
  `gradient_checkpointing=True` over without, each variant in a fresh process
  (`python -m benchmarks.backprop '<spec json>'`): a fit of three iterations, the first a warm-up (AdamW's
  state, thread pools), the second read by the resident set (VmHWM − VmRSS), the third by the profiler
  (`benchmarks.memory.profiled_peak_bytes`): the peak above what is live when the iteration starts.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.finetuning import (
    REPO,
    finetune_iteration,
    ppo_module,
    pretrained_checkpoint,
    trained_steps,
    untrained_reward,
)
from benchmarks.harness import PairResult, Report, Table, compare, medians
from benchmarks.latent import PHASES, latent_split, untrained_autoencoder
from benchmarks.memory import MIB, fresh_process, profiled_peak_bytes, resident_peak_bytes
from benchmarks.pretraining import quiet_trainer, synchroniser
from benchmarks.settings import PRESETS, BenchConfig, PPOSize
from lightning_modules.backprop.module import RewardBackpropModule
from lightning_modules.finetune.base import FinetuneBase

DIFFERENTIABLE_CONFIG = REPO / "configs/rewards/multiscale_differentiable.yaml"


def backprop_module(size: PPOSize, workdir: Path, config: BenchConfig, autoencoder: Path,
                    gradient_checkpointing: bool = True) -> RewardBackpropModule:
    """A latent `RewardBackpropModule` of PPO's size, K = PPO's trained steps, on fresh pretrained weights."""
    checkpoint = pretrained_checkpoint(size.net, workdir, autoencoder)
    module = RewardBackpropModule(
        init_checkpoint=str(checkpoint), reward=untrained_reward(workdir, size.net, DIFFERENTIABLE_CONFIG),
        samples_per_iteration=size.samples, num_steps=size.num_steps, eta=1.0, backprop_steps=trained_steps(size),
        gradient_checkpointing=gradient_checkpointing, iterations_per_epoch=1, image_every_n_iterations=0)
    return module.to(config.device)


def _fresh(folder: Path) -> Path:
    folder.mkdir()
    return folder


def timed_iteration(module: FinetuneBase, config: BenchConfig, splits: list[dict[str, float]]) -> Callable[[], float]:
    """One iteration's seconds (fresh Trainer); its split into phases appended to `splits`."""
    def run() -> float:
        split = finetune_iteration(module, config)
        splits.append(split)
        return split["iteration"]

    return run


def iteration_row(config: BenchConfig, report: Report) -> None:
    """`backprop_iteration_ratio` and the two iterations' phases side by side."""
    size = config.latent.iteration
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        autoencoder = untrained_autoencoder(config.latent.autoencoder, workdir)
        backprop = backprop_module(size, _fresh(workdir / "backprop"), config, autoencoder)
        ppo = ppo_module(size, _fresh(workdir / "ppo"), config, autoencoder)
        splits: dict[str, list[dict[str, float]]] = {"backprop": [], "ppo": []}
        report.add_pair(compare(
            "backprop_iteration_ratio", timed_iteration(backprop, config, splits["backprop"]),
            timed_iteration(ppo, config, splits["ppo"]), goal=None, repeats=config.repeats,
            a_label=f"reward backprop iteration, K = {trained_steps(size)}, checkpointing",
            b_label="PPO iteration", sync=synchroniser(config.device)))
    rows = []
    for name, runs in (("reward backpropagation", splits["backprop"]), ("PPO", splits["ppo"])):
        timed = [latent_split(run) for run in runs[-config.repeats:]]  # the warm-up iteration left out
        t = medians(timed, (*PHASES, "iteration"))
        rows.append([name, *(t[p] for p in PHASES), t["iteration"] - sum(t[p] for p in PHASES), t["iteration"]])
    report.tables["backprop_split"] = Table(
        f"One latent iteration ({size.net.label()} on {config.latent.autoencoder.latent_label()}, {size.samples} "
        f"samples, {size.num_steps} DDIM steps, reward backpropagation through the last {trained_steps(size)}), "
        f"medians of {config.repeats}",
        ["fine-tuner", "rollout s", "decode s", "scoring s", "update s", "other s", "iteration s"], rows)


def iteration_peaks(module: RewardBackpropModule, config: BenchConfig) -> dict[str, float | None]:
    """Peaks of one iteration above what is live when it starts (MiB): tensors (profiler) and resident set.

    A fit of three iterations: a warm-up, one read by the resident set, one by the profiler; on a GPU
    the second by `torch.cuda.max_memory_allocated` and no third.
    """
    step, peaks, calls = module.training_step, {}, []

    def measured(batch: Any, batch_idx: int) -> None:
        calls.append(batch_idx)
        gc.collect()
        if len(calls) == 1:
            step(batch, batch_idx)
        elif config.device == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(batch, batch_idx)
            peaks["tensor_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / MIB
        elif len(calls) == 2:
            rss = resident_peak_bytes(lambda: step(batch, batch_idx))
            peaks["rss_peak_mib"] = None if rss is None else rss / MIB
        else:
            peaks["tensor_peak_mib"] = profiled_peak_bytes(lambda: step(batch, batch_idx)) / MIB

    module.training_step = measured
    quiet_trainer(config, [], max_epochs=2 if config.device == "cuda" else 3).fit(module)
    return {"rss_peak_mib": None, **peaks}


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the child process (or in this one, tiny preset): one variant's peaks, in MiB."""
    config = PRESETS[spec["preset"]]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        autoencoder = untrained_autoencoder(config.latent.autoencoder, Path(folder))
        module = backprop_module(config.latent.iteration, Path(folder), config, autoencoder, spec["checkpointing"])
        return iteration_peaks(module, config)


def memory_row(config: BenchConfig, report: Report) -> None:
    """`backprop_ckpt_memory_ratio`: tensor peaks with gradient checkpointing over without; both variants' peaks."""
    runs = {checkpointing: (fresh_process("benchmarks.backprop", spec) if config.name != "tiny"
                            else measure_memory(spec))
            for checkpointing in (True, False)
            for spec in [{"preset": config.name, "checkpointing": checkpointing}]}
    report.add_pair(PairResult("backprop_ckpt_memory_ratio", [runs[True]["tensor_peak_mib"]],
                               [runs[False]["tensor_peak_mib"]], 0.60, "iteration, gradient checkpointing",
                               "without", unit="MiB"))
    size = config.latent.iteration
    report.tables["backprop_memory"] = Table(
        f"Peak memory of one reward-backpropagation iteration above what is live at its start (MiB; "
        f"{size.net.label()} on {config.latent.autoencoder.latent_label()}, {size.samples} samples, "
        f"{size.num_steps} DDIM steps, K = {trained_steps(size)}), one fresh process each",
        ["gradient checkpointing", "tensor peak (profiler)", "RSS peak (VmHWM − VmRSS)", "tensor peak / without"],
        [["on" if on else "off", r["tensor_peak_mib"], r["rss_peak_mib"],
          r["tensor_peak_mib"] / runs[False]["tensor_peak_mib"]] for on, r in runs.items()])


def backprop_section(config: BenchConfig, report: Report) -> None:
    """Reward backpropagation's rows: seconds per iteration beside PPO's, and its checkpointing memory ratio."""
    iteration_row(config, report)
    memory_row(config, report)


if __name__ == "__main__":
    print(json.dumps(measure_memory(json.loads(sys.argv[1]))))
