"""Peak memory of a `DiffusionModule` training step, with and without activation checkpointing.

Each measurement runs in a fresh process (`python -m benchmarks.memory '<spec json>'`), so that no
allocator cache, earlier peak or other variant's buffers carry over. In that process:

1. build the model, AdamW and a batch, and take one warm-up step (AdamW's state and the thread
   pools' buffers are allocated there, once, alike in both variants); gradients are then freed;
2. on the CPU, run one step under `torch.profiler` with `profile_memory=True`: every tensor
   allocation and free is recorded in order, and the maximum of their running sum is the step's
   peak tensor memory above the steady state (activations kept for backward, recomputed blocks,
   gradients, temporaries). This counts tensors only, independent of how malloc reuses pages;
3. as a cross-check, reset the kernel's resident-set high-water mark (`/proc/self/clear_refs`),
   run another step and read VmHWM − VmRSS (glibc is told to mmap every block over 128 KiB,
   `MALLOC_MMAP_THRESHOLD_`, so freed tensors leave the resident set);
4. on a GPU, `torch.cuda.max_memory_allocated()` − `memory_allocated()` around the step.

Besides msrl's checkpointing (each down/middle/up block recomputed whole) a third variant
recomputes each ResNet and attention block on its own: not what msrl does, but what finer
checkpointing would give (RESULTS.md).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks.harness import PairResult, Table
from benchmarks.settings import BenchConfig, Net

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
Checkpointing = Literal["none", "blocks"]
VARIANTS: dict[Checkpointing, str] = {"blocks": "msrl's checkpointing (each ResNet/attention block)",
                                      "none": "without checkpointing"}


def profiled_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the running sum of CPU tensor allocations and frees during `step()` (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [(event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for _, nbytes in sorted(events, key=lambda event: event[0]):
        running += nbytes
        peak = max(peak, running)
    return peak


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {key}")


def resident_peak_bytes(step: Callable[[], None]) -> int | None:
    """VmHWM after `step()` − VmRSS before it, the high-water mark reset first (None where Linux refuses)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except (OSError, KeyError):
        return None
    step()
    return (_status_kib("VmHWM") - before) * 1024


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the child process: the peaks of one variant, in MiB."""
    from benchmarks.pretraining import autocast, diffusion_module

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    net = Net(**{key: tuple(v) if isinstance(v, list) else v for key, v in spec["net"].items()})
    device, precision, batch = spec["device"], spec["precision"], spec["batch"]
    module = diffusion_module(net, activation_checkpointing=spec["checkpointing"] == "blocks")
    module = module.to(device).train()
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-4)
    side = net.spatial_size
    images = torch.rand((batch, 1, side, side, side), device=device) * 2 - 1
    labels = torch.arange(batch, device=device) % 2

    def step() -> None:
        with autocast(device, precision):
            loss = module.diffusion_loss(images, labels, label_dropout=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    gc.collect()
    parameters = sum(p.numel() * p.element_size() for p in module.unet.parameters())
    result: dict[str, Any] = {"parameters_mib": parameters / MIB}
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        result["tensor_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / MIB
        result["rss_peak_mib"] = None
    else:
        rss = resident_peak_bytes(step)
        result["rss_peak_mib"] = None if rss is None else rss / MIB
        result["tensor_peak_mib"] = profiled_peak_bytes(step) / MIB
    return result


def _start(config: BenchConfig, checkpointing: Checkpointing) -> subprocess.Popen:
    spec = {"net": asdict(config.memory), "batch": config.memory_batch, "device": config.device,
            "precision": config.precision, "threads": config.threads, "checkpointing": checkpointing}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if config.threads:
        env["OMP_NUM_THREADS"] = str(config.threads)
    return subprocess.Popen([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"memory measurement failed (exit {process.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def checkpointing_memory(config: BenchConfig) -> tuple[PairResult, Table]:
    """`ckpt_memory_ratio` (tensor peaks, msrl's checkpointing / none), and every variant's peaks.

    The variants of a repetition run at the same time, each in its own process: memory, not time,
    is measured, so they do not disturb each other.
    """
    unknown = set(config.memory_variants) - set(VARIANTS)
    if unknown or not {"blocks", "none"} <= set(config.memory_variants):
        raise ValueError(f"memory_variants must include 'blocks' and 'none' and be among {list(VARIANTS)}, "
                         f"got {list(config.memory_variants)}")
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in config.memory_variants}
    for _ in range(config.memory_repeats):
        processes = {variant: _start(config, variant) for variant in config.memory_variants}
        for variant, process in processes.items():
            runs[variant].append(_finish(process))
    pair = PairResult("ckpt_memory_ratio", [r["tensor_peak_mib"] for r in runs["blocks"]],
                      [r["tensor_peak_mib"] for r in runs["none"]], 0.60, "step, activation checkpointing",
                      "without", unit="MiB")
    size = f"{config.memory.label()} batch {config.memory_batch}"
    rows = [[VARIANTS[variant], size, r["parameters_mib"], r["tensor_peak_mib"], r["rss_peak_mib"],
             r["tensor_peak_mib"] / runs["none"][index]["tensor_peak_mib"]]
            for variant, results in runs.items() for index, r in enumerate(results)]
    table = Table("Peak memory of one training step above the steady state (MiB), one fresh process each",
                  ["variant", "size", "UNet weights", "tensor peak (profiler)", "RSS peak (VmHWM − VmRSS)",
                   "tensor peak / without"], rows)
    return pair, table


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
