"""`python -m benchmarks` (what `make bench` runs): every section, the tables, results.json, RESULTS.md.

    python -m benchmarks                  # CPU sizes; writes benchmarks/results.json, updates RESULTS.md
    python -m benchmarks --gpu            # the GPU run (bf16, ≤ 8 min): benchmarks/results_gpu.json
    python -m benchmarks --gpu-dry-run --out x  # every GPU row at 16³ on the CPU: checks that path (tests)
    python -m benchmarks --tiny --out x   # 16³, one repetition: checks the machinery (tests)
    python -m benchmarks --sections ppo   # some sections only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu import gpu_dry_run
from benchmarks.harness import Report, update_markdown_block
from benchmarks.sections import SECTIONS, run_sections
from benchmarks.settings import PRESETS, TINY, BenchConfig

HERE = Path(__file__).resolve().parent


def _cpu_name() -> str:
    with contextlib.suppress(OSError):  # no /proc (macOS): fall back to what platform knows
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(config: BenchConfig) -> str:
    """The machine in words: cores, CPU, GPU (asked of CUDA only on the GPU preset)."""
    gpu = torch.cuda.get_device_name() if config.device == "cuda" else "no GPU used"
    return f"{os.cpu_count()} CPU cores ({_cpu_name()}), {gpu}; {platform.system()} {platform.release()}"


def context(config: BenchConfig, command: str) -> dict[str, Any]:
    """results.json's `meta`: when, where, with what, at which sizes."""
    import lightning
    import monai

    threads = (f"torch intra-op threads: {config.threads}" if config.threads
               else f"torch intra-op threads: default ({torch.get_num_threads()})")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command, "machine": machine(config), "preset": config.name, "repeats": config.repeats,
            "threads": threads, "device": config.device, "precision": config.precision,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "monai": monai.__version__, "lightning": lightning.__version__},
            "config": dataclasses.asdict(config)}


def _quiet() -> None:
    """Lightning's per-fit banners and data-loader hints are noise here: every fit is a benchmark's."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


# What `make bench GPU=1` runs unless --sections says otherwise: the GPU section alone fits in 8 minutes
GPU_SECTIONS = ["gpu"]


def run_benchmarks(config: BenchConfig, command: str, sections: list[str] | None = None,
                   dry_run: bool = False) -> Report:
    """Run the sections at these sizes (or, `dry_run`, the GPU rows at 16³ on the CPU); nothing written."""
    _quiet()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithms
    torch.manual_seed(0)
    start = time.perf_counter()
    report = Report(meta=context(config, command))
    if dry_run:
        gpu_dry_run(report)
    else:
        run_sections(config, report, sections)
    report.meta["wall_seconds"] = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line of `make bench`; prints the report as markdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--gpu", action="store_true", help="GPU sizes: 64³/128³, bf16-mixed (needs CUDA)")
    size.add_argument("--tiny", action="store_true", help="16³, one repetition: checks the machinery only")
    size.add_argument("--gpu-dry-run", action="store_true",
                      help="the GPU run's rows at 16³ on the CPU, one repetition: checks that path only")
    parser.add_argument("--repeats", type=int, help="timed repetitions per pair (default: the preset's)")
    parser.add_argument("--sections", help=f"comma-separated subset of {[name for name, _ in SECTIONS]}")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results.json, "
                                                 "results_gpu.json with --gpu)")
    parser.add_argument("--markdown", type=Path, help="RESULTS.md whose block of this preset is replaced "
                                                      "(default benchmarks/RESULTS.md, none with --tiny or --out)")
    args = parser.parse_args(argv)
    config = TINY if args.gpu_dry_run else PRESETS["gpu" if args.gpu else "tiny" if args.tiny else "cpu"]
    if args.repeats:
        config = dataclasses.replace(config, repeats=args.repeats)
    if config.device == "cuda" and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; this torch sees none")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MSRL_BENCH_COMMAND"):  # `make bench` says what the user typed
        command = os.environ["MSRL_BENCH_COMMAND"]
    sections = args.sections.split(",") if args.sections else (GPU_SECTIONS if args.gpu else None)
    report = run_benchmarks(config, command.strip(), sections, dry_run=args.gpu_dry_run)
    text = report.markdown()
    print(text)
    out = args.out or HERE / ("results_gpu.json" if config.device == "cuda" else "results.json")
    report.write_json(out)
    markdown = args.markdown or (None if args.tiny or args.gpu_dry_run or args.out else HERE / "RESULTS.md")
    if markdown is not None:
        update_markdown_block(markdown, config.name, text)
    print(f"\nwrote {out}" + (f" and the `{config.name}` block of {markdown}" if markdown else ""))
    return 0
