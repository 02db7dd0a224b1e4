"""Running a study's units: a fine-tuning run (PPO or reward backpropagation) per arm × seed, then its paired
evaluation against the pretrained model (a mask arm's: against its ControlNet, with its own evaluate config).

Each step is a `msrl finetune` / `msrl evaluate` subprocess (the same commands a user runs, so a unit
is reproducible by hand from its logged command line). Requeue-safe: the fine-tuning run writes into a fixed
folder (`finetune/version_0`) and resumes from its `last.ckpt`; a finished fine-tuning run is marked by
`finetune.json`, a finished evaluation by its metrics.json (written atomically), a finished unit by
`unit.json`. Nothing finished is recomputed. On a CPU workstation units can run side by side
(`jobs`), each subprocess with its share of the cores as torch threads: on 2 cores two 1-thread PPO runs
finish in 0.69 of the time of one 2-thread run after the other (small 3D convolutions use a second
thread poorly), while two 2-thread processes oversubscribe the cores and run many times slower.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from datamodules.atomic import atomic_write_text
from msrl.study.plan import StudyPlan, Unit

log = logging.getLogger(__name__)


def finetune_command(plan: StudyPlan, unit: Unit, out: Path) -> list[str]:
    """`msrl finetune` of one unit: the arm's configs, reward and seed, its fixed run folder, resumed if begun.

    `--model.init_checkpoint` (not `--model.init_args.…`) serves both kinds of config: `msrl finetune`
    builds its model in subclass mode, and jsonargparse reads `--model.<key>` as the init argument of
    the class the configs chose (PPO by default, `RewardBackpropModule` by `model.class_path`).
    """
    arm = plan.arm(unit.arm)
    command = [sys.executable, "-m", "msrl.cli", "finetune"]
    for config in plan.arm_finetune_configs(arm):
        command += ["-c", config]
    command += ["--model.init_checkpoint", plan.pretrained,
                "--model.reward", str(out / "arms" / unit.arm / "reward.yaml"),
                "--seed_everything", str(unit.seed), "--model.seed", str(unit.seed),
                "--trainer.logger.init_args.save_dir", str(unit.folder),
                "--trainer.logger.init_args.name", "finetune",
                "--trainer.logger.init_args.version", "0", *plan.finetune_args, *arm.finetune_args]
    if unit.checkpoint.is_file():  # a requeued or interrupted unit continues where it stopped
        command += ["--ckpt_path", str(unit.checkpoint)]
    return command


def evaluate_command(plan: StudyPlan, unit: Unit) -> list[str]:
    """`msrl evaluate` of one unit: its baseline (the pretrained model, or a mask arm's ControlNet) and the arm's
    checkpoint, same seeds; a mask arm's own evaluate config, and its own options after the plan's."""
    arm = plan.arm(unit.arm)
    baseline = plan.pretrained if arm.baseline is None else arm.baseline["checkpoint"]
    return [sys.executable, "-m", "msrl.cli", "evaluate", "-c", arm.evaluate_config or plan.evaluate_config,
            "--checkpoint", baseline, "--checkpoint", str(unit.checkpoint),
            "--names", f"[{arm.baseline_name}, {unit.arm}]", "--baseline", arm.baseline_name,
            "--seed", str(plan.evaluation_seed + unit.seed),
            "--out", str(unit.evaluation), "--overwrite", "true", *plan.evaluate_args, *arm.evaluate_args]


def thread_environment(jobs: int) -> dict[str, str] | None:
    """The environment of a unit's subprocesses when `jobs` run at once: the cores shared out as threads
    (OMP_NUM_THREADS/MKL_NUM_THREADS, which torch reads at start); None (inherit) for one job at a time."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1:
        return None
    threads = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_logged(command: list[str], log_file: Path, what: str, env: dict[str, str] | None = None) -> float:
    """Run `command`, its output appended to `log_file`; return seconds; on failure raise with the log's tail."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_file.open("a") as stream:
        stream.write(f"\n$ {' '.join(command)}\n")
        stream.flush()
        code = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {code}); its log is {log_file}. Last lines:\n{tail}")
    return time.perf_counter() - start


def run_unit(plan: StudyPlan, unit: Unit, out: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    """Fine-tuning, then evaluation, then unit.json; each step skipped when already finished (`env`: the
    subprocesses' environment, None to inherit). Returns unit.json."""
    if unit.finished:
        return json.loads((unit.folder / "unit.json").read_text())
    seconds: dict[str, float] = {}
    marker = unit.folder / "finetune.json"
    if marker.is_file():
        seconds["finetune"] = json.loads(marker.read_text())["seconds"]
    else:
        print(f"  {unit.arm} seed {unit.seed}: fine-tuning (log: {unit.folder / 'finetune.log'})", flush=True)
        seconds["finetune"] = run_logged(finetune_command(plan, unit, out), unit.folder / "finetune.log",
                                         f"fine-tuning of arm {unit.arm!r} seed {unit.seed}", env)
        if not unit.checkpoint.is_file():
            raise RuntimeError(f"fine-tuning of arm {unit.arm!r} seed {unit.seed} wrote no {unit.checkpoint}")
        atomic_write_text(json.dumps({"seconds": seconds["finetune"]}), marker)
    metrics = unit.evaluation / "metrics.json"
    if metrics.is_file():
        seconds["evaluate"] = 0.0  # evaluated by an earlier job that stopped before writing unit.json
    else:
        print(f"  {unit.arm} seed {unit.seed}: evaluation against {plan.arm(unit.arm).baseline_name} (log: "
              f"{unit.folder / 'evaluate.log'})", flush=True)
        seconds["evaluate"] = run_logged(evaluate_command(plan, unit), unit.folder / "evaluate.log",
                                         f"evaluation of arm {unit.arm!r} seed {unit.seed}", env)
    threads = (env or os.environ).get("OMP_NUM_THREADS")  # None: torch's default (every core)
    record = {"arm": unit.arm, "seed": unit.seed, "status": "done", "seconds": seconds, "threads": threads,
              "checkpoint": str(unit.checkpoint), "metrics": str(metrics)}
    atomic_write_text(json.dumps(record, indent=1), unit.folder / "unit.json")
    return record


def run_units(plan: StudyPlan, units: list[Unit], out: Path, jobs: int = 1) -> list[Unit]:
    """Run `units`, `jobs` at a time in plan order; a failing unit is reported and the others still run.
    Returns the failed ones."""
    env = thread_environment(jobs)
    failed: list[Unit] = []

    def one(number: int, unit: Unit) -> None:
        if unit.finished:
            print(f"[{number}/{len(units)}] {unit.arm} seed {unit.seed}: finished earlier, kept", flush=True)
            return
        print(f"[{number}/{len(units)}] {unit.arm} seed {unit.seed}", flush=True)
        try:
            record = run_unit(plan, unit, out, env)
        except RuntimeError as error:
            log.error("%s", error)
            print(f"  {unit.arm} seed {unit.seed}: FAILED: {error}", file=sys.stderr, flush=True)
            failed.append(unit)
            return
        seconds = record["seconds"]
        print(f"  [{number}/{len(units)}] {unit.arm} seed {unit.seed} done: fine-tuning {seconds['finetune']:.0f} s, "
              f"evaluation {seconds['evaluate']:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on subprocesses
        list(pool.map(one, range(1, len(units) + 1), units))
    return [unit for unit in units if unit in failed]  # plan order
