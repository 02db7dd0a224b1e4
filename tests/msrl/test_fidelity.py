"""Class fidelity: the real-trained classifiers' accuracy per class on generated volumes, paired between checkpoints."""

import pytest
import torch
from torch import nn

from msrl.evaluation.comparison import paired_records
from msrl.evaluation.fidelity import FIDELITY_METRIC, correct_calls, fidelity_records
from msrl.evaluation.tables import paired_rows
from msrl.evaluation.utility import LabelledVolumes

N = 12  # volumes, labels alternating 0, 1


class MeanIntensityClassifier(nn.Module):
    """Calls class 1 when a volume's mean intensity is above 0 (or below 0 with `inverted`: always wrong here)."""

    def __init__(self, inverted: bool = False) -> None:
        super().__init__()
        self.sign = -1.0 if inverted else 1.0

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        mean = self.sign * volumes.mean(dim=(1, 2, 3, 4))
        return torch.stack([-mean, mean], dim=1)


def _volumes(lesions: torch.Tensor) -> LabelledVolumes:
    """4³ volumes at -0.5, +1 where `lesions[i]` (a class-1 volume that shows its class), labels i % 2."""
    volumes = torch.full((N, 1, 4, 4, 4), -0.5)
    volumes[lesions] = 1.0
    return LabelledVolumes(volumes, torch.arange(N) % 2)


def _by_class(rows: list[dict]) -> dict[str, dict]:
    assert all(row["metric"] == FIDELITY_METRIC for row in rows)
    return {row["class"]: row for row in rows}


def test_a_classifier_that_is_always_right_gives_1_and_one_always_wrong_gives_0() -> None:
    data = _volumes(torch.arange(N) % 2 == 1)  # every class-1 volume shows its class
    right = _by_class(fidelity_records([MeanIntensityClassifier()], data, [0], num_train=20, batch_size=5))
    wrong = _by_class(fidelity_records([MeanIntensityClassifier(inverted=True)], data, [0], num_train=20))
    assert set(right) == set(wrong) == {"all", "0", "1"}
    for name in ("all", "0", "1"):
        assert right[name]["value"] == 1.0 and right[name]["per_volume"] == [1.0] * len(right[name]["per_volume"])
        assert wrong[name]["value"] == 0.0 and wrong[name]["per_classifier"] == [0.0]
    assert right["1"]["num_generated"] == N // 2 and right["all"]["num_generated"] == N
    assert right["all"]["num_real"] == 20 and right["all"]["train_set"] == "real"


def test_a_volume_counts_the_share_of_seeds_classifiers_that_call_its_class() -> None:
    data = _volumes(torch.arange(N) == 1)  # only one class-1 volume of six shows its class
    rows = _by_class(fidelity_records([MeanIntensityClassifier(), MeanIntensityClassifier(inverted=True)], data,
                                      [0, 1], num_train=20))
    assert correct_calls([MeanIntensityClassifier()], data).shape == (1, N)
    assert rows["0"]["value"] == 0.5 and rows["0"]["per_classifier"] == [1.0, 0.0]  # each classifier in turn
    assert rows["1"]["per_classifier"] == pytest.approx([1 / 6, 5 / 6])
    assert rows["1"]["per_volume"] == [0.5] * 6 and rows["1"]["seeds"] == [0, 1]
    low, high = rows["1"]["ci95"]
    assert low == high == 0.5  # every volume has the same value: nothing to resample


def test_paired_differences_have_the_sign_of_the_change_in_class_one() -> None:
    classifiers = [MeanIntensityClassifier()]
    without = fidelity_records(classifiers, _volumes(torch.zeros(N, dtype=torch.bool)), [0], num_train=20)
    drawn = fidelity_records(classifiers, _volumes(torch.arange(N) % 2 == 1), [0], num_train=20)
    gained = _by_class(paired_records(without, drawn, num_resamples=200, seed=0))
    lost = _by_class(paired_records(drawn, without, num_resamples=200, seed=0))
    assert gained["1"]["difference"] == 1.0 and gained["1"]["verdict"] == "better"
    assert gained["all"]["difference"] == 0.5 and gained["all"]["ci95"][0] > 0
    assert lost["1"]["difference"] == -1.0 and lost["1"]["verdict"] == "worse"
    assert gained["0"]["difference"] == 0.0 and gained["0"]["verdict"] == "no difference"
    assert gained["1"]["train_set"] == "real" and gained["1"]["num_volumes"] == N // 2
    # metrics.md's paired table lists class fidelity per class, not only pooled
    _, rows = paired_rows({"comparisons": [{"candidate": "fine", "baseline": "pre", "num_volumes": N,
                                            "records": list(gained.values())}]})
    assert [(row[1], row[3], row[5]) for row in rows] == [
        (FIDELITY_METRIC, "all", "better"), (FIDELITY_METRIC, "0", "no difference"), (FIDELITY_METRIC, "1", "better")]


def test_no_classifier_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one classifier"):
        fidelity_records([], _volumes(torch.zeros(N, dtype=torch.bool)), [], num_train=20)
