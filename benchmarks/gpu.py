"""The GPU path of `make bench GPU=1`: throughput at 64³/128³ in bf16 and the model FLOP utilisation.

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` records the matrix
products and convolutions (forward and backward) of one training step, which is the usual
"model FLOPs" convention (normalisation and elementwise work are not counted). Utilisation is
those FLOPs per second of a measured step against the GPU's dense bf16 peak from
`BF16_DENSE_PEAK_TFLOPS`. Nothing here touches CUDA unless the config's device is "cuda".
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.finetuning import msrl_rollout, ppo_iteration, ppo_module
from benchmarks.harness import Report, Table, measure
from benchmarks.pretraining import autocast, diffusion_module, lightning_steps, synchroniser
from benchmarks.settings import BenchConfig, Net, PPOSize

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s. Looked up by
# the first name that occurs in torch.cuda.get_device_name(), so specific names come first.
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def bf16_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak (FLOP/s) of the named GPU, None when it is not in the table."""
    for name, tflops in BF16_DENSE_PEAK_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return None


def count_flops(work: Callable[[], None]) -> int:
    """FLOPs of the matrix products and convolutions `work()` runs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def training_step_flops(net: Net, batch: int, config: BenchConfig) -> int:
    """FLOPs of one `DiffusionModule` training step (loss, backward) at this size and precision."""
    module = diffusion_module(net).to(config.device)
    side = net.spatial_size
    images = torch.rand((batch, 1, side, side, side), device=config.device) * 2 - 1
    labels = torch.arange(batch, device=config.device) % 2

    def step() -> None:
        with autocast(config.device, config.precision):
            loss = module.diffusion_loss(images, labels)
        loss.backward()

    return count_flops(step)


def model_flop_utilisation(flops: float, seconds: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak (None without a peak)."""
    return None if peak is None or seconds <= 0 else flops / seconds / peak


def throughput_row(net: Net, batch: int, config: BenchConfig, peak: float | None, repeats: int = 3) -> list:
    """Pretraining volumes/s, FLOP utilisation, rollout volumes/s and one PPO iteration's seconds at a size.

    Device-agnostic (the unit test runs it on the CPU); the memory column is the CUDA allocator's peak.
    """
    from dataclasses import replace

    cuda = config.device == "cuda"
    sized = replace(config, pretrain=net, pretrain_batch=batch)
    module = diffusion_module(net)
    train = lightning_steps(module, sized)
    train()  # warm-up (cuDNN benchmark picks its algorithms here)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_seconds = statistics.median(train() for _ in range(repeats))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del module, train
    flops = training_step_flops(net, batch, config)
    size = PPOSize(net, samples=batch, num_steps=config.ppo.num_steps, timestep_fraction=config.ppo.timestep_fraction,
                   micro_batch_size=min(batch, config.ppo.micro_batch_size))
    with tempfile.TemporaryDirectory() as workdir:
        ppo = ppo_module(size, Path(workdir), config)
        rollout = msrl_rollout(ppo, config)
        rollout()
        sync = synchroniser(config.device)
        rollout_seconds = statistics.median(measure(rollout, sync) for _ in range(repeats))
        ppo_iteration(ppo, config)
        iteration_seconds = statistics.median(ppo_iteration(ppo, config)["iteration"] for _ in range(2))
    return [net.label(), batch, batch / step_seconds, flops / 1e9, model_flop_utilisation(flops, step_seconds, peak),
            peak_gib, size.samples / rollout_seconds, size.num_steps, iteration_seconds]


THROUGHPUT_COLUMNS = ["size", "batch", "pretrain volumes/s", "GFLOP per step", "MFU (bf16 peak)",
                      "peak GiB (pretrain)", "rollout volumes/s", "DDIM steps", "PPO iteration s"]


def gpu_section(config: BenchConfig, report: Report) -> None:
    """The GPU throughput table (GPU preset only; the CPU presets skip it without touching CUDA)."""
    if config.device != "cuda" or not config.gpu_sizes:
        return
    name = torch.cuda.get_device_name()
    peak = bf16_peak_flops(name)
    rows = [throughput_row(net, batch, config, peak) for net, batch in config.gpu_sizes]
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown: MFU not reported"
    report.tables["gpu_throughput"] = Table(f"GPU throughput, {name}, {config.precision} (bf16 peak {peak_text})",
                                            THROUGHPUT_COLUMNS, rows)
