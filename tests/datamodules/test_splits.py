"""Tests of the deterministic stratified split."""

import pytest

from datamodules.splits import stratified_split


def test_split_is_deterministic_and_stratified() -> None:
    labels = [0] * 20 + [1] * 10
    first = stratified_split(labels, 0.2, 0.1, seed=3)
    assert first == stratified_split(labels, 0.2, 0.1, seed=3)
    assert first != stratified_split(labels, 0.2, 0.1, seed=4)
    every = sorted(first["train"] + first["val"] + first["test"])
    assert every == list(range(30))  # a partition: nothing lost, nothing twice
    assert [labels[i] for i in first["val"]].count(0) == 4
    assert [labels[i] for i in first["val"]].count(1) == 2
    assert [labels[i] for i in first["test"]].count(1) == 1


def test_small_classes_still_reach_every_split() -> None:
    split = stratified_split([0, 0, 0, 1, 1, 1], 0.1, 0.1, seed=0)
    assert sorted(0 if i < 3 else 1 for i in split["val"]) == [0, 1]
    assert len(split["train"]) == 2


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.6, 0.5), (1.0, 0.0)])
def test_bad_fractions_are_rejected(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        stratified_split([0, 1, 0, 1], val, test, seed=0)
