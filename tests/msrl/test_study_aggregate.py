"""`msrl study`'s aggregation: units → numbers over seeds, paired differences, claims, results.md/.json, figures.

Each unit's metrics.json is built by the evaluation's own functions (distribution, reward,
memorisation, utility records and the paired comparisons) on toy "volumes" of 8 voxels whose
features are voxel subsets, so that an arm's gain over pretrained is set by hand.
"""

import functools
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils.tensorboard import SummaryWriter

from msrl.evaluation.comparison import paired_distribution, paired_records
from msrl.evaluation.extractors import FeatureExtractor
from msrl.evaluation.fidelity import FIDELITY_METRIC, fidelity_records
from msrl.evaluation.metrics import Estimate, kid, mean_t_ci
from msrl.evaluation.scores import (
    FeatureCache,
    distribution_records,
    memorisation_records,
    record,
    reward_records,
    utility_records,
)
from msrl.evaluation.utility import LabelledVolumes
from msrl.study import study_results, write_study_results
from msrl.study.figures import unit_curves, unit_tag
from msrl.study.tables import results_markdown

ARMS = {"slice2d": ["slice2d"], "volume3d": ["volume3d"], "multiscale": ["slice2d", "volume3d"], "full": None}
# "full" stands in for the other algorithm's arm (the versus claim): fine-tuned by reward backpropagation, slower
BACKPROP, PPO = "lightning_modules.RewardBackpropModule", "lightning_modules.PPOFinetuneModule"
MODELS = {arm: BACKPROP if arm == "full" else PPO for arm in ARMS}
FINETUNE_SECONDS = {arm: 30.0 if arm == "full" else 12.0 for arm in ARMS}
EVALUATION, ROLLOUT = "ddim2-eta0", "ddim4-eta1"
N = 12  # volumes per set, labels alternating


class VoxelFeatures(FeatureExtractor):
    """Features = 4 of the 8 voxels of a 2³ toy volume (extractor "a": the first 4, "b": the last 4)."""

    def __init__(self, name: str, part: slice) -> None:
        super().__init__()
        self._name, self.part, self.anchor = name, part, torch.nn.Parameter(torch.zeros(1))

    @property
    def name(self) -> str:
        return self._name

    def forward(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"3d": volumes.flatten(1)[:, self.part]}


def _labelled(seed: int, shift: tuple[float, float] = (0.0, 0.0)) -> LabelledVolumes:
    noise = torch.randn(N, 1, 2, 2, 2, generator=torch.Generator().manual_seed(seed))
    offset = torch.tensor([shift[0]] * 4 + [shift[1]] * 4).view(1, 1, 2, 2, 2)
    return LabelledVolumes(noise + offset, torch.arange(N) % 2)


class ScriptedClassifier(torch.nn.Module):
    """Calls the classes it is given, one per volume in order (volumes judged in one batch)."""

    def __init__(self, calls: torch.Tensor) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.calls[: len(volumes)], 2).float()


def _fidelity(shown: int) -> list[dict]:
    """Class fidelity of N volumes: every class-0 volume called right, the first `shown` class-1 volumes too."""
    labels = torch.arange(N) % 2
    calls = torch.zeros(N, dtype=torch.long)
    calls[torch.nonzero(labels == 1).flatten()[:shown]] = 1
    return fidelity_records([ScriptedClassifier(calls)], LabelledVolumes(torch.zeros(N, 1, 2, 2, 2), labels), [0],
                            num_train=N, batch_size=N)


CACHE = FeatureCache([VoxelFeatures("a", slice(0, 4)), VoxelFeatures("b", slice(4, 8))],
                     {"test": _labelled(100), "train": _labelled(200)})  # the real held-out and training sets


def _utility(base: float, seed: int, train_set: str) -> list[dict]:
    """Two classifier seeds k whose spread grows with `base`: paired differences differ between them, so the
    per-seed interval has width (a zero-width one would not count for the utility claim)."""
    runs = [{name: base + 0.01 * k * (1 + base) + 0.003 * seed for name in ("accuracy", "balanced_accuracy", "auroc")}
            for k in range(2)]
    results = {name: mean_t_ci([run[name] for run in runs]) for name in runs[0]}
    return utility_records(results, runs, N, N, train_set, [0, 1])


@functools.cache
def _distribution(seed: int, noise: int, shift: tuple[float, float]) -> tuple[dict, list[dict]]:
    """Features and FID/KID/MMD rows of one set of toy volumes (each set is computed once, KID with 4 resamples)."""
    volumes = _labelled(noise, shift)
    features = CACHE.features(volumes.volumes)
    with mock.patch("msrl.evaluation.scores.kid", functools.partial(kid, num_resamples=4)):
        rows = distribution_records(CACHE, features, volumes.labels, num_bootstrap=4, kid_subsets=4, seed=seed)
    return features, rows + memorisation_records(features, volumes.volumes, CACHE, "a")


def _records(seed: int, noise: int, shift: tuple[float, float], utility: float, reward: float, sampler: str):
    features, rows = _distribution(seed, noise, shift)
    rows = list(rows)
    rows.append(record("ms_ssim", Estimate(0.3 + 0.01 * seed, (0.25, 0.35)), extractor=None, view="3d",
                       **{"class": "all"}, num_real=0, num_generated=N, num_pairs=4))
    values = torch.linspace(reward - 0.1, reward + 0.1, N)
    rows += reward_records({"slice2d": values, "total": values}, seed)
    rows += _fidelity(min(max(2 + round((utility - 0.6) * 30), 0), N // 2))  # 2 of 6 lesions, more with utility
    if sampler == EVALUATION:  # utility is drawn at the evaluation's sampler only, as msrl evaluate does
        rows += _utility(utility, seed, "synthetic") + _utility(utility + 0.1, seed, "real+synthetic")
    return features, [{**row, "sampler": sampler} for row in rows]


@functools.cache
def _metrics_text(arm: str, seed: int, gain: tuple[float, float], utility: float) -> str:
    return json.dumps(_metrics(arm, seed, gain, utility))


def _metrics(arm: str, seed: int, gain: tuple[float, float], utility: float) -> dict:
    """metrics.json of one unit: pretrained vs arm at two samplers, paired volume by volume (same noise)."""
    result = {"schema_version": 2, "data": {"real_split": "test", "num_real": N, "num_train": N, "num_test": N},
              "extractors": ["a", "b"],
              "primary": {"metric": "fid", "extractor": "a", "view": "3d", "class": "all", "reference": "test"},
              "samplers": {"evaluation": EVALUATION, "all": [{"label": EVALUATION}, {"label": ROLLOUT}]},
              "real": {"records": [record("ms_ssim", Estimate(0.28, (0.26, 0.3)), extractor=None, view="3d",
                                          **{"class": "all"}, num_real=N, num_generated=0)]
                       + _utility(0.9, seed, "real") + _fidelity(N // 2)},
              "entries": [], "comparisons": []}
    for sampler in (EVALUATION, ROLLOUT):
        suffix = "" if sampler == EVALUATION else f" [{sampler}]"
        noise = 10 * seed + (sampler == ROLLOUT)
        base = _records(seed, noise, (1.5, 1.5), 0.6, 0.0, sampler)
        tuned = _records(seed, noise, (1.5 - gain[0], 1.5 - gain[1]), 0.6 + utility, 1.0, sampler)
        for name, (_, rows) in ((f"pretrained{suffix}", base), (f"{arm}{suffix}", tuned)):
            result["entries"].append({"name": name, "model": name.split(" ")[0], "num_samples": N, "records": rows})
        labels = torch.arange(N) % 2
        rows = paired_distribution(CACHE, base[0], tuned[0], labels, num_resamples=6, seed=seed)
        rows += paired_records(base[1], tuned[1], num_resamples=6, seed=seed)
        result["comparisons"].append({"baseline": f"pretrained{suffix}", "candidate": f"{arm}{suffix}",
                                      "sampler": sampler, "num_volumes": N, "records": rows})
    return result


def _study(root: Path, gains: dict[str, tuple[tuple[float, float], float]], seeds: tuple[int, ...] = (0, 1, 2)) -> Path:
    """A study folder with every unit finished; gains: {arm: ((FID shift towards real in a, in b), utility gain)}."""
    plan = {"arms": [{"name": name, "components": parts, "model": MODELS[name]} for name, parts in ARMS.items()],
            "seeds": list(seeds), "primary": {"metric": "fid", "extractor": None, "class": "all", "sampler": ROLLOUT},
            "claims": {"multiscale": "multiscale", "single_scale": ["slice2d", "volume3d"], "versus": "full"}}
    root.mkdir()
    (root / "study.json").write_text(json.dumps(plan))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits for a busy core
    try:
        _units(root, gains, seeds)
    finally:
        torch.set_num_threads(threads)
    return root


def _units(root: Path, gains: dict[str, tuple[tuple[float, float], float]], seeds: tuple[int, ...]) -> None:
    for arm in ARMS:
        for seed in seeds:
            folder = root / "units" / arm / f"seed_{seed}"
            (folder / "evaluation").mkdir(parents=True)
            (folder / "evaluation" / "metrics.json").write_text(_metrics_text(arm, seed, *gains[arm]))
            prefix = "backprop" if MODELS[arm] == BACKPROP else "ppo"  # each fine-tuner logs under its own prefix
            with SummaryWriter(str(folder / "finetune" / "version_0")) as writer:
                for iteration in range(1, 5):  # as the fine-tuner's self.log writes: iteration i at step i - 1
                    writer.add_scalar(f"{prefix}/iteration", iteration, iteration - 1)
                    writer.add_scalar(f"{prefix}/reward_raw/total", 0.1 * iteration + 0.01 * seed, iteration - 1)
                for iteration, fid in ((0, 3.0), (4, 2.5 - 0.1 * seed)):  # as the guard logs (0: before any update)
                    writer.add_scalar(f"{prefix}/heldout_fid", fid, iteration)
                    writer.add_scalar(f"{prefix}/heldout_fid_iteration", iteration, iteration)
            (folder / "unit.json").write_text(json.dumps({"arm": arm, "seed": seed, "status": "done", "seconds": {
                "finetune": FINETUNE_SECONDS[arm], "evaluate": 3.0}}))


GOOD = {"slice2d": ((0.6, 0.0), 0.0), "volume3d": ((0.8, 0.0), 0.0), "multiscale": ((1.4, 0.0), 0.1),
        "full": ((1.0, 0.0), 0.05)}
BAD = {"slice2d": ((1.2, 0.0), 0.0), "volume3d": ((0.6, 0.0), 0.0), "multiscale": ((0.0, -2.0), -0.1),
       "full": ((1.0, 0.0), 0.0)}


@pytest.fixture(scope="module")
def good_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _study(tmp_path_factory.mktemp("good") / "study", GOOD)


def _claims(results: dict) -> dict[str, str]:
    return {claim["id"]: claim["status"] for claim in results["claims"]}


def test_every_claim_holds_when_multiscale_improves_and_outputs_are_written(good_study: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    shutil.copytree(good_study, study)
    results = write_study_results(study)
    assert results["study"]["primary"]["extractor"] == "a" and results["study"]["primary"]["sampler"] == ROLLOUT
    assert _claims(results) == {"primary_fid": "holds", "other_fid": "holds", "utility": "holds",
                                "single_scale": "holds", "class_fidelity": "holds", "versus": "holds"}
    single = next(c for c in results["claims"] if c["id"] == "single_scale")
    assert single["numbers"]["best_single"] == "volume3d"  # the lower mean primary FID of the two
    versus = next(c for c in results["claims"] if c["id"] == "versus")
    assert versus["numbers"]["finetune_seconds"] == {"multiscale": 12.0, "full": 30.0}
    assert versus["numbers"]["means"]["multiscale"] < versus["numbers"]["means"]["full"]
    assert "mean fine-tuning time per unit: multiscale 12 s, full 30 s" in versus["detail"]
    assert results["arms"]["full"]["algorithm"] == "backprop" and results["arms"]["full"]["finetune_seconds"] == 30
    assert json.loads((study / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == results
    text = (study / "results.md").read_text()
    assert text.index("## The paper's table") < text.index("## Claims") < text.index("## Every number")
    assert "FID ↓ (primary) a (3d), class all" in text and f"utility balanced accuracy ↑ (trained on synthetic) " \
        f"[{EVALUATION}]" in text and "None: every planned unit has finished." in text
    assert "better 3/3" in text
    assert "| full | reward backpropagation | all (the full reward) | – | 3/3 | 30 |" in text
    assert "| multiscale | PPO | slice2d, volume3d | – | 3/3 | 12 |" in text
    assert "- **holds**: multiscale (PPO) beats full (reward backpropagation) on the primary FID" in text
    # a tag without prefix is read under each unit's own fine-tuner's: backprop/… for full, ppo/… for the others
    by_arm = unit_curves(study, results, "heldout_fid")
    assert set(by_arm) == set(ARMS) and [y.tolist() for _, y in by_arm["full"]][1] == pytest.approx([3.0, 2.4])
    assert unit_tag(results, "full", "heldout_fid") == "backprop/heldout_fid"
    assert unit_tag(results, "multiscale", "reward_raw/total") == "ppo/reward_raw/total"
    assert unit_tag(results, "full", "ppo/heldout_fid") == "ppo/heldout_fid"  # a full tag is read as given
    curves = unit_curves(study, results, "ppo/heldout_fid")["multiscale"]
    assert [x.tolist() for x, _ in curves] == [[0.0, 4.0]] * 3  # the iterations it was measured after
    reward = unit_curves(study, results, "ppo/reward_raw/total")["multiscale"]
    assert [x.tolist() for x, _ in reward] == [[1.0, 2.0, 3.0, 4.0]] * 3
    for name in ("forest", "reward_curves", "heldout_fid_curves"):
        png = study / results["figures"][name]
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_numbers_over_seeds_are_t_intervals_of_the_units_values(good_study: Path) -> None:
    results = study_results(good_study)
    fields = {"metric": "fid", "extractor": "a", "class": "all", "reference": "test", "sampler": ROLLOUT}
    values, differences = [], []
    for seed in (0, 1, 2):
        evaluation = json.loads((good_study / f"units/multiscale/seed_{seed}/evaluation/metrics.json").read_text())
        entry = next(e for e in evaluation["entries"] if e["name"] == f"multiscale [{ROLLOUT}]")
        values.append(next(r["value"] for r in entry["records"] if all(r.get(k) == v for k, v in fields.items())))
        rows = next(c for c in evaluation["comparisons"] if c["sampler"] == ROLLOUT)["records"]
        differences.append(next(r["difference"] for r in rows if all(r.get(k) == v for k, v in fields.items()
                                                                       if k != "sampler")))
    row = next(r for r in results["arms"]["multiscale"]["rows"] if all(r[k] == v for k, v in fields.items()))
    half = scipy.stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert row["values"] == values and row["mean"] == pytest.approx(np.mean(values))
    assert row["ci95"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    paired = row["paired"]
    half = scipy.stats.t.ppf(0.975, 2) * np.std(differences, ddof=1) / np.sqrt(3)
    assert [p["difference"] for p in paired["per_seed"]] == differences
    assert paired["mean"] == pytest.approx(np.mean(differences), abs=1e-6)
    assert paired["ci95"] == pytest.approx([np.mean(differences) - half, np.mean(differences) + half], abs=1e-6)
    assert paired["better"] == 3 and paired["verdict"] == "better"
    pretrained = next(r for r in results["pretrained"]["rows"] if all(r[k] == v for k, v in fields.items()))
    assert pretrained["spread"] < 1e-9 and len(pretrained["values"]) == 3  # the same samples in every arm's unit


def test_class_fidelity_has_a_row_per_class_beside_the_real_ceiling_and_pairs_with_pretrained(
        good_study: Path) -> None:
    results = study_results(good_study)
    fields = {"metric": FIDELITY_METRIC, "class": "1", "sampler": ROLLOUT}
    row = next(r for r in results["arms"]["multiscale"]["rows"] if all(r[k] == v for k, v in fields.items()))
    assert row["values"] == [5 / 6] * 3 and row["lower_is_better"] is False  # 2 + 3 of 6 lesions drawn
    assert row["paired"]["mean"] == pytest.approx(0.5) and row["paired"]["verdict"] == "better"
    assert [p["difference"] for p in row["paired"]["per_seed"]] == pytest.approx([0.5] * 3)
    text = results_markdown(results)
    table = text[text.index("### Table 1"):text.index("### Table 2")]
    line = next(line for line in table.splitlines() if "class fidelity ↑ (real-trained classifier), class 1" in line)
    assert "| 1 [1, 1] (held-out real) | 0.333 [0.333, 0.333] |" in line  # the real ceiling; pretrained: 2 of 6
    assert "class fidelity ↑ (real-trained classifier), class 0" in table


def test_claims_do_not_hold_with_their_numbers_when_multiscale_does_not_improve(tmp_path: Path) -> None:
    results = study_results(_study(tmp_path / "study", BAD))
    lost = next(r for r in results["arms"]["multiscale"]["rows"]
                if r["metric"] == FIDELITY_METRIC and r["class"] == "1" and r["sampler"] == ROLLOUT)
    assert lost["paired"]["mean"] == pytest.approx(-1 / 3)  # no lesion drawn where pretrained drew 2 of 6
    assert _claims(results) == {"primary_fid": "does not hold", "other_fid": "does not hold",
                                "utility": "does not hold", "single_scale": "does not hold",
                                "class_fidelity": "does not hold", "versus": "does not hold"}
    utility = next(c for c in results["claims"] if c["id"] == "utility")
    assert utility["numbers"]["better"] == 0 and all(p["verdict"] == "worse" for p in utility["numbers"]["per_seed"])
    other = next(c for c in results["claims"] if c["id"] == "other_fid")
    assert {w["extractor"] for w in other["numbers"]["worse"]} == {"b"}
    text = results_markdown(results)
    assert "- **does not hold**: multiscale beats pretrained on the primary FID" in text
    assert "better single-scale arm slice2d" in text


def test_missing_units_are_listed_and_undecided_claims_are_not_evaluable(good_study: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    shutil.copytree(good_study, study)
    (study / "units/multiscale/seed_2/unit.json").unlink()  # a partial run: events and metrics, no unit.json
    shutil.rmtree(study / "units/full/seed_1")
    results = study_results(study)  # the figures are drawn (and checked) in the first test
    missing = {(m["arm"], m["seed"]): m["state"] for m in results["units"]["missing"]}
    assert set(missing) == {("multiscale", 2), ("full", 1)}
    assert missing[("full", 1)] == "not started (no folder)" and missing[("multiscale", 2)].startswith("partial run")
    assert results["arms"]["multiscale"]["seeds_finished"] == [0, 1]
    # 2 of 3 seeds better beyond the per-seed interval is already 2/3 (FID, utility, class fidelity); the
    # claims over seeds wait for the third seed
    assert _claims(results) == {"primary_fid": "holds", "other_fid": "not evaluable", "utility": "holds",
                                "single_scale": "not evaluable", "class_fidelity": "holds",
                                "versus": "not evaluable"}
    text = results_markdown(results)
    assert "| multiscale | 2 | partial run: finetune/ (1 event files, 0 checkpoints), evaluation/ with metrics.json |" \
        in text and "multiscale (2/3 seeds)" in text


def test_bad_study_folders_are_refused_with_the_file_named(good_study: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="study.json does not exist"):
        write_study_results(tmp_path)
    study = tmp_path / "study"
    shutil.copytree(good_study, study)
    metrics = study / "units/slice2d/seed_0/evaluation/metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "schema_version": 1}))
    with pytest.raises(ValueError, match="seed_0/evaluation/metrics.json: schema_version 1, expected 2"):
        write_study_results(study)
    metrics.unlink()
    with pytest.raises(FileNotFoundError, match="says done, but .*metrics.json does not exist"):
        write_study_results(study)


def test_a_study_with_nothing_finished_lists_every_unit_as_missing(tmp_path: Path) -> None:
    plan = {"arms": [{"name": name, "components": parts} for name, parts in ARMS.items()], "seeds": [0, 1]}
    (tmp_path / "study.json").write_text(json.dumps(plan))
    (tmp_path / "units/slice2d/seed_0/finetune/version_0").mkdir(parents=True)
    results = write_study_results(tmp_path)
    assert len(results["units"]["missing"]) == 8 and results["figures"] == {}
    assert set(_claims(results).values()) == {"not evaluable"}
    text = (tmp_path / "results.md").read_text()
    assert "| slice2d | 0 | partial run: finetune/ (0 event files, 0 checkpoints) |" in text
