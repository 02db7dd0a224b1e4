"""`msrl data check`: what a data configuration finds on disk, and everything wrong with it."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from tqdm.auto import tqdm

from datamodules.base import VolumeDataModule
from datamodules.problems import Problem
from datamodules.splits import stratified_split


def build_parser() -> ArgumentParser:
    """`-c`/`--data` take a data config (class_path + init_args) or a run config's `data:`."""
    parser = ArgumentParser(prog="msrl data check", description="List subjects, labels, splits and problems.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML of these options (`-c` takes data configs)")
    parser.add_subclass_arguments(VolumeDataModule, "data", required=True, help="the data module (class_path/YAML)")
    parser.add_argument("--read-files", "--read_files", type=bool, default=True,
                        help="read every file fully (shape, spacing, NaNs); false: only list them")
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    """`-c FILE` is a data config (top-level class_path) or a run config, whose `data:` is used."""
    out, index = [], 0
    while index < len(argv):
        if argv[index] != "-c" or index + 1 == len(argv):
            out.append(argv[index])
            index += 1
            continue
        path = Path(argv[index + 1])
        content = yaml.safe_load(path.read_text()) if path.is_file() else None
        data = content.get("data") if isinstance(content, dict) and "data" in content else None
        if isinstance(data, str):  # `data: ../data/x.yaml`, relative to the run config
            out += ["--data", str((path.parent / data).resolve())]
        elif isinstance(data, dict):
            out += ["--data", yaml.safe_dump(data)]
        else:
            out += ["--data", str(path)]
        index += 2
    return out


def check(data: VolumeDataModule, read_files: bool = True) -> tuple[str, list[Problem]]:
    """The report (a table) and every problem found, listing problems and file problems alike."""
    records, problems = data.scan_with_duplicates()
    if read_files:
        for record in tqdm(records, desc="reading files", leave=False):
            problems += data.inspect_subject(record)
    bad = {p.subject_id for p in problems if p.severity == "error"}
    usable = [r for r in records if r.subject_id not in bad]
    lines = [f"{type(data).__name__}: {len(records)} subjects found, {len(usable)} usable", ""]
    labels = Counter(r.label for r in usable)
    lines += ["label   subjects"] + [f"{label:>5}   {count:>8}" for label, count in sorted(labels.items())]
    if usable:
        split = stratified_split([r.label for r in usable], data.val_fraction, data.test_fraction, data.seed)
        lines += ["", "split   subjects   per label"]
        for name, indices in split.items():
            per_label = Counter(usable[i].label for i in indices)
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(per_label.items()))
            lines.append(f"{name:<6}  {len(indices):>8}   {counts}")
    errors = sum(p.severity == "error" for p in problems)
    lines += ["", f"{errors} error(s), {len(problems) - errors} warning(s)"] + [f"  {p}" for p in problems]
    return "\n".join(lines), problems


def main(argv: list[str]) -> None:
    """Print the report; exit 1 when there are errors."""
    if not argv or argv[0] != "check":
        print("usage: msrl data check -c configs/data/<name>.yaml [--data.init_args.root PATH]", file=sys.stderr)
        sys.exit(2)
    args = build_parser().parse_args(_normalise_argv(argv[1:]))
    data = build_parser().instantiate_classes(args).data
    report, problems = check(data, read_files=args.read_files)
    print(report)
    if any(p.severity == "error" for p in problems):
        sys.exit(1)
