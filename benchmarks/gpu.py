"""The GPU path of `make bench GPU=1`: throughput at 64³/128³ in bf16 and the model FLOP utilisation.

Three tables, one prepared run (≤ 8 minutes on one GPU): pretraining volumes/s at 64³ and 128³ with
flash attention and channels-last / `torch.compile` each on and off; a latent PPO iteration at 128³
(8×32³ latents) with full fine-tuning or LoRA and whole or tiled decoding; peak memory and model FLOP
utilisation of every row. `python -m benchmarks --gpu-dry-run` runs the same rows at 16³ on the CPU
(compile with the "eager" backend) so that the path is tested without a GPU.

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` records the matrix
products and convolutions (forward and backward) of one training step, which is the usual
"model FLOPs" convention (normalisation and elementwise work are not counted). Utilisation is
those FLOPs per second of a measured step against the GPU's dense bf16 peak from
`BF16_DENSE_PEAK_TFLOPS`. Nothing here touches CUDA unless the config's device is "cuda".
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.finetuning import finetune_iteration, msrl_rollout, ppo_module
from benchmarks.harness import Report, Table, measure
from benchmarks.memory import latent_ppo_module, lora_arguments
from benchmarks.pretraining import autocast, diffusion_module, lightning_steps, synchroniser
from benchmarks.settings import GPU, TINY, BenchConfig, Net, PPOSize

log = logging.getLogger(__name__)

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
        finetune_iteration(ppo, config)
        iteration_seconds = statistics.median(finetune_iteration(ppo, config)["iteration"] for _ in range(2))
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
    gpu_tables(config, GPU_PLAN, report, name)


@dataclass(frozen=True)
class GpuPlan:
    """The rows of `make bench GPU=1` (and of its CPU dry run).

    Attributes:
        pretrain: (network, batch) of the pretraining rows (64³ and 128³).
        layouts: (channels_last, compile) combinations measured per pretraining size.
        sizes: the preset whose latent first stage and PPO iteration the PPO rows use (128³ → 8×32³).
        lora_rank: rank of the LoRA rows.
        decode_tile: (tile side in latent voxels, overlap) of the tiled rows.
        repeats: timed repetitions per row, after one warm-up.
        compile_backend: `torch.compile` backend ("inductor" on the GPU, "eager" in the CPU dry run).
    """

    pretrain: tuple[tuple[Net, int], ...]
    sizes: BenchConfig
    decode_tile: tuple[int, float]
    layouts: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
    lora_rank: int = 8
    repeats: int = 3
    compile_backend: str = "inductor"


GPU_PLAN = GpuPlan(pretrain=GPU.gpu_sizes, sizes=GPU, decode_tile=(16, 0.625))
DRY_PLAN = GpuPlan(pretrain=((TINY.pretrain, 1),), sizes=TINY, decode_tile=(2, 0.5), repeats=1,
                   compile_backend="eager")


def _peak_gib(cuda: bool) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def layout_row(net: Net, batch: int, channels_last: bool, compiled: bool, config: BenchConfig, plan: GpuPlan,
               peak: float | None) -> list:
    """Pretraining volumes/s, GFLOP per step, MFU and peak GiB with flash attention and this layout."""
    cuda = config.device == "cuda"
    module = diffusion_module(net, use_flash_attention=True, channels_last=channels_last)
    if compiled:  # what compile_unet does (nn.Module.compile), with the plan's backend
        module.unet.compile(backend=plan.compile_backend)
    train = lightning_steps(module, replace(config, pretrain=net, pretrain_batch=batch))
    train()  # warm-up: compilation, cuDNN's algorithm search
    _reset_peak(cuda)
    seconds = statistics.median(train() for _ in range(plan.repeats))
    peak_gib = _peak_gib(cuda)
    flops = training_step_flops(net, batch, config)
    return [net.label(), batch, channels_last, compiled, batch / seconds, flops / 1e9,
            model_flop_utilisation(flops, seconds, peak), peak_gib]


LAYOUT_COLUMNS = ["size", "batch", "channels-last", "torch.compile", "pretrain volumes/s", "GFLOP per step",
                  "MFU (bf16 peak)", "peak GiB"]


def latent_ppo_row(lora_rank: int, tiled: bool, config: BenchConfig, plan: GpuPlan, peak: float | None) -> list:
    """One latent PPO iteration: seconds, volumes/s, decode seconds, GFLOP, MFU and peak GiB."""
    size = plan.sizes.latent.iteration
    variant = "full fine-tuning" if lora_rank == 0 else f"LoRA rank {lora_rank}"
    decode = f"tiled {plan.decode_tile[0]}³" if tiled else "whole"
    if lora_arguments(lora_rank) is None:
        return [variant, decode, size.samples, size.num_steps, "LoRA not available", None, None, None, None, None]
    cuda = config.device == "cuda"
    with tempfile.TemporaryDirectory() as workdir:
        module = latent_ppo_module(size, plan.sizes, config, Path(workdir), lora_rank,
                                   plan.decode_tile if tiled else None)
        finetune_iteration(module, config)  # warm-up
        _reset_peak(cuda)
        runs = [finetune_iteration(module, config) for _ in range(plan.repeats)]
        peak_gib = _peak_gib(cuda)
        flops = count_flops(lambda: finetune_iteration(module, config))
    seconds = statistics.median(run["iteration"] for run in runs)
    return [variant, decode, size.samples, size.num_steps, seconds, size.samples / seconds,
            statistics.median(run["decode"] for run in runs), flops / 1e9,
            model_flop_utilisation(flops, seconds, peak), peak_gib]


PPO_COLUMNS = ["variant", "decode", "samples", "DDIM steps", "iteration s", "volumes/s", "decode s",
               "GFLOP per iteration", "MFU (bf16 peak)", "peak GiB"]


def gpu_tables(config: BenchConfig, plan: GpuPlan, report: Report, device_name: str) -> None:
    """The pretraining-layout and latent-PPO tables of `make bench GPU=1` (any device: the dry run uses the CPU)."""
    peak = bf16_peak_flops(device_name)
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown: MFU not reported"
    rows = []
    for net, batch in plan.pretrain:
        for channels_last, compiled in plan.layouts:
            log.info("  gpu: pretraining %s, channels-last %s, compile %s", net.label(), channels_last, compiled)
            rows.append(layout_row(net, batch, channels_last, compiled, config, plan, peak))
    report.tables["gpu_pretraining"] = Table(
        f"Pretraining on {device_name}, {config.precision}, flash attention (bf16 peak {peak_text})",
        LAYOUT_COLUMNS, rows)
    ppo_rows = []
    for lora_rank in (0, plan.lora_rank):
        for tiled in (False, True):
            log.info("  gpu: latent PPO, LoRA rank %d, tiled %s", lora_rank, tiled)
            ppo_rows.append(latent_ppo_row(lora_rank, tiled, config, plan, peak))
    autoencoder = plan.sizes.latent.autoencoder
    report.tables["gpu_latent_ppo"] = Table(
        f"One latent PPO iteration at {autoencoder.spatial_size}³ ({autoencoder.latent_label()} latents, "
        f"{plan.sizes.latent.iteration.net.label()} UNet) on {device_name}, {config.precision}", PPO_COLUMNS,
        ppo_rows)


def gpu_dry_run(report: Report) -> None:
    """Every row of the GPU run at 16³ on the CPU (tests the path; its numbers mean nothing)."""
    gpu_tables(TINY, DRY_PLAN, report, "cpu (dry run)")
