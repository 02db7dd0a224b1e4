"""Markdown tables of metrics.json: a summary a reader compares at a glance, and every number in full."""

from __future__ import annotations

from typing import Any


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
    """`value [lo, hi]` or `value ± std` (seed or subset averages), or `–` when absent."""
    if row is None:
        return "–"
    value = f"{row['value']:.{digits}g}"
    if row.get("std") is not None and (row["metric"].startswith("utility/") or row["metric"] == "kid"):
        return f"{value} ± {row['std']:.2g}"
    if row.get("ci95"):
        low, high = row["ci95"]
        return f"{value} [{low:.{digits}g}, {high:.{digits}g}]"
    return value


def summary_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: FID and KID per extractor (all classes), MS-SSIM, utility AUROC per training set."""
    header = ["model", "n"]
    columns: list[tuple[str, dict[str, Any]]] = []
    for extractor in result["extractors"]:
        view = main_view(result, extractor)
        for metric in ("fid", "kid"):
            header.append(f"{metric.upper()} ({extractor}, {view})")
            columns.append((metric, {"extractor": extractor, "view": view, "class": "all"}))
    header.append("MS-SSIM ↓ more diverse")
    columns.append(("ms_ssim", {}))
    for train_set in ("synthetic", "real+synthetic"):
        header.append(f"utility AUROC ({train_set})")
        columns.append(("utility/auroc", {"train_set": train_set}))
    rows = []
    real = result["real"]["records"]
    real_row = ["real data", str(result["data"]["num_real"])]
    for metric, fields in columns:
        if metric == "utility/auroc":
            real_row.append(format_value(find(real, metric, train_set="real")) if fields["train_set"] == "synthetic"
                            else "(trained on real)")
        else:
            real_row.append(format_value(find(real, metric, **fields)) if metric == "ms_ssim" else "–")
    rows.append(real_row)
    for entry in result["entries"]:
        rows.append([entry["name"], str(entry["num_samples"])]
                    + [format_value(find(entry["records"], metric, **fields)) for metric, fields in columns])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_markdown(result: dict[str, Any], summary_only: bool = False) -> str:
    """metrics.md: the summary table, then every record of every source."""
    header, rows = summary_rows(result)
    data = result["data"]
    utility = "no utility" if data["num_test"] is None else f"utility tested on {data['num_test']} held-out"
    text = [f"# msrl evaluation ({data['class_path']}, {data['spatial_size']}³, real reference: "
            f"{data['real_split']} split, {data['num_real']} volumes; {utility})",
            "", markdown_table(header, rows)]
    if summary_only:
        return "\n".join(text)
    text += ["", "Lower is better for FID, KID and MMD; MS-SSIM near the real data's is the goal (lower = more "
             "diverse); intervals are 95 % bootstrap percentiles, ± is the std over KID subsets or classifier seeds.",
             "", "## Every number", ""]
    full_header = ["source", "metric", "extractor", "view", "class", "train set", "value", "n real", "n generated"]
    full_rows = []
    for name, records in [("real data", result["real"]["records"])] + [(e["name"], e["records"])
                                                                       for e in result["entries"]]:
        for row in records:
            full_rows.append([name, row["metric"], row.get("extractor") or "–", row["view"], row["class"],
                              row.get("train_set", "–"), format_value(row), str(row["num_real"]),
                              str(row["num_generated"])])
    text.append(markdown_table(full_header, full_rows))
    return "\n".join(text) + "\n"
