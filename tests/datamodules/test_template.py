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
    assert set(item) == {"image", "label", "subject_id", "seg"}
    assert item["seg"].shape == (1, 16, 16, 16) and item["seg"].dtype == torch.uint8
    segs = {int(module.datasets["train"][i]["label"]): module.datasets["train"][i]["seg"]
            for i in range(len(module.datasets["train"]))}
    assert segs[0].eq(0).all() and set(segs[1].unique().tolist()) <= {0, 1, 2, 4} and segs[1].gt(0).any()
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


def _twin(index: int, label: int, size: int = 32):
    """Subject `index` of seed 0 with or without its lesion, preprocessed as the data module does."""
    from datamodules.template import synthesise_subject

    return TemplateCohortDataModule(spatial_size=size).preprocess(synthesise_subject(index, label, seed=0,
                                                                                     resolution=2))


def _lesion_and_margin(seg: torch.Tensor) -> torch.Tensor:
    """The lesion's labels grown by one voxel (nearest-neighbour labels miss partial-volume voxels at the edge)."""
    return torch.nn.functional.max_pool3d((seg > 0).float()[None], 3, stride=1, padding=1)[0] > 0


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_twins_differ_only_in_the_lesion(index: int) -> None:
    """The class lives in the lesion: the same subject with and without it has the same healthy tissue.

    With whole-brain percentile scaling (generator version 7) the lesion twin's healthy tissue sat
    0.31–0.37 lower on [-1, 1].
    """
    healthy, lesion = _twin(index, 0), _twin(index, 1)
    assert healthy.lesion is not None and int(healthy.lesion.sum()) == 0
    assert set(lesion.lesion.unique().tolist()) == {0, 1, 2, 4}  # core, oedema, enhancing rim (BraTS labels)
    outside = healthy.mask & ~_lesion_and_margin(lesion.lesion)
    difference = (healthy.image - lesion.image).abs()[outside]
    assert float(difference.mean()) < 0.01, float(difference.mean())
    inside = lesion.lesion > 0
    assert float((healthy.image - lesion.image).abs()[inside].mean()) > 0.1  # the lesion itself does differ


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_rim_is_brighter_than_any_healthy_tissue_and_not_clamped_with_it(index: int) -> None:
    volume = _twin(index, 1, size=64)
    healthy = volume.image[volume.mask & ~_lesion_and_margin(volume.lesion)]
    rim = volume.image[volume.lesion == 4]
    assert float(healthy.max()) < 0.6  # the brightest white matter stays well below +1
    # the rim's bright half (its edge voxels blend with the dark core) above the brightest healthy tissue
    assert float(torch.quantile(rim, 0.75)) > float(torch.quantile(healthy, 0.999)), index
    assert float((rim >= 0.999).float().mean()) < 0.2  # and not clamped to +1


def test_lesion_labels_are_cached_beside_the_image(cohort_cache: Path) -> None:
    module = _module(cohort_cache)
    module.prepare_data()
    module.setup("fit")
    dataset = module.datasets["train"]
    for file, record in zip(dataset.files, dataset.records, strict=True):
        seg = torch.load(file, weights_only=True)["seg"]
        assert seg.shape == (1, 16, 16, 16) and seg.dtype == torch.uint8
        assert (int(seg.sum()) > 0) == (record.label == 1), record.subject_id
