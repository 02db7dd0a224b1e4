"""Reading a study folder: its plan, which units finished, and each finished unit's evaluation as rows.

The folder's layout is the contract written down in msrl/study/aggregate.py. A row is one number of
an `msrl evaluate` metrics.json, named by ROW_FIELDS; a comparison row (arm − pretrained) gets the
sampler of its comparison.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_modules.finetune import algorithm_names
from msrl.evaluation.comparison import HIGHER_IS_BETTER_PREFIXES
from msrl.evaluation.mask_fidelity import MASK_FIDELITY_METRIC, SEGMENTER_TRAIN_SET
from msrl.evaluation.scores import SCHEMA_VERSION
from msrl.evaluation.segmenter import WHOLE_TUMOUR
from msrl.study.plan import PRETRAINED

BASELINE = PRETRAINED  # the source name of the pretrained model in every unit's evaluation (a mask arm's: its own)
# a mask arm's primary row: Dice of the real-trained segmenters on each volume against the mask it was drawn from,
# the whole tumour, at its evaluation's sampler (msrl/evaluation/mask_fidelity.py)
MASK_PRIMARY = {"metric": MASK_FIDELITY_METRIC, "label": WHOLE_TUMOUR, "train_set": SEGMENTER_TRAIN_SET,
                "class": "all"}
# label: the region of segmentation and mask-fidelity rows (None for every other metric)
ROW_FIELDS = ("metric", "extractor", "view", "class", "reference", "train_set", "sampler", "label")
Key = tuple  # a row's values of ROW_FIELDS


@dataclass
class FinishedUnit:
    """One finished arm × seed: its unit.json and its evaluation's records by row key (`baseline`: those of the source
    named `baseline_name`, the pretrained model or a mask arm's ControlNet)."""

    arm: str
    seed: int
    folder: Path
    info: dict[str, Any]
    evaluation: dict[str, Any]  # metrics.json as written
    baseline: dict[Key, dict[str, Any]]  # the baseline's records (every sampler)
    candidate: dict[Key, dict[str, Any]]  # the arm's records
    paired: dict[Key, dict[str, Any]]  # comparison records, arm − baseline
    real: dict[Key, dict[str, Any]]  # the real data's records (utility trained on real, MS-SSIM)
    baseline_name: str = BASELINE


def row_key(row: dict[str, Any], sampler: str | None = None) -> Key:
    """The row's ROW_FIELDS values (`sampler` given for comparison records, which carry it per comparison)."""
    return tuple(sampler if field == "sampler" and sampler is not None else row.get(field) for field in ROW_FIELDS)


def find_row(rows: list[dict[str, Any]], **fields: Any) -> dict[str, Any] | None:
    """The first aggregated row whose fields all match (`class` passed as **{"class": …}); None if none."""
    return next((row for row in rows if all(row.get(k) == v for k, v in fields.items())), None)


def lower_is_better(metric: str) -> bool | None:
    """Direction of a metric; None for MS-SSIM, whose goal is the real data's value, not an extreme."""
    if metric == "ms_ssim":
        return None
    return not metric.startswith(HIGHER_IS_BETTER_PREFIXES)


def read_plan(out_dir: Path) -> dict[str, Any]:
    """DIR/study.json, checked: arms with names and components, seeds, primary metric."""
    path = out_dir / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a study folder holds the plan study.json (msrl study)")
    plan = json.loads(path.read_text())
    arms = plan.get("arms")
    if not isinstance(arms, list) or not arms or not all(
            isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("components") or [], list)
            for a in arms):
        raise ValueError(f"{path}: 'arms' must be a non-empty list of {{'name': str, 'components': [str, …] or "
                         "null (every component)}}, "
                         f"got {arms!r}")
    seeds = plan.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    for arm in arms:
        baseline = arm.get("baseline")
        if baseline is not None and not (isinstance(baseline, dict) and isinstance(baseline.get("name"), str)):
            raise ValueError(f"{path}: arm {arm['name']!r}: 'baseline' must be {{'name': str, 'checkpoint': str}} "
                             f"or absent, got {baseline!r}")
    if not isinstance(plan.get("primary", {}), dict):
        raise ValueError(f"{path}: 'primary' must be {{'metric', 'extractor', 'class'}}, got {plan['primary']!r}")
    return plan


def trained_arms(plan: dict[str, Any]) -> list[str]:
    """The fine-tuned arms, in plan order (every arm but the pretrained model)."""
    return [arm["name"] for arm in plan["arms"] if arm["name"] != BASELINE]


def arm_baseline(arm: dict[str, Any]) -> str:
    """The source an arm of study.json is compared with: its own baseline's name (a mask arm's ControlNet), else
    the pretrained model."""
    return BASELINE if arm.get("baseline") is None else arm["baseline"]["name"]


def pretrained_arms(study: dict[str, Any]) -> list[str]:
    """The arms of results' "study" compared with the pretrained model: the paper's table, claims and forest plot."""
    compared = study.get("compared_with") or {}
    return [arm for arm in study["arms"] if compared.get(arm, BASELINE) == BASELINE]


def mask_arms(study: dict[str, Any]) -> list[str]:
    """The arms of results' "study" with their own baseline (a ControlNet): each reported on its own."""
    compared = study.get("compared_with") or {}
    return [arm for arm in study["arms"] if compared.get(arm, BASELINE) != BASELINE]


def arm_algorithm(arm: dict[str, Any]) -> str | None:
    """The metric prefix of an arm's fine-tuner (`ppo`, `backprop`): the prefix its run logs under, read from
    the class study.json records for the arm (None for a study.json written before arms recorded it)."""
    class_path = arm.get("model")
    if not isinstance(class_path, str):
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name).metric_prefix
    except (ImportError, AttributeError):  # a class this checkout lacks: its name still tells the reader
        return name


def algorithm_name(prefix: str | None) -> str:
    """The reader's name of a fine-tuner from its metric prefix ("–" for a plan that does not record it)."""
    return "–" if prefix is None else algorithm_names().get(prefix, prefix)


def unit_folder(out_dir: Path, arm: str, seed: int) -> Path:
    """DIR/units/<arm>/seed_<s>."""
    return out_dir / "units" / arm / f"seed_{seed}"


def collect_units(out_dir: Path, plan: dict[str, Any]) -> tuple[list[FinishedUnit], list[dict[str, Any]]]:
    """The finished units (read) and the planned ones that are not, with what their folder holds."""
    finished, missing = [], []
    baselines = {arm["name"]: arm_baseline(arm) for arm in plan["arms"]}
    for arm in trained_arms(plan):
        for seed in plan["seeds"]:
            folder = unit_folder(out_dir, arm, seed)
            marker = folder / "unit.json"
            info = json.loads(marker.read_text()) if marker.is_file() else None
            if info is None or info.get("status") != "done":
                missing.append({"arm": arm, "seed": seed, "state": unit_state(folder, info)})
                continue
            if info.get("arm") != arm or info.get("seed") != seed:
                raise ValueError(f"{marker}: names arm {info.get('arm')!r}, seed {info.get('seed')!r}; its folder is "
                                 f"arm {arm!r}, seed {seed}")
            finished.append(read_unit(folder, arm, seed, info, baselines[arm]))
    return finished, missing


def unit_state(folder: Path, info: dict[str, Any] | None) -> str:
    """Why a unit is not finished, and what a partial run left."""
    if info is not None:
        return f"unit.json has status {info.get('status')!r}, not 'done'"
    if not folder.is_dir():
        return "not started (no folder)"
    parts = []
    events = list((folder / "finetune").rglob("events.out.tfevents.*")) if (folder / "finetune").is_dir() else []
    checkpoints = list(folder.rglob("*.ckpt"))
    if (folder / "finetune").is_dir():
        parts.append(f"finetune/ ({len(events)} event files, {len(checkpoints)} checkpoints)")
    if (folder / "evaluation").is_dir():
        parts.append("evaluation/ " + ("with metrics.json" if (folder / "evaluation/metrics.json").is_file()
                                       else "without metrics.json"))
    return "partial run: " + (", ".join(parts) if parts else "empty folder")


def read_unit(folder: Path, arm: str, seed: int, info: dict[str, Any], baseline: str = BASELINE) -> FinishedUnit:
    """A finished unit's evaluation: the baseline's (the pretrained model's, or a mask arm's ControlNet's) and the
    arm's records, their comparisons, the real data's."""
    path = folder / "evaluation" / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder / 'unit.json'} says done, but {path} does not exist")
    evaluation = json.loads(path.read_text())
    if evaluation.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {evaluation.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    models = {entry["name"]: entry.get("model", entry["name"]) for entry in evaluation.get("entries", [])}
    records: dict[str, dict[Key, dict[str, Any]]] = {baseline: {}, arm: {}}
    for entry in evaluation["entries"]:
        if models[entry["name"]] in records:
            records[models[entry["name"]]].update({row_key(row): row for row in entry["records"]})
    for name, rows in records.items():
        if not rows:
            raise ValueError(f"{path}: no entry of source {name!r} (entries: {sorted(models)}); a study unit "
                             f"evaluates sources named {baseline!r} and {arm!r}")
    paired = {}
    for comparison in evaluation.get("comparisons", []):
        if models.get(comparison["baseline"]) == baseline and models.get(comparison["candidate"]) == arm:
            paired.update({row_key(row, comparison["sampler"]): row for row in comparison["records"]})
    real = {row_key(row): row for row in evaluation.get("real", {}).get("records", [])}
    return FinishedUnit(arm, seed, folder, info, evaluation, records[baseline], records[arm], paired, real, baseline)


def evaluated_alike(units: list[FinishedUnit]) -> list[str]:
    """Every unit must be measured as the first (extractors, evaluation sampler, split), or its numbers do not pool."""
    if not units:
        return []
    first = units[0].evaluation
    setting = lambda e: (e.get("extractors"), e.get("samplers", {}).get("evaluation"),  # noqa: E731
                         e.get("data", {}).get("real_split"))
    return [f"{unit.arm} seed {unit.seed} was evaluated differently from {units[0].arm} seed {units[0].seed} "
            f"(extractors {unit.evaluation.get('extractors')}, sampler "
            f"{unit.evaluation.get('samplers', {}).get('evaluation')}, split "
            f"{unit.evaluation.get('data', {}).get('real_split')})"
            for unit in units[1:] if setting(unit.evaluation) != setting(first)]


def main_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the arms compared with the pretrained model, and the pretrained model's (the paper's table)."""
    return [row for arm in pretrained_arms(results["study"]) for row in results["arms"][arm]["rows"]] \
        + results["pretrained"]["rows"]


def row_sampler(results: dict[str, Any], **fields: Any) -> str | None:
    """The sampler a row is read at: the primary's, else the evaluation's (utility is drawn only there)."""
    study = results["study"]
    every = main_rows(results)
    for sampler in (study["primary"].get("sampler"), study["samplers"].get("evaluation")):
        if find_row(every, **fields, sampler=sampler) is not None:
            return sampler
    return None
