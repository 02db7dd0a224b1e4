"""The study's claims on hand-made aggregated results: utility and class fidelity from per-seed paired intervals,
the versus claim from means over seeds with both arms' fine-tuning seconds.

The results dicts have the shape msrl/study/aggregate.py writes (rows with `paired.per_seed`), holding only
what the claims read.
"""

from typing import Any

import pytest

from msrl.evaluation.fidelity import FIDELITY_METRIC
from msrl.study.claims import class_fidelity_claim, evaluate_claims, utility_claim, versus_claim

SAMPLER = "ddim20-eta1"
UTILITY = {"metric": "utility/balanced_accuracy", "extractor": None, "view": "3d", "class": "all",
           "reference": None, "train_set": "synthetic", "sampler": SAMPLER}
FIDELITY = {"metric": FIDELITY_METRIC, "extractor": None, "view": "3d", "class": "1", "reference": None,
            "train_set": None, "sampler": SAMPLER}
PRIMARY = {"metric": "fid", "extractor": "a", "view": "3d", "class": "all", "reference": "test", "train_set": None,
           "sampler": SAMPLER}


def _paired_row(fields: dict[str, Any], per_seed: list[tuple[float, list[float] | None, str | None]],
                over_seeds: list[float] | None = None) -> dict[str, Any]:
    """A row whose per-seed paired differences are (difference, ci95, verdict) for seeds 0, 1, …"""
    entries = [{"seed": s, "difference": d, "ci95": ci, "verdict": v} for s, (d, ci, v) in enumerate(per_seed)]
    mean = sum(d for d, _, _ in per_seed) / len(per_seed)
    return {**fields, "seeds": [e["seed"] for e in entries], "values": [0.5] * len(entries),
            "paired": {"seeds": [e["seed"] for e in entries], "per_seed": entries, "num_seeds": len(entries),
                       "better": sum(v == "better" for _, _, v in per_seed),
                       "worse": sum(v == "worse" for _, _, v in per_seed), "mean": mean,
                       "ci95": over_seeds, "verdict": "better" if over_seeds and over_seeds[0] > 0 else None}}


def _results(rows: dict[str, list[dict[str, Any]]], seeds: tuple[int, ...] = (0, 1, 2),
             claims: dict[str, Any] | None = None, seconds: dict[str, float] | None = None) -> dict[str, Any]:
    finished = [{"arm": arm, "seed": seed, "seconds": {"finetune": (seconds or {}).get(arm, 10.0), "evaluate": 1.0}}
                for arm in rows for seed in seeds]
    return {"study": {"seeds": list(seeds), "arms": list(rows), "components": dict.fromkeys(rows),
                      "claims": claims, "primary": dict(PRIMARY), "samplers": {"evaluation": SAMPLER},
                      "algorithms": {arm: "ppo" if arm.startswith("ppo") else "backprop" for arm in rows}},
            "arms": {arm: {"rows": arm_rows} for arm, arm_rows in rows.items()}, "pretrained": {"rows": []},
            "units": {"finished": finished, "missing": []}}


def test_utility_is_not_decided_by_a_zero_width_interval_over_seeds_of_point_differences() -> None:
    """The reported case: one test volume of 64 flipped in each of three seeds, +0.0156 [+0.0156, +0.0156] over
    seeds, no per-seed interval: not evaluable (the t-interval over seeds used to say "up")."""
    row = _paired_row(UTILITY, [(1 / 64, None, None)] * 3, over_seeds=[1 / 64, 1 / 64])
    result = utility_claim(_results({"backprop_multiscale": [row]}), "backprop_multiscale")
    assert result["status"] == "not evaluable"
    assert "the evaluation gave no per-seed interval of synthetic utility" in result["detail"]


def test_utility_holds_on_per_seed_verdicts_in_two_of_three_seeds() -> None:
    better, none = ([0.01, 0.05], "better"), ([-0.01, 0.04], "no difference")
    holds = _paired_row(UTILITY, [(0.03, *better), (0.02, *none), (0.03, *better)], over_seeds=[-0.1, 0.2])
    result = utility_claim(_results({"m": [holds]}), "m")
    assert result["status"] == "holds" and result["numbers"]["better"] == 2  # the wide interval over seeds is not read
    fails = _paired_row(UTILITY, [(0.03, *better), (0.02, *none), (0.01, *none)], over_seeds=[0.005, 0.04])
    assert utility_claim(_results({"m": [fails]}), "m")["status"] == "does not hold"  # despite an interval over 0
    # a zero-width per-seed bootstrap interval (every volume of a class flipped the same way) counts by its verdict
    flat = _paired_row(UTILITY, [(0.5, [0.5, 0.5], "better")] * 2 + [(0.0, [-0.02, 0.02], "no difference")])
    assert utility_claim(_results({"m": [flat]}), "m")["status"] == "holds"
    # one seed of three finished and better: 1 more is needed and 2 may still come
    early = _paired_row(UTILITY, [(0.03, *better)])
    assert utility_claim(_results({"m": [early]}), "m")["status"] == "not evaluable"


def test_class_fidelity_reads_class_1_per_seed() -> None:
    better, worse = ([0.1, 0.4], "better"), ([-0.4, -0.1], "worse")
    class_0 = _paired_row({**FIDELITY, "class": "0"}, [(0.3, *better)] * 3)
    lost = _paired_row(FIDELITY, [(-0.3, *worse)] * 3)
    result = class_fidelity_claim(_results({"m": [class_0, lost]}), "m")
    assert result["status"] == "does not hold" and result["numbers"]["better"] == 0  # class 1, not class 0's gain
    gained = _paired_row(FIDELITY, [(0.3, *better), (0.3, *better), (-0.3, *worse)])
    assert class_fidelity_claim(_results({"m": [class_0, gained]}), "m")["status"] == "holds"
    assert class_fidelity_claim(_results({"m": [class_0]}), "m")["status"] == "not evaluable"


def _fid(values: list[float]) -> dict[str, Any]:
    return {**PRIMARY, "seeds": list(range(len(values))), "values": values}


def test_versus_compares_mean_primary_fid_over_common_seeds_and_states_both_times() -> None:
    rows = {"backprop_multiscale": [_fid([1.0, 1.2, 0.9])], "ppo_multiscale": [_fid([1.3, 1.1, 1.4])]}
    seconds = {"backprop_multiscale": 300.0, "ppo_multiscale": 120.0}
    result = versus_claim(_results(rows, seconds=seconds), "backprop_multiscale", "ppo_multiscale")
    assert result["status"] == "holds"
    assert result["numbers"]["difference"] == pytest.approx((3.1 - 3.8) / 3)
    assert result["numbers"]["finetune_seconds"] == {"backprop_multiscale": 300.0, "ppo_multiscale": 120.0}
    assert "backprop_multiscale (reward backpropagation) beats ppo_multiscale (PPO)" in result["claim"]
    assert "mean fine-tuning time per unit: backprop_multiscale 300 s, ppo_multiscale 120 s" in result["detail"]
    swapped = versus_claim(_results(rows), "ppo_multiscale", "backprop_multiscale")
    assert swapped["status"] == "does not hold"
    rows["ppo_multiscale"] = [_fid([1.3, 1.1])]  # seed 2 not finished: not decided
    assert versus_claim(_results(rows), "backprop_multiscale", "ppo_multiscale")["status"] == "not evaluable"


def test_the_versus_claim_is_made_only_when_the_plan_names_its_arm() -> None:
    rows = {"multi": [_fid([1.0, 1.2, 0.9])], "ppo_multi": [_fid([1.3, 1.1, 1.4])]}
    ids = [c["id"] for c in evaluate_claims(_results(rows, claims={"multiscale": "multi"}))]
    assert "versus" not in ids and {"utility", "class_fidelity"} <= set(ids)
    claims = evaluate_claims(_results(rows, claims={"multiscale": "multi", "versus": "ppo_multi"}))
    assert next(c for c in claims if c["id"] == "versus")["status"] == "holds"


def test_an_explicit_empty_single_scale_list_drops_claim_4() -> None:
    """A one-component arm (the classifier alone) named as the claims' arm is not compared with itself."""
    rows = {"clf": [_fid([1.0, 1.2, 0.9])]}
    results = _results(rows, claims={"multiscale": "clf"})
    results["study"]["components"] = {"clf": ["classifier"]}
    assert "single_scale" in [c["id"] for c in evaluate_claims(results)]  # guessed: the arm itself
    results["study"]["claims"] = {"multiscale": "clf", "single_scale": []}
    assert "single_scale" not in [c["id"] for c in evaluate_claims(results)]
