"""Tests of the embedded MNI152 template cohort and the base data module around it."""

from pathlib import Path

import pytest
import torch

from datamodules import TemplateCohortDataModule


def _module(cache: Path, **kwargs) -> TemplateCohortDataModule:
    settings = dict(num_subjects=8, spatial_size=16, cache_dir=cache, seed=0, val_fraction=0.25, test_fraction=0.25)
    settings.update(kwargs)
    return TemplateCohortDataModule(**settings)


def test_items_have_the_shared_format(cohort_cache: Path) -> None:
    module = _module(cohort_cache)
    module.prepare_data()
    module.setup("fit")
    item = module.datasets["train"][0]
    assert set(item) == {"image", "label", "subject_id"}
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["subject_id"].startswith("template_")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["label"].shape == (2,)


def test_labels_are_balanced_and_splits_stratified(cohort_cache: Path) -> None:
    module = _module(cohort_cache)
    module.prepare_data()
    module.setup("fit")
    labels = [r.label for r in module.list_subjects()]
    assert labels.count(0) == labels.count(1) == 4
    for split in ("train", "val", "test"):
        split_labels = sorted(r.label for r in module.datasets[split].records)
        assert split_labels.count(0) == split_labels.count(1) >= 1, split


def test_same_seed_gives_identical_volumes_and_other_seed_differs() -> None:
    from datamodules.template import synthesise_subject

    first = synthesise_subject(3, label=1, seed=0, resolution=2)["image"].data
    second = synthesise_subject(3, label=1, seed=0, resolution=2)["image"].data
    third = synthesise_subject(3, label=1, seed=1, resolution=2)["image"].data
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_lesions_make_class_one_different(tmp_path: Path) -> None:
    """The lesion's enhancing rim and necrotic core raise the spread inside the brain."""
    from datamodules.template import synthesise_subject

    healthy = synthesise_subject(5, label=0, seed=0, resolution=2)["image"].data
    lesion = synthesise_subject(5, label=1, seed=0, resolution=2)["image"].data
    changed = (healthy - lesion).abs() > 0.1
    assert 100 < int(changed.sum()) < 0.1 * healthy.numel()  # a focal change, not the whole brain


def test_cache_is_reused_and_keyed_by_settings(cohort_cache: Path) -> None:
    module = _module(cohort_cache)
    file = module.cache_path / "template_0000.pt"
    stamp = file.stat().st_mtime_ns
    module.prepare_data()
    assert file.stat().st_mtime_ns == stamp  # not regenerated
    assert _module(cohort_cache, seed=2).cache_path != module.cache_path
    assert _module(cohort_cache, spatial_size=24).cache_path != module.cache_path


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_subjects"):
        TemplateCohortDataModule(num_subjects=1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="spatial_size"):
        TemplateCohortDataModule(spatial_size=4, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        _module(tmp_path / "empty").setup("fit")
