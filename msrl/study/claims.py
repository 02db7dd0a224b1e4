"""The study's pre-registered claims, decided mechanically from the aggregated numbers.

The arms they name are written in the study config's `claims` before any unit runs (study.json keeps
them, so a rerun with other claims is refused): `multiscale`, `single_scale` and `versus`.

1. The multi-scale arm beats the pretrained model on the primary held-out FID beyond the paired 95 %
   interval in at least 2 of 3 seeds (⌈2n/3⌉ of n planned seeds).
2. It worsens no other FID beyond its interval: no paired FID row (every extractor's main view and
   class against the held-out split, evaluation sampler) is worse beyond its paired interval in
   ⌈2n/3⌉ seeds, nor beyond its t-interval over seeds.
3. It raises synthetic-data utility: balanced accuracy (classifiers trained on synthetic volumes) is
   better than pretrained's beyond the evaluation's per-seed paired interval (over test volumes) in
   ⌈2n/3⌉ seeds. Not from a t-interval over seeds of per-seed point differences: with one classifier
   per seed those can agree exactly (one test volume flipped in every seed gave [+0.0156, +0.0156]).
   Without per-seed intervals the claim is not evaluable. (A per-seed bootstrap interval has zero
   width only when every resample gives the same difference, e.g. every volume of a class flipped the
   same way: that counts by its verdict.)
4. It is at least as good as the better single-scale arm on the primary FID: its mean over seeds is
   no higher than that arm's (the better one has the lower mean), on the same seeds.
5. It raises class-1 class fidelity (the real-trained classifier calls a lesion-class volume class 1)
   beyond the per-seed paired interval over volumes in ⌈2n/3⌉ seeds.
6. It beats the other algorithm's multi-scale arm (`versus`) on the primary FID: its mean over the
   common seeds is lower (as claim 4); the paired interval over seeds and both arms' mean
   fine-tuning seconds are stated, so a reader sees whether the time was equal.

A mask arm (its own baseline, the ControlNet it is fine-tuned under) plays no role above; its claim:
it raises its primary mask fidelity (whole tumour) over that ControlNet beyond the per-seed paired
interval over volumes in ⌈2n/3⌉ of n seeds (as claims 1, 3 and 5).

Each claim "holds", "does not hold" or is "not evaluable" (units missing or rows absent), with
the numbers it was decided on. Claims 2, 4 and 6 are decided only when every planned seed of the arms
they involve has finished (claims 1, 3 and 5 are decided early once the finished seeds settle them).
"""

from __future__ import annotations

import math
from typing import Any

from msrl.evaluation.fidelity import FIDELITY_METRIC
from msrl.evaluation.paired import paired_seeds
from msrl.study.units import BASELINE, algorithm_name, find_row, mask_arms, pretrained_arms, row_sampler

HOLDS, FAILS, OPEN = "holds", "does not hold", "not evaluable"


def roles(study: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The multi-scale arm and the single-scale arms: from study.json "claims", else from the components
    (the `versus` arm, never guessed, is read by `evaluate_claims`)."""
    given = study.get("claims") or {}
    # None: every component (full); a mask arm, compared with its own baseline, is never a role
    components = {arm: study["components"].get(arm) for arm in pretrained_arms(study)}
    singles = given["single_scale"] if given.get("single_scale") is not None else [  # []: no claim 4
        arm for arm, parts in components.items() if parts is not None and len(parts) == 1]
    union = set().union(*(set(components.get(arm) or []) for arm in singles))
    multiscale = given.get("multiscale") or next(
        (arm for arm, parts in components.items() if parts is not None and len(parts) >= 2 and set(parts) == union),
        None)
    return multiscale, list(singles)


def primary_fields(study: dict[str, Any]) -> dict[str, Any]:
    """The fields of the primary row (the table's first FID)."""
    primary = study["primary"]
    return {"metric": primary.get("metric", "fid"), "extractor": primary.get("extractor"),
            "view": primary.get("view"), "class": primary.get("class", "all"),
            "reference": primary.get("reference"), "sampler": primary.get("sampler")}


def needed(num_seeds: int) -> int:
    """Seeds that must agree: 2 of 3, ⌈2n/3⌉ of n."""
    return math.ceil(2 * num_seeds / 3)


def claim(name: str, text: str, status: str, detail: str, **numbers: Any) -> dict[str, Any]:
    """One claim's record."""
    return {"id": name, "claim": text, "status": status, "detail": detail, "numbers": numbers}


def fmt(value: float | None) -> str:
    """A number with 3 significant digits and its sign."""
    return "–" if value is None else f"{value:+.3g}"


def difference_text(paired: dict[str, Any]) -> str:
    """`−1.2 [−2, −0.4] over 3 seeds; per seed −1 (better), …`."""
    ci = paired["ci95"]
    over = f"{fmt(paired['mean'])} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else f"{fmt(paired['mean'])} (no interval)"
    seeds = ", ".join(f"seed {p['seed']}: {fmt(p['difference'])}"
                      + (f" [{fmt(p['ci95'][0])}, {fmt(p['ci95'][1])}] {p['verdict']}" if p["ci95"] else "")
                      for p in paired["per_seed"])
    return f"mean {over} over {paired['num_seeds']} seeds ({seeds})"


def primary_claim(results: dict[str, Any], arm: str) -> dict[str, Any]:
    """Claim 1: better beyond the paired interval in ⌈2n/3⌉ of n planned seeds."""
    seeds = results["study"]["seeds"]
    text = (f"{arm} beats pretrained on the primary FID beyond the paired 95 % interval in at least "
            f"{needed(len(seeds))} of {len(seeds)} seeds")
    row = find_row(results["arms"][arm]["rows"], **primary_fields(results["study"]))
    if row is None or "paired" not in row:
        return claim("primary_fid", text, OPEN, f"no finished unit of {arm} has the primary FID row")
    paired = row["paired"]
    if all(p["verdict"] is None for p in paired["per_seed"]):
        return claim("primary_fid", text, OPEN, f"the evaluations of {arm} hold no paired interval of the primary "
                     "FID (no comparison with pretrained at its sampler)")
    better, missing = paired["better"], len(seeds) - paired["num_seeds"]
    detail = (f"better in {better} of {paired['num_seeds']} finished seeds ({len(seeds)} planned); {arm} − "
              f"pretrained: {difference_text(paired)}")
    status = HOLDS if better >= needed(len(seeds)) else FAILS if better + missing < needed(len(seeds)) else OPEN
    return claim("primary_fid", text, status, detail, better=better, seeds=paired["seeds"], mean=paired["mean"],
                 ci95=paired["ci95"], per_seed=paired["per_seed"])


def other_fid_claim(results: dict[str, Any], arm: str) -> dict[str, Any]:
    """Claim 2: no other FID worse beyond its interval in ⌈2n/3⌉ seeds or over seeds."""
    study = results["study"]
    seeds, primary = study["seeds"], primary_fields(study)
    text = f"{arm} worsens no other FID beyond its interval (every extractor and class, {primary['sampler']})"
    rows = [row for row in results["arms"][arm]["rows"]  # the rows with a paired interval per seed
            if row["metric"] == "fid" and row["sampler"] == primary["sampler"] and "paired" in row
            and row["reference"] == primary["reference"]
            and any(p["verdict"] is not None for p in row["paired"]["per_seed"])
            and not all(row.get(k) == v for k, v in primary.items())]
    if not rows:
        return claim("other_fid", text, OPEN, f"no other paired FID row of {arm}")
    worse = [row for row in rows if row["paired"]["worse"] >= needed(len(seeds)) or row["paired"]["verdict"] == "worse"]
    any_worse = [row for row in rows if row["paired"]["worse"] > 0]
    names = [f"{r['extractor']} ({r['view']}) class {r['class']}: worse in {r['paired']['worse']}/{len(seeds)} "
             f"seeds, {difference_text(r['paired'])}" for r in (worse or any_worse)]
    finished = min(row["paired"]["num_seeds"] for row in rows)
    if worse:
        status, detail = FAILS, "worse: " + "; ".join(names)
    elif finished < len(seeds):
        status, detail = OPEN, f"{finished} of {len(seeds)} seeds finished; none worse so far"
    else:
        status = HOLDS
        detail = f"{len(rows)} other FID rows, none worse in {needed(len(seeds))} seeds or over seeds" + (
            "; worse in single seeds: " + "; ".join(names) if names else "")
    return claim("other_fid", text, status, detail, rows_checked=len(rows),
                 worse=[{k: r[k] for k in ("extractor", "view", "class")} for r in worse])


def per_seed_claim(results: dict[str, Any], arm: str, name: str, text: str, fields: dict[str, Any],
                   what: str, baseline: str = BASELINE) -> dict[str, Any]:
    """A claim decided by the evaluation's per-seed paired intervals (arm − `baseline`): better beyond the
    per-seed 95 % interval in ⌈2n/3⌉ of n planned seeds; "not evaluable" without per-seed intervals.
    `fields` without a sampler are read at the primary's, else the evaluation's."""
    seeds = results["study"]["seeds"]
    if "sampler" not in fields:
        fields = {**fields, "sampler": row_sampler(results, **fields)}
    row = find_row(results["arms"][arm]["rows"], **fields)
    if row is None or "paired" not in row:
        return claim(name, text, OPEN, f"no finished unit of {arm} has {what}")
    paired = row["paired"]
    detail = f"{arm} − {baseline}: {difference_text(paired)}"
    intervals = [p for p in paired["per_seed"] if p["ci95"] is not None]
    if not intervals:
        return claim(name, text, OPEN, f"the evaluation gave no per-seed interval of {what} (only point "
                     f"differences, which decide nothing); {detail}", seeds=paired["seeds"])
    better = sum(p["verdict"] == "better" for p in intervals)
    missing = len(seeds) - paired["num_seeds"]  # unfinished seeds; a finished one without an interval cannot count
    status = HOLDS if better >= needed(len(seeds)) else FAILS if better + missing < needed(len(seeds)) else OPEN
    detail = (f"better beyond the per-seed paired interval in {better} of {len(intervals)} seeds with an interval "
              f"({len(seeds)} planned, {needed(len(seeds))} needed)"
              + f"; {detail}")
    return claim(name, text, status, detail, better=better, seeds=paired["seeds"], per_seed=paired["per_seed"],
                 mean=paired["mean"], ci95=paired["ci95"])


def utility_claim(results: dict[str, Any], arm: str) -> dict[str, Any]:
    """Claim 3: synthetic balanced accuracy better beyond the per-seed paired interval in ⌈2n/3⌉ seeds."""
    seeds = results["study"]["seeds"]
    text = (f"{arm} raises synthetic-data utility (balanced accuracy, trained on synthetic, tested on held-out real) "
            f"beyond the per-seed paired 95 % interval in at least {needed(len(seeds))} of {len(seeds)} seeds")
    return per_seed_claim(results, arm, "utility", text,
                          {"metric": "utility/balanced_accuracy", "train_set": "synthetic"}, "synthetic utility")


def class_fidelity_claim(results: dict[str, Any], arm: str) -> dict[str, Any]:
    """Claim 5: class-1 class fidelity better beyond the per-seed paired interval in ⌈2n/3⌉ seeds."""
    seeds = results["study"]["seeds"]
    text = (f"{arm} raises class-1 class fidelity (real-trained classifier) beyond the per-seed paired 95 % "
            f"interval in at least {needed(len(seeds))} of {len(seeds)} seeds")
    return per_seed_claim(results, arm, "class_fidelity", text, {"metric": FIDELITY_METRIC, "class": "1"},
                          "class-1 class fidelity")


def mask_fidelity_claim(results: dict[str, Any], arm: str) -> dict[str, Any]:
    """A mask arm's claim: its primary mask fidelity better than its baseline's (the ControlNet's) beyond the per-seed
    paired interval over volumes in ⌈2n/3⌉ seeds."""
    seeds = results["study"]["seeds"]
    entry = results["arms"][arm]
    baseline, primary = entry["baseline"]["name"], entry["primary"]
    what = f"{primary['metric']} ({primary['label'].replace('_', ' ')})"
    text = (f"{arm} raises mask fidelity ({primary['label'].replace('_', ' ')}, real-trained segmenters) over "
            f"{baseline} beyond the per-seed paired 95 % interval in at least {needed(len(seeds))} of {len(seeds)} "
            "seeds")
    return per_seed_claim(results, arm, f"mask_fidelity:{arm}", text, primary, what, baseline)


def single_scale_claim(results: dict[str, Any], arm: str, singles: list[str]) -> dict[str, Any]:
    """Claim 4: mean primary FID over the common seeds no higher than the better single-scale arm's."""
    study = results["study"]
    fields = primary_fields(study)
    text = f"{arm} is at least as good as the better single-scale arm ({' / '.join(singles)}) on the primary FID"
    rows = {name: find_row(results["arms"][name]["rows"], **fields) for name in [arm, *singles]
            if name in results["arms"]}
    if len(rows) < 2 or any(row is None for row in rows.values()):
        return claim("single_scale", text, OPEN, "the primary FID is missing for " + ", ".join(
            name for name in [arm, *singles] if rows.get(name) is None))
    common = sorted(set.intersection(*(set(row["seeds"]) for row in rows.values())))
    if len(common) < len(study["seeds"]):
        return claim("single_scale", text, OPEN, f"{len(common)} of {len(study['seeds'])} seeds finished in all of "
                     + ", ".join(rows))
    values = {name: [row["values"][row["seeds"].index(s)] for s in common] for name, row in rows.items()}
    means = {name: sum(v) / len(v) for name, v in values.items()}
    best = min(singles, key=lambda name: means[name])
    estimate = paired_seeds(values[best], values[arm], lower_is_better=True)
    status = HOLDS if means[arm] <= means[best] else FAILS
    low, high = estimate.ci95
    detail = (f"mean primary FID over seeds {common}: {arm} {means[arm]:.4g}, " + ", ".join(
        f"{name} {means[name]:.4g}" for name in singles) + f"; better single-scale arm {best}; {arm} − {best} "
        f"= {fmt(estimate.difference)} [{fmt(low)}, {fmt(high)}] (paired over seeds: {estimate.verdict})")
    return claim("single_scale", text, status, detail, means=means, best_single=best, difference=estimate.difference,
                 ci95=[low, high] if math.isfinite(low) else None, seeds=common)


def finetune_seconds(results: dict[str, Any], arm: str, seeds: list[int]) -> float | None:
    """The arm's mean fine-tuning seconds (unit.json) over `seeds`."""
    found = [u["seconds"]["finetune"] for u in results["units"]["finished"] if u["arm"] == arm
             and u["seed"] in seeds and isinstance((u["seconds"] or {}).get("finetune"), int | float)]
    return sum(found) / len(found) if found else None


def versus_claim(results: dict[str, Any], arm: str, versus: str) -> dict[str, Any]:
    """Claim 6: mean primary FID over the common seeds lower than the other algorithm's multi-scale arm's."""
    study = results["study"]
    algorithms = study.get("algorithms") or {}
    names = {name: f"{name} ({algorithm_name(algorithms.get(name)).replace('–', 'fine-tuner unrecorded')})"
             for name in (arm, versus)}
    text = f"{names[arm]} beats {names[versus]} on the primary FID (mean over seeds lower)"
    rows = {name: find_row(results["arms"][name]["rows"], **primary_fields(study)) if name in results["arms"] else None
            for name in (arm, versus)}
    if any(row is None for row in rows.values()):
        return claim("versus", text, OPEN, "the primary FID is missing for " + ", ".join(
            name for name, row in rows.items() if row is None))
    common = sorted(set(rows[arm]["seeds"]) & set(rows[versus]["seeds"]))
    if len(common) < len(study["seeds"]):
        return claim("versus", text, OPEN, f"{len(common)} of {len(study['seeds'])} seeds finished in both {arm} "
                     f"and {versus}")
    values = {name: [row["values"][row["seeds"].index(s)] for s in common] for name, row in rows.items()}
    means = {name: sum(v) / len(v) for name, v in values.items()}
    estimate = paired_seeds(values[versus], values[arm], lower_is_better=True)
    seconds = {name: finetune_seconds(results, name, common) for name in (arm, versus)}
    low, high = estimate.ci95
    time = ", ".join(f"{name} {'–' if value is None else f'{value:.0f} s'}" for name, value in seconds.items())
    detail = (f"mean primary FID over seeds {common}: {arm} {means[arm]:.4g}, {versus} {means[versus]:.4g}; "
              f"{arm} − {versus} = {fmt(estimate.difference)} [{fmt(low)}, {fmt(high)}] (paired over seeds: "
              f"{estimate.verdict}); mean fine-tuning time per unit: {time}")
    status = HOLDS if means[arm] < means[versus] else FAILS
    return claim("versus", text, status, detail, means=means, difference=estimate.difference,
                 ci95=[low, high] if math.isfinite(low) else None, seeds=common, finetune_seconds=seconds)


def evaluate_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim of point 4 for the multi-scale arm (all "not evaluable" when the plan has none), then each mask
    arm's mask-fidelity claim."""
    masks = [mask_fidelity_claim(results, arm) for arm in mask_arms(results["study"])]
    multiscale, singles = roles(results["study"])
    if multiscale is None or multiscale not in results["arms"]:
        return [claim("multiscale", "the plan has a multi-scale arm", OPEN,
                      "no arm's components are the union of the single-scale arms' ("
                      + ", ".join(singles) + "); name it in study.json \"claims\"")] + masks
    claims = [primary_claim(results, multiscale), other_fid_claim(results, multiscale),
              utility_claim(results, multiscale)]
    if singles:
        claims.append(single_scale_claim(results, multiscale, singles))
    claims.append(class_fidelity_claim(results, multiscale))
    versus = (results["study"].get("claims") or {}).get("versus")
    if versus is not None:
        claims.append(versus_claim(results, multiscale, versus))
    return claims + masks
