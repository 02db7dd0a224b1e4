"""`msrl report RUN_DIR… --out DIR`: the figures a person would rather look at than read, in one page.

A RUN_DIR is either a training run (TensorBoard events: pretraining losses, fine-tuning reward
curves per component and held-out FID, under either fine-tuner's prefix) or an `msrl evaluate`
output (metrics.json with the volumes it was computed on). The report draws what it finds and
writes report.md and report.html embedding it.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser

from datamodules.atomic import atomic_folder
from lightning_modules import finetune_tags
from msrl.commands.parsing import command_parser
from msrl.evaluation.figures import (
    curves_figure,
    histogram_figure,
    metric_bars,
    paired_forest,
    read_scalars,
    slice_comparison,
)
from msrl.evaluation.tables import (
    mask_fidelity_rows,
    mask_paired_rows,
    metrics_markdown,
    paired_markdown,
    paired_rows,
    segmentation_rows,
    summary_rows,
)
from msrl.samples import read_samples

CURVES = {
    "reward_curves": ((*finetune_tags("reward_raw/"), *finetune_tags("heldout_fid")),
                      "fine-tuning: raw reward per component and held-out FID"),
    "reward_normalised": (finetune_tags("reward/"), "fine-tuning: normalised reward per component (what PPO's "
                                                    "advantages and the backpropagated gradient see)"),
    "ppo_diagnostics": (("ppo/approx_kl", "ppo/clipfrac", "ppo/loss", "ppo/kl"), "PPO diagnostics"),
    "backprop_diagnostics": (("backprop/loss", "backprop/base_penalty", "backprop/grad_norm",
                              "backprop/backprop_steps"), "reward backpropagation diagnostics"),
    "training_curves": (("train/loss", "val/loss", "val/auroc", "val/l1", "ae/"), "training and validation curves"),
}


def build_parser() -> ArgumentParser:
    """Options of `msrl report`."""
    parser = command_parser("msrl report", "Figures and a report page from runs and evaluations.")
    parser.add_argument("runs", nargs="+", type=str, help="training run folders and/or msrl evaluate output folders")
    parser.add_argument("--out", type=str, required=True, help="output folder (PNG figures, report.md, report.html)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing output folder")
    return parser


def run_label(path: Path) -> str:
    """`finetune/version_0` for …/runs/finetune/version_0."""
    return f"{path.parent.name}/{path.name}" if path.name.startswith("version_") else path.name


def evaluation_sources(folder: Path, result: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"real": (volumes, labels), <entry name>: …} read back from an evaluation folder."""
    sources = {}
    for name, sub in [("real", "real")] + [(e["name"], e["samples_dir"]) for e in result["entries"]]:
        if (folder / sub / "manifest.csv").is_file():
            volumes, labels = read_samples(folder / sub)
            sources[name] = (volumes, labels if labels is not None else torch.zeros(len(volumes), dtype=torch.long))
    return sources


def main(argv: list[str]) -> None:
    """Collect runs and evaluations, draw every figure, write report.md and report.html atomically."""
    args = build_parser().parse_args(argv)
    folders = [Path(r) for r in args.runs]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"run folder {folder} does not exist")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    evaluations = {f: json.loads((f / "metrics.json").read_text()) for f in folders if (f / "metrics.json").is_file()}
    runs = {run_label(f): read_scalars(f) for f in folders if f not in evaluations}
    runs = {name: scalars for name, scalars in runs.items() if scalars}
    if not evaluations and not runs:
        raise ValueError(f"none of {[str(f) for f in folders]} holds TensorBoard events or a metrics.json")
    with atomic_folder(out) as staging:
        sections = draw(staging, runs, evaluations)
        (staging / "report.md").write_text(report_markdown(sections))
        (staging / "report.html").write_text(report_html(sections))
    print(f"wrote {out}/report.html and {out}/report.md with {sum(len(s['figures']) for s in sections)} figures")


def draw(folder: Path, runs: dict[str, dict], evaluations: dict[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    """Draw every figure into `folder`; return the report's sections (title, table, figures with captions)."""
    sections = []
    training = None
    figures = []
    for stem, (prefixes, title) in CURVES.items():
        path = curves_figure(runs, prefixes, title, folder / f"{stem}.png")
        if path is not None:
            figures.append((path.name, title))
    if figures:
        training = {"title": "Training runs: " + ", ".join(runs), "tables": [], "figures": figures}
    for index, (source, result) in enumerate(evaluations.items()):
        prefix = f"eval{index}_"
        figures = []
        forest = paired_forest(result, folder / f"{prefix}paired.png")
        if forest is not None:
            figures.append((forest.name, "paired differences, candidate − baseline, with 95 % intervals"))
        bars = metric_bars(result, folder / f"{prefix}metrics.png")
        if bars is not None:
            figures.append((bars.name, "FID and KID per model and extractor (lower is better)"))
        sources = evaluation_sources(source, result)
        labels = sorted({int(label) for _, labels in sources.values() for label in labels.tolist()})
        for label in labels:  # class 1 (lesions in the MS cohort): also the slice through the brightest cluster
            path = slice_comparison(sources, label, folder / f"{prefix}slices_class{label}.png", brightest=label == 1)
            if path is not None:
                extra = ", and the axial slice through each volume's brightest compact cluster" if label == 1 else ""
                figures.append((path.name, f"class {label}: real vs each model, three planes{extra}"))
        histogram = histogram_figure(sources, folder / f"{prefix}histograms.png")
        if histogram is not None:
            figures.append((histogram.name, "foreground intensity histograms, real vs each model"))
        if (source / "mask_contours.png").is_file():  # drawn by msrl evaluate, which alone kept the masks
            shutil.copyfile(source / "mask_contours.png", folder / f"{prefix}mask_contours.png")
            figures.append((f"{prefix}mask_contours.png", "held-out lesion masks' contours over the volume each "
                            "source drew from them (real first), axial slice through the lesion's centre"))
        tables = [paired_rows(result)] if result.get("comparisons") else []
        tables += [t for t in (segmentation_rows(result), mask_fidelity_rows(result), mask_paired_rows(result)) if t]
        words = [line for line in paired_markdown(result) if line.startswith(("Beyond", "No "))]
        sections.append({"title": f"Evaluation {source}", "tables": [*tables, summary_rows(result)], "words": words,
                         "markdown": metrics_markdown(result, summary_only=True), "figures": figures})
    # the evaluations (their paired tables) open the report; the training curves follow
    return sections + ([training] if training else [])


def report_markdown(sections: list[dict[str, Any]]) -> str:
    """report.md: one section per run group / evaluation, its summary table and figures."""
    lines = ["# msrl report", ""]
    for section in sections:
        lines += [f"## {section['title']}", ""]
        if section.get("markdown"):
            lines += [section["markdown"].split("\n", 2)[-1], ""]
        for name, caption in section["figures"]:
            lines += [f"![{caption}]({name})", f"*{caption}*", ""]
    return "\n".join(lines)


def report_html(sections: list[dict[str, Any]]) -> str:
    """report.html: the same content as report.md, one self-contained page next to its PNGs."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>msrl report</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}</style></head><body>",
             "<h1>msrl report</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section['title'])}</h2>")
        parts += [f"<p>{html.escape(line)}</p>" for line in section.get("words", [])]
        for header, rows in section["tables"]:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        for name, caption in section["figures"]:
            parts.append(f"<figure><img src='{html.escape(name)}'><figcaption>{html.escape(caption)}"
                         "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
