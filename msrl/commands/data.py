"""`msrl data check`: what a data configuration finds on disk and in its preprocessed cache, and everything wrong;
`msrl data masks`: a split's cached lesion masks as NIfTI files, the masks `msrl sample --mask` takes."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from tqdm.auto import tqdm

from datamodules.atomic import atomic_folder
from datamodules.base import VolumeDataModule
from datamodules.cache_index import VerifyCache
from datamodules.problems import Problem
from datamodules.splits import stratified_split
from msrl.commands.parsing import command_parser
from msrl.samples import split_masks, write_split_masks

USAGE = ("usage: msrl data check --data configs/data/<name>.yaml [--data.init_args.root PATH]\n"
         "       msrl data masks --data configs/data/<name>.yaml --split test --out masks/")


def data_argv(argv: list[str]) -> list[str]:
    """`argv` with `--data RUN_CONFIG` (a training config: `data:` holds the data module) replaced by its `data:`.

    A data YAML (class_path + init_args, e.g. configs/data/template.yaml) passes unchanged.
    """
    out: list[str] = []
    for arg in argv:  # `--data=PATH` as `--data PATH`
        out += arg.split("=", 1) if arg.startswith("--data=") else [arg]
    for index, arg in enumerate(out[:-1]):
        path = Path(out[index + 1])
        if arg == "--data" and path.suffix in (".yaml", ".yml") and path.is_file():
            loaded = yaml.safe_load(path.read_text())
            if isinstance(loaded, dict) and "class_path" not in loaded and isinstance(loaded.get("data"), dict):
                out[index + 1] = json.dumps(loaded["data"])
    return out


def build_parser() -> ArgumentParser:
    """`--data` takes a data config (configs/data/<name>.yaml) or class_path/init_args; `-c` a YAML of these options."""
    parser = command_parser("msrl data check", "List subjects, labels, splits and problems of a data set on disk.")
    parser.add_subclass_arguments(VolumeDataModule, "data", required=True,
                                  help="the data module: a data config file, a training config (its data:), or "
                                       "class_path + init_args")
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


def masks_parser() -> ArgumentParser:
    """Options of `msrl data masks`."""
    parser = command_parser("msrl data masks", "Write each cached subject's lesion mask of a split as "
                                               "<subject>_seg.nii.gz (RAS+), for msrl sample --mask.")
    parser.add_subclass_arguments(VolumeDataModule, "data", required=True,
                                  help="the data module: a data config file, a training config (its data:), or "
                                       "class_path + init_args")
    parser.add_argument("--split", type=str, default="test", help="train, val or test")
    parser.add_argument("--out", type=str, required=True, help="the folder of masks (and masks.csv)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing output folder")
    return parser


def write_masks(argv: list[str]) -> None:
    """`msrl data masks`: the split's masks and `masks.csv` (file, subject_id, label, split, lesion_voxels)."""
    parser = masks_parser()
    args = parser.parse_args(data_argv(argv))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    masks = split_masks(parser.instantiate_classes(args).data, args.split)
    with atomic_folder(out) as staging:
        write_split_masks(masks, staging, args.split)
    lesions = sum(bool(mask.labels.any()) for mask in masks)
    print(f"wrote {len(masks)} masks of the {args.split} split ({lesions} with a lesion) and masks.csv to {out}")


def main(argv: list[str]) -> None:
    """`check`: print the report, exit 1 when there are errors; `masks`: write a split's masks."""
    if argv and argv[0] == "masks":
        write_masks(argv[1:])
        return
    if not argv or argv[0] != "check":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    parser = build_parser()
    args = parser.parse_args(data_argv(argv[1:]))
    data = parser.instantiate_classes(args).data
    report, problems = check(data, read_files=args.read_files)
    print(report)
    if any(p.severity == "error" for p in problems):
        sys.exit(1)
