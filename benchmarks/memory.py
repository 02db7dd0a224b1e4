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

The memory plan (`memory_plan`, same method, one fresh process per row) measures the first
stage's decoder on a 64³/128³/256³ volume whole and tiled (`TiledDecoding`), and one latent PPO
iteration at 128³ with full fine-tuning and with LoRA at 1, 2 and 3 samples, from which RESULTS.md
computes the largest batch per GPU size.
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


def measure_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the child process: tensor peak of decoding one latent (untrained VQ-GAN), whole or tiled."""
    from benchmarks.settings import Autoencoder
    from lightning_modules.first_stage.tiling import TiledDecoding
    from lightning_modules.first_stage.vqgan import AutoencoderModule

    torch.set_num_threads(1)
    autoencoder = Autoencoder(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["autoencoder"].items()})
    module = AutoencoderModule(**autoencoder.module_kwargs()).eval()
    side = spec["side"] // 2 ** autoencoder.downsample_levels
    latents = torch.randn(1, autoencoder.embedding_dim, side, side, side)
    tiling = TiledDecoding(spec["tile"], spec["overlap"], "trim")
    with torch.no_grad():
        peak = profiled_peak_bytes(lambda: tiling.decode(module.decode_latent, latents))
    return {"tensor_peak_mib": peak / MIB, "volume_mib": spec["side"] ** 3 * 4 / MIB}


def lora_arguments(rank: int) -> dict[str, Any] | None:
    """`{"lora_rank": rank}` when `PPOFinetuneModule` takes LoRA adapters (None when it does not; {} for 0)."""
    import inspect

    from lightning_modules.ppo.module import PPOFinetuneModule

    if rank == 0:
        return {}
    return {"lora_rank": rank} if "lora_rank" in inspect.signature(PPOFinetuneModule).parameters else None


def measure_ppo(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the child process: tensor peak of one latent PPO iteration (fresh Trainer, so AdamW's state too)."""
    import tempfile

    from benchmarks.finetuning import finetune_iteration
    from benchmarks.settings import PRESETS, PPOSize

    config, sizes = PRESETS[spec["preset"]], PRESETS[spec["sizes"]]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    size: PPOSize = spec_size(sizes, spec["samples"])
    with tempfile.TemporaryDirectory() as folder:
        module = latent_ppo_module(size, sizes, config, Path(folder), spec["lora_rank"])
        module.policy.latent.to(config.device)  # no warm-up iteration: the profiler counts tensors, not pages
        gc.collect()
        weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        weights += sum(t.numel() * t.element_size() for t in module.policy.latent.autoencoder.parameters())
        trainable = sum(p.numel() for p in module.policy.unet.parameters() if p.requires_grad)
        peak = profiled_peak_bytes(lambda: finetune_iteration(module, config))
    return {"tensor_peak_mib": peak / MIB, "weights_mib": weights / MIB, "trainable_parameters": trainable}


def latent_ppo_module(size: Any, sizes: BenchConfig, config: BenchConfig, workdir: Path, lora_rank: int,
                      decode_tile: tuple[int, float] | None = None) -> Any:
    """A latent `PPOFinetuneModule` on `sizes`' untrained first stage; LoRA of `lora_rank` (0: full), tiled decode.

    Raises:
        ValueError: `lora_rank` > 0 while `PPOFinetuneModule` has no `lora_rank` argument.
    """
    from benchmarks.finetuning import CostPPO, untrained_reward
    from benchmarks.latent import untrained_autoencoder
    from benchmarks.pretraining import diffusion_module

    lora = lora_arguments(lora_rank)
    if lora is None:
        raise ValueError(f"LoRA not available: PPOFinetuneModule takes no lora_rank (asked for rank {lora_rank})")
    autoencoder = untrained_autoencoder(sizes.latent.autoencoder, workdir)
    tiling = {} if decode_tile is None else {"decode_tile_size": decode_tile[0], "decode_overlap": decode_tile[1]}
    pretrained = diffusion_module(size.net, autoencoder_checkpoint=str(autoencoder), **tiling)
    checkpoint = workdir / "pretrained.ckpt"
    torch.save({"msrl_diffusion": pretrained.diffusion_spec(), "state_dict": pretrained.state_dict()}, checkpoint)
    module = CostPPO(init_checkpoint=str(checkpoint), reward=untrained_reward(workdir, size.net),
                     samples_per_iteration=size.samples, num_steps=size.num_steps, eta=1.0,
                     timestep_fraction=size.timestep_fraction, micro_batch_size=size.micro_batch_size,
                     iterations_per_epoch=1, image_every_n_iterations=0, **lora)
    return module.to(config.device)


def spec_size(config: BenchConfig, samples: int) -> Any:
    """The memory plan's PPO size: the preset's latent iteration with `samples` volumes, 1 per micro-batch."""
    from dataclasses import replace

    return replace(config.latent.iteration, samples=samples, micro_batch_size=1, num_steps=min(
        config.latent.iteration.num_steps, 3), timestep_fraction=1.0)


def _child(kind: str, spec: dict[str, Any], fresh: bool = True) -> dict[str, Any]:
    """Run one measurement in a fresh process (in this one unless `fresh`: the tiny preset) and return its JSON."""
    if not fresh:
        return {"decode": measure_decode, "ppo": measure_ppo}[kind](dict(spec))
    return fresh_process("benchmarks.memory", {**spec, "kind": kind})


def fresh_process(module: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`python -m <module> '<spec json>'` in a fresh process, one thread, glibc mmapping blocks over 128 KiB
    (freed tensors leave the resident set); the JSON it prints last."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", module, json.dumps(spec)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _finish(process)


GPU_SIZES_GB = (24, 40, 80)


def largest_batch(gpu_gb: int, weights_mib: float, two: float, three: float) -> int:
    """Samples per rank that fit: the peak grows by (three − two) MiB per sample beyond two samples'.

    Two and three, not one and two: with one sample per micro-batch, one sample makes one optimiser
    step, whose peak lacks AdamW's state (allocated by that step); from two on every peak holds it.
    """
    per_sample = max(three - two, 1e-9)
    fixed = weights_mib + two - 2 * per_sample
    return max(0, int((gpu_gb * 1e9 / MIB - fixed) // per_sample))


def memory_plan(config: BenchConfig, sizes: BenchConfig, decode_sides: tuple[int, ...], tile: int,
                overlap: float) -> list[Table]:
    """Decoder peaks whole vs tiled per volume side, and latent PPO peaks full vs LoRA with the largest batches.

    Measured as `config` runs (device, precision), at the latent sizes of `sizes` (the GPU preset's
    128³ → 8×32³ first stage and latent UNet for `make bench`).
    """
    autoencoder, fresh = asdict(sizes.latent.autoencoder), config.name != "tiny"
    rows = []
    for side in decode_sides:
        whole, tiled = (_child("decode", {"autoencoder": autoencoder, "side": side, "tile": t, "overlap": overlap},
                               fresh) for t in (None, tile))
        rows.append([f"{side}³", whole["volume_mib"], whole["tensor_peak_mib"], tiled["tensor_peak_mib"],
                     tiled["tensor_peak_mib"] / whole["tensor_peak_mib"]])
    decode = Table(f"Peak tensor memory of decoding one volume (MiB; the {sizes.latent.autoencoder.latent_label()} "
                   f"VQ-GAN's decoder, tiles of {tile}³ latent voxels, overlap {overlap}, trim)",
                   ["volume", "volume itself", "whole", "tiled", "tiled / whole"], rows)
    size = spec_size(sizes, 1)
    ppo_rows = []
    for name, rank in (("full fine-tuning", 0), ("LoRA rank 8", 8)):
        if lora_arguments(rank) is None:
            ppo_rows.append([name, "LoRA not available", None, None, None, None, *(None for _ in GPU_SIZES_GB)])
            continue
        runs = [_child("ppo", {"preset": config.name, "sizes": sizes.name, "samples": n, "lora_rank": rank}, fresh)
                for n in (1, 2, 3)]
        peaks = [run["tensor_peak_mib"] for run in runs]
        ppo_rows.append([name, runs[0]["trainable_parameters"], runs[0]["weights_mib"], *peaks,
                         *(largest_batch(gb, runs[0]["weights_mib"], peaks[1], peaks[2]) for gb in GPU_SIZES_GB)])
    ppo = Table(f"Peak tensor memory of one latent PPO iteration ({size.net.label()} on "
                f"{sizes.latent.autoencoder.latent_label()} latents, {size.num_steps} DDIM steps, 1 sample per "
                f"micro-batch; MiB, {config.precision}, {config.device}) and the largest samples per iteration "
                "that fit (computed)",
                ["variant", "trainable parameters", "weights", "peak, 1 sample", "peak, 2 samples", "peak, 3 samples",
                 *(f"largest batch, {gb} GB" for gb in GPU_SIZES_GB)], ppo_rows)
    return [decode, ppo]


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    kind = request.pop("kind", "step")
    print(json.dumps({"step": measure, "decode": measure_decode, "ppo": measure_ppo}[kind](request)))
