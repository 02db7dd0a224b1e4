"""The benchmark sections, in the order `make bench` runs them.

A section is a function `(config, report) -> None` that measures something and adds rows
(`report.add_pair`) or tables (`report.tables[...]`). To add a row, write a section that builds
two zero-argument callables and hands them to `compare`, then append it to `SECTIONS`, as
`latent` does for `latent_rollout_ratio`:

    report.add_pair(compare("latent_rollout_ratio", rollout_to_volumes(latent, config),
                            rollout_to_volumes(voxel, config), goal=0.10, repeats=..., a_label=..., b_label=...,
                            sync=synchroniser(config.device)))
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.backprop import backprop_section
from benchmarks.finetuning import (
    finetune_iteration,
    monai_rollout,
    msrl_rollout,
    ppo_module,
    ppo_update_per_pass,
    sampler_arithmetic,
    unet_forward_backward,
    update_passes,
)
from benchmarks.gpu import gpu_section
from benchmarks.harness import PairResult, Report, Table, compare, medians
from benchmarks.latent import PHASES as LATENT_PHASES
from benchmarks.latent import latent_split, rollout_to_volumes, untrained_autoencoder
from benchmarks.memory import checkpointing_memory, memory_plan
from benchmarks.pretraining import HandWrittenTraining, diffusion_module, lightning_steps, synchroniser
from benchmarks.settings import PRESETS, BenchConfig, LatentBench, PPOSize
from lightning_modules.ppo.module import PPOFinetuneModule

log = logging.getLogger(__name__)

Section = Callable[[BenchConfig, Report], None]
PHASES = ("rollout", "reward", "update")


def pretrain_step(config: BenchConfig, report: Report) -> None:
    """`pretrain_step_ratio`: a DiffusionModule step through the Trainer against a hand-written loop."""
    module = diffusion_module(config.pretrain)
    baseline = HandWrittenTraining(module, config)
    report.add_pair(compare(
        "pretrain_step_ratio", lightning_steps(module, config), baseline, goal=1.05, repeats=config.repeats,
        a_label="DiffusionModule step, Trainer", b_label="hand-written loop", sync=synchroniser(config.device)))


def ppo(config: BenchConfig, report: Report) -> None:
    """`rollout_ratio`, `ppo_update_ratio`, `reward_share` and the split of one PPO iteration."""
    with tempfile.TemporaryDirectory() as workdir:
        module = ppo_module(config.ppo, Path(workdir), config)
        rollout_rows(module, config, report)
        update_rows(module, config, report)


def rollout_rows(module: PPOFinetuneModule, config: BenchConfig, report: Report) -> None:
    """`rollout_ratio`, and the same two samplers without the UNet (what the samplers themselves cost)."""
    size, sync = config.ppo, synchroniser(config.device)
    rollout = compare(
        "rollout_ratio", msrl_rollout(module, config), monai_rollout(module, size, config), goal=1.00,
        repeats=config.repeats, a_label="msrl sampler, log-probs", b_label="MONAI DiffusionInferer", sync=sync)
    report.add_pair(rollout)
    msrl_arithmetic, monai_arithmetic = sampler_arithmetic(module, size, config)
    arithmetic = compare(
        "rollout_arithmetic_ratio", msrl_arithmetic, monai_arithmetic, goal=None, repeats=config.repeats,
        a_label="msrl sampler, UNet taken out", b_label="MONAI inferer, UNet taken out", sync=sync)
    report.add_pair(arithmetic)
    extra = statistics.median(arithmetic.a) - statistics.median(arithmetic.b)
    report.notes.append(f"msrl's sampler itself (log-probs, trajectory) costs {1e3 * extra:.2f} ms more per rollout "
                        f"than MONAI's DDIM step: {100 * extra / statistics.median(rollout.a):.2f}% of msrl's rollout.")


def update_rows(module: PPOFinetuneModule, config: BenchConfig, report: Report) -> None:
    """`ppo_update_ratio` and, from the same PPO iterations, `reward_share` and the split table."""
    size = config.ppo
    iterations: list[dict[str, float]] = []
    report.add_pair(compare(
        "ppo_update_ratio", ppo_update_per_pass(module, config, iterations),
        unet_forward_backward(module, size, config), goal=1.15, repeats=config.repeats,
        a_label="PPO update per trained step", b_label="UNet forward+backward", sync=synchroniser(config.device)))
    timed = iterations[-config.repeats:]  # the warm-up iteration left out
    expected = update_passes(size)
    if any(split["passes"] != expected for split in timed):
        log.warning("PPO made %s UNet passes per update, the baseline %d", [s["passes"] for s in timed], expected)
    report.add_pair(PairResult("reward_share", [s["reward"] for s in timed], [s["iteration"] for s in timed],
                               0.10, "reward computation", "whole PPO iteration"))
    title = (f"One PPO iteration ({size.net.label()}, {size.samples} samples, {size.num_steps} DDIM steps), "
             f"medians of {len(timed)} iterations")
    report.tables["ppo_split"] = split_table(title, [(size, medians(timed, (*PHASES, "iteration")))])


def split_table(title: str, runs: list[tuple[PPOSize, dict[str, float]]]) -> Table:
    """Rows of seconds and shares per phase; "other" is advantages and logging."""
    rows = []
    for size, t in runs:
        other = t["iteration"] - sum(t[p] for p in PHASES)
        rows.append([size.net.label(), size.num_steps, update_passes(size), *(t[p] for p in PHASES), other,
                     t["iteration"], *(f"{100 * t[p] / t['iteration']:.1f}%" for p in PHASES)])
    return Table(title, ["size", "DDIM steps", "trained passes", "rollout s", "reward s", "update s", "other s",
                         "iteration s", "rollout", "reward", "update"], rows)


def latent(config: BenchConfig, report: Report) -> None:
    """`latent_rollout_ratio` and the split of one latent PPO iteration into rollout / decode / reward / update."""
    with tempfile.TemporaryDirectory() as workdir:
        autoencoder = untrained_autoencoder(config.latent.autoencoder, Path(workdir))
        latent_rollout_row(config, report, autoencoder, Path(workdir))
        latent_split_table(config, report, autoencoder, Path(workdir))


def _fresh(folder: Path) -> Path:
    folder.mkdir()
    return folder


def latent_rollout_row(config: BenchConfig, report: Report, autoencoder: Path, workdir: Path) -> None:
    """`latent_rollout_ratio`: rollout in the latent space plus the decoder, over the voxel-space rollout."""
    bench = config.latent
    latent_policy = ppo_module(bench.rollout, _fresh(workdir / "latent_rollout"), config, autoencoder)
    voxel_policy = ppo_module(bench.voxel_rollout(), _fresh(workdir / "voxel_rollout"), config)
    report.add_pair(compare(
        "latent_rollout_ratio", rollout_to_volumes(latent_policy, config), rollout_to_volumes(voxel_policy, config),
        goal=0.10, repeats=bench.rollout_repeats, a_label=f"latent rollout + decode, {_latent_label(bench)}",
        b_label=f"voxel rollout, {bench.voxel_net.label()}", sync=synchroniser(config.device)))


def _latent_label(bench: LatentBench) -> str:
    """E.g. `64³ via 8×16³ (32,64,64)`: volume side, latent, latent UNet channels."""
    net = bench.rollout.net
    return f"{net.spatial_size}³ via {bench.autoencoder.latent_label()} ({','.join(map(str, net.channels))})"


def latent_split_table(config: BenchConfig, report: Report, autoencoder: Path, workdir: Path) -> None:
    """One latent PPO iteration's seconds per phase, medians of `config.repeats` after a warm-up."""
    bench, size = config.latent, config.latent.iteration
    module = ppo_module(size, _fresh(workdir / "latent_iteration"), config, autoencoder)
    finetune_iteration(module, config)  # warm-up
    timed = [latent_split(finetune_iteration(module, config)) for _ in range(config.repeats)]
    t = medians(timed, (*LATENT_PHASES, "iteration"))
    other = t["iteration"] - sum(t[p] for p in LATENT_PHASES)
    row = [_latent_label(bench), size.num_steps, update_passes(size), *(t[p] for p in LATENT_PHASES), other,
           t["iteration"], *(f"{100 * t[p] / t['iteration']:.1f}%" for p in LATENT_PHASES)]
    title = (f"One latent PPO iteration ({size.samples} samples, {size.num_steps} DDIM steps; reward = decode + "
             f"scoring), medians of {len(timed)} iterations")
    report.tables["latent_split"] = Table(
        title, ["size", "DDIM steps", "trained passes", "rollout s", "decode s", "scoring s", "update s", "other s",
                "iteration s", "rollout", "decode", "scoring", "update"], [row])


def scaling(config: BenchConfig, report: Report) -> None:
    """How one PPO iteration grows with the volume side and with the number of DDIM steps."""
    measured: dict[tuple[int, int], tuple[PPOSize, dict[str, float]]] = {}

    def point(side: int, steps: int) -> tuple[PPOSize, dict[str, float]]:
        if (side, steps) not in measured:  # the two tables share a point
            size = PPOSize(config.scaling_net.at(side), config.scaling_samples, steps,
                           config.ppo.timestep_fraction, config.scaling_samples)
            with tempfile.TemporaryDirectory() as workdir:
                module = ppo_module(size, Path(workdir), config)
                finetune_iteration(module, config)  # warm-up
                log.info("  scaling %s, %d steps", size.net.label(), steps)
                measured[side, steps] = size, finetune_iteration(module, config)
        return measured[side, steps]

    samples = f"{config.scaling_samples} sample{'s' if config.scaling_samples != 1 else ''} per iteration"
    by_size = [point(side, config.scaling_size_steps) for side in config.scaling_sizes]
    report.tables["scaling_size"] = split_table(
        f"One PPO iteration by volume side ({samples}, {config.scaling_size_steps} DDIM steps)", by_size)
    side = config.scaling_steps_size()
    by_steps = [point(side, steps) for steps in config.scaling_steps]
    report.tables["scaling_steps"] = split_table(
        f"One PPO iteration by DDIM steps ({config.scaling_net.at(side).label()}, {samples})", by_steps)


def memory(config: BenchConfig, report: Report) -> None:
    """`ckpt_memory_ratio`: peak memory of a training step with and without activation checkpointing."""
    pair, table = checkpointing_memory(config)
    report.add_pair(pair)
    report.tables["memory"] = table


# The memory plan's sizes per preset: `make bench` measures the GPU preset's 128³ → 8×32³ latent model
# on the CPU; decoding at these volume sides, in tiles of TILE³ latent voxels with OVERLAP (margin 5).
PLAN_SIZES = {"cpu": ("gpu", (64, 128, 256)), "gpu": ("gpu", (64, 128, 256)), "tiny": ("tiny", (16, 32))}
PLAN_TILE = {"cpu": (16, 0.625), "gpu": (16, 0.625), "tiny": (2, 0.5)}


def plan(config: BenchConfig, report: Report) -> None:
    """Decoder peaks whole vs tiled at 64³/128³/256³ and latent PPO peaks full vs LoRA (memory plan)."""
    sizes, sides = PLAN_SIZES[config.name]
    tile, overlap = PLAN_TILE[config.name]
    decode, ppo_memory = memory_plan(config, PRESETS[sizes], sides, tile, overlap)
    report.tables["decode_memory"] = decode
    report.tables["ppo_memory"] = ppo_memory


SECTIONS: list[tuple[str, Section]] = [
    ("pretrain", pretrain_step),
    ("ppo", ppo),
    ("latent", latent),
    ("backprop", backprop_section),
    ("memory", memory),
    ("plan", plan),
    ("scaling", scaling),
    ("gpu", gpu_section),
]


def run_sections(config: BenchConfig, report: Report, names: list[str] | None = None) -> None:
    """Run the named sections (all by default) in `SECTIONS` order."""
    known = [name for name, _ in SECTIONS]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"unknown benchmark sections {unknown}; known: {known}")
    for name, section in SECTIONS:
        if names is None or name in names:
            log.info("section %s (%s preset)", name, config.name)
            section(config, report)
