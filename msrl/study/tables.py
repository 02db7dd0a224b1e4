"""results.md of `msrl study`: the paper's table, the claims with their numbers, every row per arm, what is missing."""

from __future__ import annotations

import math
from typing import Any

from msrl.evaluation.fidelity import FIDELITY_METRIC
from msrl.evaluation.segmentation import SEGMENTATION_METRIC
from msrl.evaluation.segmenter import WHOLE_TUMOUR
from msrl.evaluation.tables import markdown_table
from msrl.study.units import algorithm_name, find_row, main_rows, mask_arms, pretrained_arms, row_sampler

UTILITY = ("accuracy", "balanced_accuracy", "auroc")
FIGURES = {"forest": "no paired difference yet",
           "reward_curves": "no reward_raw/total (ppo/ or backprop/) in the units' events",
           "heldout_fid_curves": "no heldout_fid (ppo/ or backprop/) in the units' events (HeldoutFIDGuard not "
                                 "configured?)"}


def paper_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, row fields) of the paper's table: FID and class fidelity per class, utility, MS-SSIM, reward, memorised.

    FID is against the held-out reference in each extractor's main view, the primary extractor
    first. Every row is read at the primary sampler, else at the evaluation's (utility is drawn only
    there; the label then names it). Rows no arm has are left out.
    """
    study = results["study"]
    primary = study["primary"]
    every = main_rows(results)
    wanted = []
    for extractor in sorted(study["extractors"], key=lambda e: e != primary.get("extractor")):
        view = study["views"][extractor]
        classes = dict.fromkeys(r["class"] for r in every if r["metric"] == "fid" and r["extractor"] == extractor
                                and r["view"] == view and r["reference"] == primary.get("reference"))
        for name in sorted(classes, key=lambda c: (c != "all", c)):
            mark = " (primary)" if extractor == primary.get("extractor") and name == primary.get("class") else ""
            wanted.append((f"FID ↓{mark} {extractor} ({view}), class {name}",
                           {"metric": "fid", "extractor": extractor, "view": view, "class": name,
                            "reference": primary.get("reference")}))
    for metric in UTILITY:
        wanted.append((f"utility {metric.replace('_', ' ')} ↑ (trained on synthetic)",
                       {"metric": f"utility/{metric}", "train_set": "synthetic"}))
    wanted.append(("utility balanced accuracy ↑ (real + synthetic)",
                   {"metric": "utility/balanced_accuracy", "train_set": "real+synthetic"}))
    classes = dict.fromkeys(r["class"] for r in every if r["metric"] == FIDELITY_METRIC)
    for name in sorted(classes, key=lambda c: (c != "all", c)):
        wanted.append((f"class fidelity ↑ (real-trained classifier), class {name}",
                       {"metric": FIDELITY_METRIC, "class": name}))
    wanted += [("MS-SSIM (near real; lower = more diverse)", {"metric": "ms_ssim"}),
               ("reward, raw total ↑ (each arm's own reward)", {"metric": "reward_raw/total"}),
               ("memorised share (voxels) ↓", {"metric": "memorisation/share_closer_than_heldout", "extractor": None})]
    rows = []
    for label, fields in wanted:
        sampler = row_sampler(results, **fields)
        if sampler is not None:
            rows.append((label + ("" if sampler == primary.get("sampler") else f" [{sampler}]"),
                         {**fields, "sampler": sampler}))
    return rows


def fmt(value: float | None, sign: bool = False) -> str:
    """3 significant digits (with the sign for differences)."""
    if value is None:
        return "–"
    return f"{value:+.3g}" if sign else f"{value:.3g}"


def value_cell(row: dict[str, Any] | None) -> str:
    """`mean [low, high]` over seeds (n seeds when there is no interval)."""
    if row is None:
        return "–"
    if row["ci95"] is None:
        return f"{fmt(row['mean'])} (n={len(row['values'])})"
    return f"{fmt(row['mean'])} [{fmt(row['ci95'][0])}, {fmt(row['ci95'][1])}]"


def difference_cell(row: dict[str, Any] | None) -> str:
    """`−1.2 [−2, −0.4]; better 2/3` : mean paired difference over seeds and the seeds beyond their interval."""
    if row is None or "paired" not in row:
        return "–"
    paired = row["paired"]
    ci = paired["ci95"]
    text = fmt(paired["mean"], True) + (f" [{fmt(ci[0], True)}, {fmt(ci[1], True)}]" if ci else "")
    n = paired["num_seeds"]
    if any(p["verdict"] is not None for p in paired["per_seed"]):
        counts = [f"{word} {paired[word]}/{n}" for word in ("better", "worse") if paired[word]]
        text += "; " + (", ".join(counts) if counts else f"0/{n} beyond")
    return text


def real_cell(results: dict[str, Any], fields: dict[str, Any]) -> str:
    """The real data's number beside a row: the real-trained classifier for utility and class fidelity, MS-SSIM."""
    rows = results["real"]["rows"]
    if fields["metric"].startswith("utility/") and fields.get("train_set") == "synthetic":
        return value_cell(find_row(rows, metric=fields["metric"], train_set="real")) + " (trained on real)"
    if fields["metric"] == FIDELITY_METRIC:  # the real-trained classifiers on held-out real volumes: the ceiling
        return value_cell(find_row(rows, metric=FIDELITY_METRIC, **{"class": fields["class"]})) + " (held-out real)"
    if fields["metric"] == "ms_ssim":
        return value_cell(find_row(rows, metric="ms_ssim"))
    return "–"


def paper_tables(results: dict[str, Any]) -> list[str]:
    """Table 1 (values over seeds) and table 2 (paired difference to pretrained), metric rows × arm columns (the arms
    compared with the pretrained model; a mask arm has its own section)."""
    arms = pretrained_arms(results["study"])
    seeds = len(results["study"]["seeds"])
    count = {arm: len(results["arms"][arm]["seeds_finished"]) for arm in arms}
    rows = paper_rows(results)
    values = [[label, real_cell(results, fields), value_cell(find_row(results["pretrained"]["rows"], **fields))]
              + [value_cell(find_row(results["arms"][arm]["rows"], **fields)) for arm in arms]
              for label, fields in rows]
    differences = [[label] + [difference_cell(find_row(results["arms"][arm]["rows"], **fields)) for arm in arms]
                   for label, fields in rows]
    header = [f"{arm} ({count[arm]}/{seeds} seeds)" for arm in arms]
    return ["### Table 1: mean and 95 % t-interval over seeds", "",
            markdown_table(["metric", "real data", "pretrained", *header], values), "",
            "### Table 2: paired difference arm − pretrained (mean over seeds, 95 % t-interval; seeds whose "
            "paired 95 % interval excludes 0)", "", markdown_table(["metric", *header], differences), ""]


def reward_cell(entry: dict[str, Any]) -> str:
    """An arm's reward: its components of the full reward, or its own reward YAML (a mask arm's)."""
    if entry.get("reward") is not None:
        return f"its own reward ({entry['reward']})"
    return "all (the full reward)" if entry["components"] is None else ", ".join(entry["components"])


def region(label: str) -> str:
    """A segmentation region as the reader says it: "whole tumour", "label 2"."""
    return "whole tumour" if label == WHOLE_TUMOUR else f"label {label}"


def mask_rows(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, row fields) of a mask arm's table: mask fidelity per region (the primary, whole tumour, first),
    segmentation utility of its synthetic pairs per region, its evaluation's primary FID, its raw reward;
    every row at its evaluation's sampler, rows neither the arm nor its baseline has left out."""
    primary = entry["primary"]
    every = entry["rows"] + entry["baseline"]["rows"]
    at = {"sampler": primary["sampler"]}
    wanted = []
    synthetic = "segmentation utility ↑ (trained on synthetic)"
    for metric, train_set, name in ((primary["metric"], primary["train_set"], "mask fidelity ↑"),
                                    (SEGMENTATION_METRIC, "synthetic", synthetic)):
        labels = dict.fromkeys(r["label"] for r in every if r["metric"] == metric and r["train_set"] == train_set
                               and r["sampler"] == at["sampler"])
        for label in sorted(labels, key=lambda label: (label != WHOLE_TUMOUR, label)):
            mark = " (primary)" if metric == primary["metric"] and label == primary["label"] else ""
            wanted.append((f"{name}{mark}, {region(label)}",
                           {"metric": metric, "train_set": train_set, "label": label, "class": "all", **at}))
    fid = entry.get("fid") or {}
    if fid.get("extractor") is not None:
        wanted.append((f"FID ↓ {fid['extractor']} ({fid.get('view')}), class all", {
            "metric": "fid", "extractor": fid["extractor"], "view": fid.get("view"), "class": "all",
            "reference": fid.get("reference"), **at}))
    wanted.append(("reward, raw total ↑ (its own reward)", {"metric": "reward_raw/total", **at}))
    return [(label, fields) for label, fields in wanted  # a region no volume showed has no number (NaN)
            if any(row["mean"] is not None and math.isfinite(row["mean"]) for row in every
                   if all(row.get(k) == v for k, v in fields.items()))]


def mask_real_cell(entry: dict[str, Any], fields: dict[str, Any]) -> str:
    """The real data beside a mask arm's row: held-out real volumes with their own masks (mask fidelity's ceiling),
    segmenters trained on real pairs (segmentation utility); none for FID and the reward."""
    if fields["metric"] not in (entry["primary"]["metric"], SEGMENTATION_METRIC):
        return "–"
    real = {k: v for k, v in fields.items() if k != "sampler"}  # the real records carry no sampler
    return value_cell(find_row(entry["real"]["rows"], **{**real, "train_set": "real"}))


def mask_sections(results: dict[str, Any]) -> list[str]:
    """A section per mask arm: its numbers beside its baseline's and the real data's, and the paired difference."""
    seeds = len(results["study"]["seeds"])
    text = []
    for arm in mask_arms(results["study"]):
        entry = results["arms"][arm]
        baseline, primary = entry["baseline"], entry["primary"]
        lines = [[label, mask_real_cell(entry, fields), value_cell(find_row(baseline["rows"], **fields)),
                  value_cell(find_row(entry["rows"], **fields)), difference_cell(find_row(entry["rows"], **fields))]
                 for label, fields in mask_rows(entry)]
        text += [f"### Mask arm {arm}: against {baseline['name']}", "",
                 f"{arm} is fine-tuned under the ControlNet {baseline['checkpoint']} with {reward_cell(entry)}, and "
                 f"compared with it ({baseline['name']!r}), not with the pretrained model: each seed's evaluation "
                 f"({entry.get('evaluate_config') or 'the study’s'}) draws both from the same held-out masks with the "
                 f"same seeds, so mask fidelity (the Dice of segmenters trained on real pairs between each volume "
                 "and its mask) pairs volume by volume, its per-seed interval a paired bootstrap over the volumes "
                 f"whose mask has the region. Primary: {primary['metric']}, {region(primary['label'])}, sampler "
                 f"{primary['sampler'] or '–'}. Real data: the held-out real volumes with their own masks (the "
                 "ceiling), and segmenters trained on real pairs.", ""]
        text += [f"**Problem:** {problem}.\n" for problem in entry.get("problems", [])]
        header = ["metric", "real data", baseline["name"], f"{arm} ({len(entry['seeds_finished'])}/{seeds} seeds)",
                  f"{arm} − {baseline['name']}"]
        text += [markdown_table(header, lines) if lines else "No finished unit yet: nothing to tabulate.", ""]
    return text


def arms_table(results: dict[str, Any]) -> list[str]:
    """The arms: fine-tuner, reward components, configs, seeds finished and mean fine-tuning seconds per unit."""
    lines = []
    for arm in results["study"]["arms"]:
        entry = results["arms"][arm]
        parts = reward_cell(entry)
        seconds = entry.get("finetune_seconds")
        lines.append([arm, algorithm_name(entry.get("algorithm")), parts, ", ".join(entry.get("finetune_configs") or [])
                      or "–", f"{len(entry['seeds_finished'])}/{len(results['study']['seeds'])}",
                      "–" if seconds is None else f"{seconds:.0f}"])
    return ["### The arms", "", markdown_table(["arm", "fine-tuner", "reward components", "finetune configs",
                                                "seeds finished", "mean fine-tuning s"], lines), ""]


def detail_table(rows: list[dict[str, Any]]) -> str:
    """Every row of one arm (or of pretrained): per-seed values, over seeds, paired differences."""
    header = ["metric", "extractor", "view", "class", "reference / train set", "sampler", "per seed", "mean [95 %]",
              "Δ per seed", "Δ mean [95 %]", "verdict over seeds"]
    lines = []
    for row in rows:
        per_seed = ", ".join(f"{s}: {fmt(v)}" for s, v in zip(row["seeds"], row["values"], strict=True))
        paired = row.get("paired")
        deltas = "–" if paired is None else ", ".join(
            f"{p['seed']}: {fmt(p['difference'], True)}" + (f" ({p['verdict']})" if p["verdict"] else "")
            for p in paired["per_seed"])
        metric = row["metric"] + (f" [{row['label'].replace('_', ' ')}]" if row.get("label") else "")
        lines.append([metric, row["extractor"] or "–", row["view"] or "–", row["class"] or "–",
                      row["reference"] or row["train_set"] or "–", row["sampler"] or "–", per_seed, value_cell(row),
                      deltas, difference_cell(row).split(";")[0], paired["verdict"] if paired else "–"])
    return markdown_table(header, lines)


def pretrained_agreement(rows: list[dict[str, Any]]) -> str:
    """How far the pretrained model's numbers differ between the units of one seed (same samples: ~0)."""
    worst = max(rows, key=lambda r: r["spread"] / max(abs(r["mean"]), 1e-12))
    where = ", ".join(str(worst[k]) for k in ("metric", "extractor", "class", "train_set", "sampler") if worst[k])
    return (f"The pretrained model is evaluated again in every unit; within a seed its numbers differ between "
            f"units by at most {worst['spread']:.3g} (relative {worst['spread'] / max(abs(worst['mean']), 1e-12):.2g}; "
            f"{where}). Its reward rows come from the full-reward arm.")


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the paper's table first, the claims with numbers, then every number per arm and what is missing."""
    study, units = results["study"], results["units"]
    primary = study["primary"]
    planned = len(study["arms"]) * len(study["seeds"])
    masks = mask_arms(study)
    against = "the pretrained model" + (f" (mask arms against their own baseline: {', '.join(masks)})" if masks else "")
    text = [f"# msrl study: {len(study['arms'])} arms × {len(study['seeds'])} seeds against {against}",
            "", f"Finished units: {len(units['finished'])} of {planned}"
            + (f" ({len(units['missing'])} missing, listed at the end)." if units["missing"] else "."),
            f"Primary metric: {primary.get('metric', 'fid').upper()} with "
            f"{primary.get('extractor') or 'the evaluation’s first extractor'} ({primary.get('view') or 'main view'}), "
            f"class {primary.get('class')}, against the {primary.get('reference') or 'held-out'} split, sampler "
            f"{primary.get('sampler') or 'the evaluation’s'}. Each study seed evaluates the arm and the pretrained "
            "model with the same sampling seeds (paired); the evaluation seed differs per study seed.", ""]
    text += [f"**Problem:** {problem}.\n" for problem in study.get("problems", [])] + ["## The paper's table", ""]
    text += arms_table(results)
    compared = [u for u in units["finished"] if u["arm"] in pretrained_arms(study)]  # a mask arm's are its own
    empty = "No unit has finished yet" if not units["finished"] else "No arm compared with pretrained has finished"
    text += paper_tables(results) if compared else [f"{empty}: nothing to tabulate.", ""]
    text += mask_sections(results)
    text += ["Intervals over seeds are t-intervals (t₀.₉₇₅,ₙ₋₁; none with one seed). Per-seed paired intervals are "
             "the evaluation's: paired bootstrap over generated volumes for FID, the reward and class "
             "fidelity, over the held-out test volumes for utility accuracy (the classifier seeds averaged "
             "inside each resample; AUROC: a t-interval over classifier seeds, none with one). The pretrained "
             "model's reward is scored with the full-reward arm's reward.", "",
             "## Claims (written in the study config before any unit ran; kept in study.json)", ""]
    for item in results.get("claims", []):
        text.append(f"- **{item['status']}**: {item['claim']} — {item['detail']}.")
    text += ["", "## Every number", ""]
    if results["pretrained"]["rows"]:
        text += ["### pretrained (baseline; per seed from the first finished unit)", "",
                 pretrained_agreement(results["pretrained"]["rows"]), "", detail_table(results["pretrained"]["rows"]),
                 ""]
    for arm in study["arms"]:
        entry = results["arms"][arm]
        seconds = [u for u in units["finished"] if u["arm"] == arm]
        timing = "; ".join(f"seed {u['seed']}: " + ", ".join(f"{k} {v:.0f} s" for k, v in (u["seconds"] or {}).items())
                           for u in seconds)
        parts = ("components: " if entry.get("reward") is None else "") + reward_cell(entry)
        text += [f"### {arm} ({algorithm_name(entry.get('algorithm'))}; {parts}; seeds finished: "
                 f"{entry['seeds_finished'] or 'none'})", "", f"Time: {timing or '–'}.", ""]
        if entry["rows"]:
            text += [detail_table(entry["rows"]), ""]
        if "baseline" in entry and entry["baseline"]["rows"]:  # a mask arm: its own baseline, measured in its units
            text += [f"#### {entry['baseline']['name']} (the baseline of {arm}; per seed from its unit)", "",
                     detail_table(entry["baseline"]["rows"]), ""]
    text += ["## Missing units", ""]
    if units["missing"]:
        text.append(markdown_table(["arm", "seed", "state"], [[m["arm"], str(m["seed"]), m["state"]]
                                                              for m in units["missing"]]))
    else:
        text.append("None: every planned unit has finished.")
    figures = results.get("figures", {})
    text += ["", "## Figures", ""] + [f"![{name}]({path})" for name, path in figures.items()]
    text += [f"{name}: not drawn ({why})." for name, why in FIGURES.items() if name not in figures]
    return "\n".join(text) + "\n"

