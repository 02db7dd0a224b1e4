"""Aggregation of `msrl study`: finished units → every number per arm over seeds, paired with the pretrained model.

The study folder (the contract between the study's runner and this module):

    DIR/study.json      the plan: {"arms": [{"name": "slice2d", "components": ["slice2d"], "finetune_configs":
                        [FILE, …], "model": "lightning_modules.PPOFinetuneModule"}, …] (model: the fine-tuner
                        the arm's configs build; older plans lack it),
                        "seeds": [0, 1, 2], "primary": {"metric": "fid", "extractor": NAME or null (the
                        evaluation's first), "class": "all", "sampler": LABEL or null (the evaluation's)}, …};
                        components null: every component (the full reward). Optionally "claims":
                        {"multiscale": ARM, "single_scale": [ARM, …], "versus": ARM} (default: single-scale arms
                        have one component, the multi-scale arm exactly their union; no versus claim without
                        "versus"). The pretrained model is the arm "pretrained": it has no units of its own.
                        A mask arm has "reward" (its own reward YAML), "baseline" {"name", "checkpoint"} (the
                        ControlNet it was fine-tuned under) and "evaluate_config": its units are compared with
                        that baseline, and it is reported on its own (not in the table, claims 1-6 or forest).
    DIR/units/<arm>/seed_<s>/unit.json       written last, atomically, when the unit (fine-tuning + evaluation)
                        finished: {"arm", "seed", "status": "done", "seconds": {"finetune", "evaluate"}, "checkpoint"}
    DIR/units/<arm>/seed_<s>/finetune/version_0/     the fine-tuning run's TensorBoard events under its
                        algorithm's prefix P (ppo/ or backprop/): P/reward_raw/total, P/reward_raw/<component>,
                        P/heldout_fid, P/iteration, …
    DIR/units/<arm>/seed_<s>/evaluation/metrics.json   `msrl evaluate` (schema 2) with the sources "pretrained"
                        (the baseline; a mask arm's: its baseline's name) and "<arm>", sampled with the same seeds
                        (paired); the evaluation seed differs per study seed.

    DIR/results.json, DIR/results.md, DIR/figures/*.png    written here (`write_study_results`).

A unit without unit.json (or whose status is not "done") is unfinished: it is listed as missing with
what its folder holds, and nothing of it is read (msrl/study/units.py reads the folder). Finished
units are only read, never recomputed.

A row is one number of metrics.json, named by ROW_FIELDS. Over seeds every row gets its mean with a
t-interval (`mean_t_ci`, n is 2–5) and the paired difference to the pretrained model: per seed the
evaluation's paired difference (bootstrap over generated volumes; for utility accuracy over the test
volumes; for utility AUROC a t-interval over classifier seeds) with its verdict, or, where the
evaluation has none (MS-SSIM, memorisation, AUROC with one classifier seed), the difference of the two
values; over seeds `paired_seeds` on the per-seed values (docs/design.md §5).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

from datamodules.atomic import atomic_folder, atomic_write_text
from msrl.evaluation.metrics import mean_t_ci
from msrl.evaluation.paired import paired_seeds
from msrl.study.claims import evaluate_claims
from msrl.study.figures import draw_figures
from msrl.study.tables import results_markdown
from msrl.study.units import (
    BASELINE,
    MASK_PRIMARY,
    ROW_FIELDS,
    FinishedUnit,
    arm_algorithm,
    arm_baseline,
    collect_units,
    evaluated_alike,
    lower_is_better,
    read_plan,
    trained_arms,
)

RESULTS_SCHEMA_VERSION = 1


def interval(ci95: Any) -> list[float] | None:
    """A finite [low, high] or None (one seed has no interval)."""
    if not ci95 or not all(isinstance(v, int | float) and math.isfinite(v) for v in ci95):
        return None
    return [float(ci95[0]), float(ci95[1])]


def over_seeds(values: list[float]) -> dict[str, Any]:
    """Mean, std and 95 % t-interval over seeds."""
    estimate = mean_t_ci(values)
    return {"mean": estimate.value, "ci95": interval(estimate.ci95),
            "std": estimate.std if estimate.std is not None and math.isfinite(estimate.std) else None}


def paired_over_seeds(baseline: list[float], candidate: list[float], per_seed: list[dict[str, Any]],
                      direction: bool | None) -> dict[str, Any]:
    """Mean of the per-seed differences candidate − pretrained with its t-interval, and the per-seed verdicts."""
    estimate = paired_seeds(baseline, candidate, lower_is_better=direction is not False)
    verdict = estimate.verdict
    if direction is None:  # MS-SSIM: say which way it moved, not whether that is better
        verdict = {"better": "lower", "worse": "higher"}.get(verdict, verdict)
    return {"seeds": [p["seed"] for p in per_seed], "per_seed": per_seed, "num_seeds": len(per_seed),
            "better": sum(p["verdict"] == "better" for p in per_seed),
            "worse": sum(p["verdict"] == "worse" for p in per_seed),
            "mean": estimate.difference, "ci95": interval(estimate.ci95), "verdict": verdict}


def arm_rows(units: list[FinishedUnit]) -> list[dict[str, Any]]:
    """Every row of one arm: per-seed values, mean and interval over seeds, paired difference to pretrained."""
    keys = list(dict.fromkeys(key for unit in units for key in unit.candidate))
    rows = []
    for key in keys:
        present = [unit for unit in units if key in unit.candidate]
        direction = lower_is_better(key[0])
        values = [unit.candidate[key]["value"] for unit in present]
        row = {**dict(zip(ROW_FIELDS, key, strict=True)), "lower_is_better": direction,
               "seeds": [unit.seed for unit in present], "values": values, **over_seeds(values)}
        baseline, candidate, per_seed = [], [], []
        for unit in present:
            comparison, base = unit.paired.get(key), unit.baseline.get(key)
            if comparison is not None:  # the evaluation's paired interval (bootstrap, or t over classifier seeds)
                baseline.append(comparison["baseline"])
                candidate.append(comparison["candidate"])
                per_seed.append({"seed": unit.seed, "difference": comparison["difference"],
                                 "ci95": interval(comparison["ci95"]), "verdict": comparison["verdict"]})
            elif base is not None:  # no paired interval within the seed (MS-SSIM, memorisation share)
                baseline.append(base["value"])
                candidate.append(unit.candidate[key]["value"])
                per_seed.append({"seed": unit.seed, "difference": candidate[-1] - baseline[-1], "ci95": None,
                                 "verdict": None})
        if per_seed:
            row["paired"] = paired_over_seeds(baseline, candidate, per_seed, direction)
        rows.append(row)
    return rows


def reward_reference_arm(plan: dict[str, Any]) -> str | None:
    """The arm whose reward scores the pretrained model in the table: the full reward (components None: all; an arm
    with its own reward or baseline never)."""
    arms = [arm for arm in plan["arms"] if arm["name"] != BASELINE and arm.get("reward") is None
            and arm_baseline(arm) == BASELINE]
    size = lambda arm: math.inf if arm.get("components") is None else len(arm["components"])  # noqa: E731
    return max(reversed(arms), key=size)["name"] if arms else None


def source_rows(units: list[FinishedUnit], plan: dict[str, Any], source: str,
                reference: str | None = None) -> list[dict[str, Any]]:
    """The baseline's ("baseline") or the real data's ("real") rows over seeds.

    Both are measured again in every unit; per seed the first finished unit counts (the `reference`
    arm first: by default the full-reward arm), and `spread` is the largest difference between units
    of one seed (0 when the same samples gave the same numbers). Reward rows come only from the
    reference arm: each arm scores with its own reward.
    """
    reference = reference or reward_reference_arm(plan)
    ordered = sorted(units, key=lambda unit: (unit.arm != reference, trained_arms(plan).index(unit.arm)))
    keys = list(dict.fromkeys(key for unit in ordered for key in getattr(unit, source)))
    rows = []
    for key in keys:
        seeds, values, spread, arms = [], [], 0.0, []
        for seed in plan["seeds"]:
            found = [u for u in ordered if u.seed == seed and key in getattr(u, source)
                     and (not key[0].startswith("reward_raw/") or u.arm == reference)]
            if not found:
                continue
            numbers = [getattr(u, source)[key]["value"] for u in found]
            seeds.append(seed)
            values.append(numbers[0])
            arms.append(found[0].arm)
            spread = max(spread, max(numbers) - min(numbers))
        if values:
            rows.append({**dict(zip(ROW_FIELDS, key, strict=True)), "lower_is_better": lower_is_better(key[0]),
                         "seeds": seeds, "values": values, "from_arms": arms, "spread": spread,
                         **over_seeds(values)})
    return rows


def study_info(plan: dict[str, Any], units: list[FinishedUnit]) -> dict[str, Any]:
    """Arms, seeds and the primary row (extractor, view, class, reference, evaluation sampler) of the table, read
    from `units` (those compared with the pretrained model); `compared_with` {arm: baseline} where a mask arm
    has its own."""
    info: dict[str, Any] = {"arms": [a["name"] for a in plan["arms"] if a["name"] != BASELINE],
                            "components": {a["name"]: a.get("components") for a in plan["arms"]},
                            "algorithms": {a["name"]: arm_algorithm(a) for a in plan["arms"]},
                            "seeds": list(plan["seeds"]), "claims": plan.get("claims"),
                            "plan": {k: v for k, v in plan.items() if k not in ("arms", "seeds", "claims")}}
    if any(arm_baseline(a) != BASELINE for a in plan["arms"]):
        info["compared_with"] = {a["name"]: arm_baseline(a) for a in plan["arms"]}
    evaluation = units[0].evaluation if units else {}
    recorded = evaluation.get("primary", {})  # the evaluation's: its first extractor, at its own sampler
    chosen = {key: value for key, value in plan.get("primary", {}).items() if value is not None}
    primary = {"metric": "fid", "class": "all", **recorded,
               "sampler": evaluation.get("samplers", {}).get("evaluation"), **chosen}
    extractors = list(evaluation.get("extractors", []))
    views = {}
    for extractor in extractors:
        found = {key[2] for unit in units for key in unit.candidate if key[1] == extractor}
        views[extractor] = "3d" if "3d" in found or not found else "pooled"
    if primary.get("extractor") in views:
        primary["view"] = views[primary["extractor"]]
    primary.setdefault("reference", evaluation.get("data", {}).get("real_split"))
    samplers = evaluation.get("samplers", {})
    known = [sampler["label"] for sampler in samplers.get("all", [])]
    problems = []
    if units and primary["sampler"] not in known:
        problems.append(f"the primary sampler {primary['sampler']!r} is not among the evaluation's samplers {known}")
    if units and primary.get("extractor") not in extractors:
        problems.append(f"the primary extractor {primary.get('extractor')!r} is not among the evaluation's "
                        f"extractors {extractors}")
    problems += evaluated_alike(units)
    info.update({"primary": primary, "extractors": extractors, "views": views, "data": evaluation.get("data", {}),
                 "samplers": samplers, "problems": problems})
    return info


def mask_arm(entry: dict[str, Any], units: list[FinishedUnit], plan: dict[str, Any]) -> dict[str, Any]:
    """A mask arm's own part of its results: its reward, its baseline's rows and the real data's (measured by its own
    evaluation), its primary row (mask fidelity, whole tumour) and what keeps its numbers from pooling."""
    sampler = units[0].evaluation.get("samplers", {}).get("evaluation") if units else None
    primary = {**MASK_PRIMARY, "sampler": sampler}
    problems = evaluated_alike(units)
    if units and not any(all(dict(zip(ROW_FIELDS, key, strict=True)).get(k) == v for k, v in primary.items())
                         for unit in units for key in unit.candidate):
        problems.append(f"no {primary['metric']} row ({primary['label']}, sampler {sampler}) in its evaluations: its "
                        "evaluate config needs data with lesion masks and segmentation (a segmentation: section)")
    return {"reward": entry.get("reward"), "evaluate_config": entry.get("evaluate_config"), "primary": primary,
            "fid": units[0].evaluation.get("primary") if units else None,  # its evaluation's own primary FID row
            "baseline": {**entry["baseline"], "rows": source_rows(units, plan, "baseline", entry["name"])},
            "real": {"rows": source_rows(units, plan, "real", entry["name"])}, "problems": problems}


def aggregate_study(out_dir: Path) -> dict[str, Any]:
    """The study's results (without claims and figures): plan, units, pretrained, real data and every arm (a mask
    arm with its own baseline's and real data's rows)."""
    out_dir = Path(out_dir)
    plan = read_plan(out_dir)
    finished, missing = collect_units(out_dir, plan)
    main = [unit for unit in finished if unit.baseline_name == BASELINE]
    arms = {}
    for arm in trained_arms(plan):
        units = [unit for unit in finished if unit.arm == arm]
        entry = next(a for a in plan["arms"] if a["name"] == arm)
        seconds = [unit.info["seconds"]["finetune"] for unit in units
                   if isinstance((unit.info.get("seconds") or {}).get("finetune"), int | float)]
        arms[arm] = {"components": entry.get("components"), "algorithm": arm_algorithm(entry),
                     "finetune_configs": entry.get("finetune_configs"),
                     "finetune_seconds": sum(seconds) / len(seconds) if seconds else None,
                     "seeds_finished": [unit.seed for unit in units], "rows": arm_rows(units)}
        if arm_baseline(entry) != BASELINE:
            arms[arm].update(mask_arm(entry, units, plan))
        elif entry.get("reward") is not None:
            arms[arm]["reward"] = entry["reward"]
    return {
        "study": study_info(plan, main),
        "units": {"finished": [{"arm": u.arm, "seed": u.seed, "folder": str(u.folder.relative_to(out_dir)),
                                "seconds": u.info.get("seconds"), "checkpoint": u.info.get("checkpoint")}
                               for u in finished],
                  "missing": missing},
        "pretrained": {"rows": source_rows(main, plan, "baseline")},
        "real": {"rows": source_rows(main, plan, "real")},
        "arms": arms,
    }


def study_results(out_dir: Path) -> dict[str, Any]:
    """The aggregated numbers of a study folder with the claims decided (no file written)."""
    results = {"schema_version": RESULTS_SCHEMA_VERSION,
               "created": datetime.datetime.now().isoformat(timespec="seconds"), **aggregate_study(Path(out_dir))}
    results["claims"] = evaluate_claims(results)
    return results


def write_study_results(out_dir: Path) -> dict[str, Any]:
    """Aggregate DIR (layout above), write figures/*.png, results.json and results.md; return results.json's content.

    Only finished units are read and nothing is recomputed, so it runs after every unit and on its
    own (`msrl study --aggregate-only`). Each output appears whole or not at all: the figures
    through a staging folder swapped in, the two files through a temporary name and a rename.

    Args:
        out_dir: the study folder holding study.json and units/.

    Returns:
        The results: study (plan, primary row), units (finished, missing), pretrained, real, arms
        (every row over seeds with its paired difference to pretrained), claims, figures.
    """
    out_dir = Path(out_dir)
    results = study_results(out_dir)
    with atomic_folder(out_dir / "figures") as staging:
        results["figures"] = draw_figures(results, out_dir, staging)
    results = finite(results)
    atomic_write_text(json.dumps(results, indent=1, allow_nan=False), out_dir / "results.json")
    atomic_write_text(results_markdown(results), out_dir / "results.md")
    return results


def finite(value: Any) -> Any:
    """The same structure with NaN and infinities as None (results.json is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value
