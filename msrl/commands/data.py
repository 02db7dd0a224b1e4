"""`msrl data check`: what a data configuration finds on disk and in its preprocessed cache, and everything wrong."""

from __future__ import annotations

import sys
from collections import Counter

from jsonargparse import ArgumentParser
from tqdm.auto import tqdm

from datamodules.base import VolumeDataModule
from datamodules.cache_index import VerifyCache
from datamodules.problems import Problem
from datamodules.splits import stratified_split
from msrl.commands.parsing import command_parser


def build_parser() -> ArgumentParser:
    """`--data` takes a data config (configs/data/<name>.yaml) or class_path/init_args; `-c` a YAML of these options."""
    parser = command_parser("msrl data check", "List subjects, labels, splits and problems of a data set on disk.")
    parser.add_subclass_arguments(VolumeDataModule, "data", required=True,
                                  help="the data module: a data config file, or class_path + init_args")
    parser.add_argument("--read-files", "--read_files", type=bool, default=True,
                        help="read every file fully (shape, spacing, NaNs; cache checksums); false: only list "
                             "them (cache sizes)")
    return parser


def cache_report(data: VolumeDataModule, verify: VerifyCache) -> tuple[str, list[Problem]]:
    """A line on the preprocessed cache, and its missing or damaged files (`VolumeDataModule.cache_problems`)."""
    if not data.cache.file.exists():
        return f"cache: none yet in {data.cache_path}", []
    try:
        checked, problems = len(data.read_index()), data.cache_problems(verify)
    except ValueError as exc:  # an unreadable index: the next prepare_data checks every file and rewrites it
        return f"cache: {data.cache.file} is unreadable", [Problem("", "", str(exc), "warning")]
    line = f"cache: {checked} files checked ({verify}) in {data.cache_path}, {len(problems)} missing or damaged"
    return line, problems


def check(data: VolumeDataModule, read_files: bool = True) -> tuple[str, list[Problem]]:
    """The report (a table) and every problem found: of the listing, of the files, of the cache."""
    records, problems = data.scan_with_duplicates()
    if read_files:
        for record in tqdm(records, desc="reading files", leave=False):
            problems += data.inspect_subject(record)
    cache_line, cache_problems = cache_report(data, data.verify_cache if read_files else "size")
    problems += cache_problems
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
    lines += ["", cache_line]
    errors = sum(p.severity == "error" for p in problems)
    lines += ["", f"{errors} error(s), {len(problems) - errors} warning(s)"] + [f"  {p}" for p in problems]
    return "\n".join(lines), problems


def main(argv: list[str]) -> None:
    """Print the report; exit 1 when there are errors."""
    if not argv or argv[0] != "check":
        print("usage: msrl data check --data configs/data/<name>.yaml [--data.init_args.root PATH]", file=sys.stderr)
        sys.exit(2)
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    data = parser.instantiate_classes(args).data
    report, problems = check(data, read_files=args.read_files)
    print(report)
    if any(p.severity == "error" for p in problems):
        sys.exit(1)
