"""Markdown tables of metrics.json: the paired differences first, a summary per model, the segmentation utility
and mask fidelity (when masks were evaluated), every number in full."""

from __future__ import annotations

from typing import Any

from msrl.evaluation.comparison import beyond_interval
from msrl.evaluation.fidelity import FIDELITY_METRIC
from msrl.evaluation.mask_fidelity import MASK_FIDELITY_METRIC
from msrl.evaluation.segmentation import SEGMENTATION_METRIC, TRAIN_SETS
from msrl.evaluation.segmenter import WHOLE_TUMOUR

REGION_NAMES = {"1": "core (1)", "2": "oedema (2)", "4": "enhancing (4)", WHOLE_TUMOUR: "whole tumour"}


def find(records: list[dict[str, Any]], metric: str, **fields: Any) -> dict[str, Any] | None:
    """The first record of `metric` whose fields match (None if there is none)."""
    for row in records:
        if row["metric"] == metric and all(row.get(key) == value for key, value in fields.items()):
            return row
    return None


def main_view(result: dict[str, Any], extractor: str) -> str:
    """The view a summary shows for an extractor: "3d", else the slice extractor's "pooled"."""
    for entry in result["entries"]:
        views = {row["view"] for row in entry["records"] if row.get("extractor") == extractor}
        if views:
            return "3d" if "3d" in views else "pooled"
    return "3d"


def format_value(row: dict[str, Any] | None, digits: int = 3) -> str:
    """`value [lo, hi]` (95 % interval), `value ± std` when there is no interval, or `–` when absent."""
    if row is None:
        return "–"
    value = f"{row['value']:.{digits}g}"
    if row.get("ci95") and all(v == v for v in row["ci95"]):  # NaN-free interval
        low, high = row["ci95"]
        return f"{value} [{low:.{digits}g}, {high:.{digits}g}]"
    if row.get("std") is not None:
        return f"{value} ± {row['std']:.2g}"
    return value


def metric_name(row: dict[str, Any]) -> str:
    """The metric, with its region for segmentation and mask fidelity rows: `mask_fidelity/dice [whole tumour]`."""
    label = row.get("label")
    return row["metric"] if label is None else f"{row['metric']} [{REGION_NAMES.get(label, label)}]"


def format_difference(row: dict[str, Any], digits: int = 3) -> str:
    """`+0.012 [-0.003, 0.027]`: a paired difference with its interval."""
    low, high = row["ci95"]
    return f"{row['difference']:+.{digits}g} [{low:+.{digits}g}, {high:+.{digits}g}]"


def summary_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows per model: FID per extractor and vs train, MS-SSIM, reward, memorisation, utility, fidelity."""
    reference = result["data"]["real_split"]
    primary = result.get("primary", {}).get("extractor")
    header = ["model", "sampler", "n"]
    columns: list[tuple[str, dict[str, Any]]] = []
    for extractor in result["extractors"]:
        view = main_view(result, extractor)
        mark = " (primary)" if extractor == primary else ""
        header.append(f"FID{mark} ({extractor}, {view}, vs {reference})")
        columns.append(("fid", {"extractor": extractor, "view": view, "class": "all", "reference": reference}))
    if result["data"].get("num_train") and primary:
        header.append(f"FID ({primary}, vs train)")
        columns.append(("fid", {"extractor": primary, "class": "all", "reference": "train"}))
    header.append("MS-SSIM (lower = more diverse)")
    columns.append(("ms_ssim", {}))
    if result.get("reward"):
        header.append("reward (raw total) ↑")
        columns.append(("reward_raw/total", {}))
    header.append("memorised share (voxels)")
    columns.append(("memorisation/share_closer_than_heldout", {"extractor": None}))
    for train_set in ("synthetic", "real+synthetic"):
        header.append(f"utility bal. acc. ({train_set})")
        columns.append(("utility/balanced_accuracy", {"train_set": train_set}))
    for name in fidelity_classes(result):
        header.append(f"class fidelity ↑ (class {name})")
        columns.append((FIDELITY_METRIC, {"class": name}))
    rows = []
    real = result["real"]["records"]
    real_row = ["real data", "–", str(result["data"]["num_real"])]
    for metric, fields in columns:
        if metric == "utility/balanced_accuracy":
            real_row.append(format_value(find(real, metric, train_set="real")) if fields["train_set"] == "synthetic"
                            else "(trained on real)")
        else:  # class fidelity of the real data: the classifiers on the held-out real volumes (the ceiling)
            real_row.append(format_value(find(real, metric, **fields))
                            if metric in ("ms_ssim", "reward_raw/total", FIDELITY_METRIC) else "–")
    rows.append(real_row)
    for entry in result["entries"]:
        sampler = (entry.get("sampling") or {}).get("label", "–")
        rows.append([entry["name"], sampler, str(entry["num_samples"])]
                    + [format_value(find(entry["records"], metric, **fields)) for metric, fields in columns])
    return header, rows


def fidelity_classes(result: dict[str, Any]) -> list[str]:
    """The classes ("0", "1", …) whose class fidelity some source has, in order."""
    found = {row["class"] for entry in result["entries"] for row in entry["records"]
             if row["metric"] == FIDELITY_METRIC and row["class"] != "all"}
    return sorted(found, key=lambda name: (len(name), name))


def paired_rows(result: dict[str, Any], all_classes_only: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired differences, the primary metric first."""
    header = ["candidate − baseline", "metric", "extractor / train set", "class", "difference [95 % CI]", "verdict"]
    primary = result.get("primary", {})
    rows = []
    for comparison in result.get("comparisons", []):
        title = f"{comparison['candidate']} − {comparison['baseline']} ({comparison['num_volumes']} paired volumes)"
        ordered = sorted(comparison["records"], key=lambda r: (
            not (r["metric"] == primary.get("metric") and r.get("extractor") == primary.get("extractor")),
            r["metric"] != "fid"))
        for row in ordered:  # class fidelity per class too: class 1 drawn without its lesion is the point
            if all_classes_only and row["class"] != "all" and row["metric"] != FIDELITY_METRIC:
                continue
            if all_classes_only and row["metric"] in (SEGMENTATION_METRIC, MASK_FIDELITY_METRIC):
                continue  # per region in their own table (`mask_paired_rows`)
            rows.append([title, metric_name(row), row.get("extractor") or row.get("train_set") or "–", row["class"],
                         format_difference(row), row["verdict"]])
    return header, rows


def regions(result: dict[str, Any], metric: str) -> list[str]:
    """The regions ("1", "2", "4", "whole_tumour") some record of `metric` has, labels first."""
    found = {row["label"] for records in [result["real"]["records"]] + [e["records"] for e in result["entries"]]
             for row in records if row["metric"] == metric}
    return sorted(found, key=lambda region: (region == WHOLE_TUMOUR, len(region), region))


def segmentation_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Train set × region: mean Dice on the held-out real masks [t-interval over seeds]; None without records."""
    names = regions(result, SEGMENTATION_METRIC)
    if not names:
        return None
    header = ["source", "train set", "seeds"] + [f"Dice {REGION_NAMES.get(r, r)}" for r in names]
    rows = []
    sources = [("real data", result["real"]["records"])] + [(e["name"], e["records"]) for e in result["entries"]]
    for source, records in sources:
        for train_set in TRAIN_SETS:
            found = [find(records, SEGMENTATION_METRIC, train_set=train_set, label=r) for r in names]
            if any(found):
                seeds = next(row for row in found if row)["seeds"]
                rows.append([source, train_set, str(len(seeds))] + [format_value(row) for row in found])
    return header, rows


def mask_fidelity_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Source × region: mean Dice of the real-trained segmenters against each volume's mask [bootstrap interval]."""
    names = regions(result, MASK_FIDELITY_METRIC)
    if not names:
        return None
    header = ["source", "sampler", "masks"] + [f"Dice {REGION_NAMES.get(r, r)} (n)" for r in names]
    rows = []
    ceiling = [find(result["real"]["records"], MASK_FIDELITY_METRIC, label=r) for r in names]
    if any(ceiling):
        rows.append(["real data", "–", "its own (the ceiling)"] + [_with_count(row) for row in ceiling])
    for entry in result["entries"]:
        found = [find(entry["records"], MASK_FIDELITY_METRIC, label=r) for r in names]
        if not any(found):
            continue
        source = entry.get("source", {})
        how = ("reconstructed (the latent floor)" if "autoencoder" in source else
               "drawn from" if source.get("mask_conditioned") else "ignored (class label only)")
        rows.append([entry["name"], (entry.get("sampling") or {}).get("label", "–"), how]
                    + [_with_count(row) for row in found])
    return header, rows


def mask_paired_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The paired differences of segmentation utility and mask fidelity, per region, with their verdicts."""
    header = ["candidate − baseline", "metric", "train set", "difference [95 % CI]", "verdict", "paired over"]
    rows = []
    for comparison in result.get("comparisons", []):
        for row in comparison["records"]:
            if row["metric"] in (SEGMENTATION_METRIC, MASK_FIDELITY_METRIC):
                over = (f"{row['num_volumes']} volumes" if "num_volumes" in row else f"{row.get('num_seeds')} seeds")
                rows.append([f"{comparison['candidate']} − {comparison['baseline']}", metric_name(row),
                             row.get("train_set") or "–", format_difference(row), row["verdict"], over])
    return (header, rows) if rows else None


def _with_count(row: dict[str, Any] | None) -> str:
    return "–" if row is None else f"{format_value(row)} ({row['num_generated']})"


def mask_markdown(result: dict[str, Any]) -> list[str]:
    """The segmentation utility and mask fidelity sections (nothing when no masks were evaluated)."""
    text = []
    utility = segmentation_rows(result)
    if utility is not None:
        data = result["data"]
        text += [f"## Segmentation utility (Dice on the {data.get('num_segmentation_test')} held-out real volumes of "
                 f"the {data.get('segmentation_test_split')} split; mean [t-interval over seeds])", "",
                 markdown_table(*utility), ""]
    fidelity = mask_fidelity_rows(result)
    if fidelity is not None:
        text += ["## Mask fidelity (the real-trained segmenters' Dice against the mask each volume was drawn from; "
                 "n: volumes whose mask has the region; bootstrap interval over volumes)", "",
                 markdown_table(*fidelity), ""]
    paired = mask_paired_rows(result)
    if paired is not None:
        text += ["Paired (same masks, same seeds; mask fidelity pairs volumes, segmentation utility seeds):", "",
                 markdown_table(*paired), ""]
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def paired_markdown(result: dict[str, Any]) -> list[str]:
    """The paired table and, in words, which differences are beyond their interval."""
    if not result.get("comparisons"):
        return ["No paired comparison (one checkpoint, or no two checkpoints sampled at the same sampler)."]
    header, rows = paired_rows(result)
    text = ["## Paired differences (same seeds; paired bootstrap over volumes, t-interval over utility seeds)", "",
            markdown_table(header, rows), ""]
    for comparison in result["comparisons"]:
        sentences = beyond_interval(comparison)
        if sentences:
            text.append(f"Beyond their 95 % interval ({comparison['candidate']} vs {comparison['baseline']}): "
                        + "; ".join(sentences) + ".")
        else:
            text.append(f"No difference between {comparison['candidate']} and {comparison['baseline']} is beyond "
                        "its 95 % interval.")
        text.append("")
    return text


def metrics_markdown(result: dict[str, Any], summary_only: bool = False) -> str:
    """metrics.md: the paired differences, the summary table, then every record of every source."""
    header, rows = summary_rows(result)
    data = result["data"]
    utility = ("no utility" if data["num_test"] is None else
               f"utility tested on {data['num_test']} held-out ({data.get('utility_test_split', 'test')} split)")
    primary = result.get("primary", {})
    text = [f"# msrl evaluation ({data['class_path']}, {data['spatial_size']}³, real reference: "
            f"{data['real_split']} split, {data['num_real']} volumes; {utility})", "",
            f"Primary metric: {primary.get('metric', 'fid').upper()} with {primary.get('extractor')} "
            f"({primary.get('view')}) against the {primary.get('reference')} split.", ""]
    text += paired_markdown(result)
    text += ["## Summary", "", markdown_table(header, rows), ""]
    text += mask_markdown(result)
    if summary_only:
        return "\n".join(text).rstrip("\n")
    text += ["Lower is better for FID, KID and MMD; MS-SSIM near the real data's is the goal (lower = more "
             "diverse). Intervals are 95 %: bootstrap over volumes for distribution metrics and rewards, a "
             "t-interval over classifier seeds (each with its own synthetic draw) for utility. Class fidelity is "
             "the share of volumes of a class that the utility classifiers trained on real volumes (one per "
             "seed, averaged per volume) call that class; the real data's is theirs on the held-out real volumes, "
             "the ceiling; its interval bootstraps volumes. Random-weight "
             "extractors give numbers comparable only to themselves; with tens of volumes every interval is wide.",
             "", "## Every number", ""]
    full_header = ["source", "sampler", "metric", "extractor", "view", "class", "reference / train set", "value",
                   "n real", "n generated"]
    full_rows = []
    for name, records in [("real data", result["real"]["records"])] + [(e["name"], e["records"])
                                                                       for e in result["entries"]]:
        for row in records:
            full_rows.append([name, row.get("sampler") or "–", metric_name(row), row.get("extractor") or "–",
                              row["view"], row["class"], row.get("reference") or row.get("train_set") or "–",
                              format_value(row), str(row["num_real"]), str(row["num_generated"])])
    text.append(markdown_table(full_header, full_rows))
    if result.get("comparisons"):
        header, rows = paired_rows(result, all_classes_only=False)
        text += ["", "## Every paired difference", "", markdown_table(header, rows)]
    return "\n".join(text) + "\n"
