"""Paired utility comparisons: a bootstrap over the held-out test volumes, averaged over classifier seeds
(evaluation/paired.py `paired_test_volumes`, evaluation/comparison.py `paired_records`)."""

import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy

from msrl.evaluation.comparison import paired_records
from msrl.evaluation.metrics import mean_t_ci
from msrl.evaluation.paired import paired_seeds, paired_test_volumes
from msrl.evaluation.scores import utility_records
from msrl.study.units import row_key

LABELS = [0] * 32 + [1] * 32  # the embedded cohort's test split: 64 volumes, two classes


def _predictions(wrong: set[int]) -> list[int]:
    """Predicted classes that are right on every test volume but those in `wrong`."""
    return [1 - label if i in wrong else label for i, label in enumerate(LABELS)]


def _records(per_seed_predictions: list[list[int]], train_set: str = "synthetic",
             labels: list[int] = LABELS) -> list[dict]:
    """Utility records as `msrl evaluate` writes them, from each seed's predicted classes."""
    truth = torch.tensor(labels)
    runs = []
    for predicted in per_seed_predictions:
        preds = torch.tensor(predicted)
        runs.append({"accuracy": float(multiclass_accuracy(preds, truth, 2, average="micro")),
                     "balanced_accuracy": float(multiclass_accuracy(preds, truth, 2, average="macro")),
                     "auroc": 0.5, "predicted": predicted})
    results = {name: mean_t_ci([run[name] for run in runs]) for name in ("accuracy", "balanced_accuracy", "auroc")}
    seeds = list(range(len(runs)))
    return utility_records(results, runs, len(labels), 96, train_set, seeds, test_labels=labels)


def _row(rows: list[dict], metric: str, train_set: str = "synthetic") -> dict:
    return next(r for r in rows if r["metric"] == metric and r["train_set"] == train_set)


def test_records_keep_each_test_volumes_prediction_per_seed() -> None:
    rows = _records([_predictions({0, 40}), _predictions({1})])
    balanced = _row(rows, "utility/balanced_accuracy")
    assert balanced["test_labels"] == LABELS
    assert balanced["per_test_volume"] == [_predictions({0, 40}), _predictions({1})]
    assert "per_test_volume" not in _row(rows, "utility/auroc")  # AUROC needs scores, not classes


def test_one_test_volume_more_right_in_every_seed_is_no_difference() -> None:
    """The study's "utility up" of +0.0156 [+0.0156, +0.0156]: one volume of 64 in each of three seeds."""
    wrong = {0, 5, 33, 40, 41, 50}
    baseline = _records([_predictions(wrong)] * 3)
    candidate = _records([_predictions(wrong - {0})] * 3)
    rows = paired_records(baseline, candidate, num_resamples=500, seed=0)
    for metric in ("utility/accuracy", "utility/balanced_accuracy"):
        row = _row(rows, metric)
        assert row["difference"] == pytest.approx(1 / 64)
        assert row["ci95"][0] <= 0 <= row["ci95"][1] and row["verdict"] == "no difference"
        assert row["num_volumes"] == 64 and row["num_seeds"] == 3
        assert row["baseline"] == pytest.approx(_row(baseline, metric)["value"])  # the record's value, recomputed
        assert row["candidate"] == pytest.approx(_row(candidate, metric)["value"])
    # over seeds alone the same difference is "better" (a zero-width t interval): what this replaces
    seeds_only = paired_seeds(_row(baseline, "utility/accuracy")["per_seed"],
                              _row(candidate, "utility/accuracy")["per_seed"], lower_is_better=False)
    assert seeds_only.verdict == "better"


def test_one_seed_gets_an_interval_over_test_volumes() -> None:
    baseline = _records([_predictions({0})])
    candidate = _records([_predictions(set())])
    row = _row(paired_records(baseline, candidate, num_resamples=500, seed=0), "utility/balanced_accuracy")
    assert row["num_seeds"] == 1 and row["verdict"] == "no difference" and row["ci95"][0] <= 0 <= row["ci95"][1]


def test_candidate_right_on_many_more_test_volumes_is_better_and_the_reverse_worse() -> None:
    many = set(range(0, 64, 3))  # 22 volumes of both classes
    baseline = _records([_predictions(many), _predictions(many | {1}), _predictions(many - {3})])
    candidate = _records([_predictions({3}), _predictions(set()), _predictions({4, 60})])
    better = _row(paired_records(baseline, candidate, num_resamples=500, seed=0), "utility/balanced_accuracy")
    assert better["verdict"] == "better" and better["ci95"][0] > 0 and better["difference"] > 0.3
    worse = _row(paired_records(candidate, baseline, num_resamples=500, seed=0), "utility/accuracy")
    assert worse["verdict"] == "worse" and worse["ci95"][1] < 0


def test_interval_is_reproducible_with_the_seed() -> None:
    labels = torch.tensor(LABELS)
    a = torch.stack([torch.tensor(_predictions(set(range(s, 64, 4)))) for s in range(3)])
    b = torch.stack([torch.tensor(_predictions(set(range(s, 64, 7)))) for s in range(3)])
    first = paired_test_volumes(labels, a, b, balanced=True, num_resamples=300, seed=4)
    assert paired_test_volumes(labels, a, b, balanced=True, num_resamples=300, seed=4) == first
    assert first.ci95[0] < first.difference < first.ci95[1]


def test_resamples_are_stratified_so_balanced_accuracy_always_has_both_classes() -> None:
    labels = [0] * 30 + [1] * 2  # a rare class: an unstratified resample would often miss it
    a, b = [0] * 32, [0] * 30 + [1] * 2  # b finds the rare class, a never does
    result = paired_test_volumes(labels, [a], [b], balanced=True, num_resamples=300, seed=0)
    assert result.a == pytest.approx(0.5) and result.b == pytest.approx(1.0)
    # every resample keeps two class-1 volumes, both right for b and wrong for a: the difference never moves
    assert result.ci95 == pytest.approx((0.5, 0.5)) and result.verdict == "better"


def test_comparison_row_is_found_by_the_study_under_the_records_key() -> None:
    baseline = _records([_predictions({0})], train_set="real+synthetic")
    candidate = _records([_predictions(set())], train_set="real+synthetic")
    rows = paired_records(baseline, candidate, num_resamples=50, seed=0)
    record = _row(candidate, "utility/balanced_accuracy", "real+synthetic")
    comparison = _row(rows, "utility/balanced_accuracy", "real+synthetic")
    assert row_key(comparison, "sampler") == row_key({**record, "sampler": "sampler"})
    assert {"metric", "difference", "ci95", "verdict", "baseline", "candidate", "train_set", "class",
            "num_volumes", "num_seeds"} <= set(comparison)


def test_records_without_predictions_keep_the_interval_over_seeds() -> None:
    """metrics.json files written before predictions were kept, and AUROC: a t interval over seeds."""
    old = [{k: v for k, v in r.items() if k not in ("per_test_volume", "test_labels")}
           for r in _records([_predictions({0, 1}), _predictions({2, 3})])]
    new = [{k: v for k, v in r.items() if k not in ("per_test_volume", "test_labels")}
           for r in _records([_predictions({0}), _predictions(set())])]
    rows = paired_records(old, new, num_resamples=50, seed=0)
    accuracy = _row(rows, "utility/accuracy")
    assert accuracy["num_seeds"] == 2 and "num_volumes" not in accuracy
    assert accuracy["ci95"] == pytest.approx(paired_seeds([62 / 64, 62 / 64], [63 / 64, 1.0],
                                                          lower_is_better=False).ci95)
    assert "num_volumes" not in _row(paired_records(_records([_predictions({0})] * 2),
                                                    _records([_predictions(set())] * 2), 50, 0), "utility/auroc")


def test_different_test_volumes_are_refused() -> None:
    shuffled = LABELS[::-1]
    with pytest.raises(ValueError, match="different test volumes"):
        paired_records(_records([_predictions(set())]), _records([shuffled], labels=shuffled), 50, 0)
