"""Deterministic, label-stratified train/val/test splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Split item indices into train/val/test, separately within each label.

    Every label is shuffled with a generator seeded by `seed` and cut in the given fractions
    (rounded, but at least one item in a split whose fraction is positive when a label has three
    or more items), so the same labels and seed always give the same split.

    Args:
        labels: one integer label per item.
        val_fraction: share of each label for validation, in [0, 1).
        test_fraction: share of each label for testing, in [0, 1).
        seed: seed of the shuffle.

    Returns:
        {"train": [...], "val": [...], "test": [...]} sorted index lists.
    """
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        members = members[rng.permutation(len(members))]
        n_val = _count(len(members), val_fraction)
        n_test = _count(len(members), test_fraction)
        splits["val"] += members[:n_val].tolist()
        splits["test"] += members[n_val : n_val + n_test].tolist()
        splits["train"] += members[n_val + n_test :].tolist()
    return {name: sorted(indices) for name, indices in splits.items()}


def _count(n: int, fraction: float) -> int:
    """Items of `n` for a split of `fraction`: rounded, ≥ 1 when asked for and n ≥ 3."""
    if fraction <= 0.0:
        return 0
    count = int(round(n * fraction))
    return max(count, 1) if n >= 3 else count
