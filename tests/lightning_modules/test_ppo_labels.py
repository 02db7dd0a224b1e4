"""Tests of balanced rollout labels (lightning_modules/finetune/labels.py) and how `PPOFinetuneModule` uses them."""

from pathlib import Path

import pytest
import torch

from lightning_modules.finetune.labels import balanced_labels, check_legacy_class_probs, labels_per_class
from lightning_modules.ppo.module import PPOFinetuneModule
from tests.lightning_modules.test_ppo import BrightnessReward


@pytest.mark.parametrize("samples, classes", [(8, 2), (6, 3), (4, 1), (2, 2)])
def test_each_class_gets_an_equal_share(samples: int, classes: int) -> None:
    labels = balanced_labels(samples, classes)
    assert labels.shape == (samples,) and labels.dtype == torch.long
    assert torch.bincount(labels, minlength=classes).tolist() == [samples // classes] * classes
    assert labels[:classes].tolist() == list(range(classes))  # interleaved: a micro-batch of K holds every class


@pytest.mark.parametrize("samples, classes", [(3, 2), (1, 2), (0, 2), (8, 3)])
def test_a_count_the_classes_do_not_divide_is_refused(samples: int, classes: int) -> None:
    with pytest.raises(ValueError, match=rf"samples_per_iteration must be a positive multiple of the model's "
                                         rf"{classes} classes .*got {samples}"):
        labels_per_class(samples, classes)


def test_the_retired_class_probs_accepts_only_uniform() -> None:
    check_legacy_class_probs(None, 2)
    check_legacy_class_probs([0.5, 0.5], 2)  # what configs/finetune/base.yaml used to say
    for bad in ([1.0, 0.0], [0.3, 0.7], [1.0]):
        with pytest.raises(ValueError, match=r"class_probs is retired.*only be null or uniform \(\[0.5, 0.5\]\)"):
            check_legacy_class_probs(bad, 2)


def test_the_module_refuses_an_unbalanceable_batch_at_construction(pretrained_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"samples_per_iteration must be a positive multiple of the model's 2 "
                                         r"classes .*got 3; e.g. 4"):
        PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), samples_per_iteration=3)
    with pytest.raises(ValueError, match="class_probs is retired"):
        PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), class_probs=[0.9, 0.1])
    legacy = PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), class_probs=[0.5, 0.5])
    assert legacy.hparams.class_probs == [0.5, 0.5]  # an old config still builds (and resumes)


def test_every_rank_and_iteration_rolls_out_each_class_equally(pretrained_checkpoint: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    module = PPOFinetuneModule(str(pretrained_checkpoint), BrightnessReward(), samples_per_iteration=4, num_steps=2)
    starts = {}
    for rank in (0, 1):
        monkeypatch.setattr(PPOFinetuneModule, "global_rank", property(lambda self, rank=rank: rank))
        for iteration in range(3):
            module.iteration.fill_(iteration)
            labels, trajectory, _ = module.rollout()
            assert labels.tolist() == [0, 1, 0, 1], (rank, iteration)
            starts[rank, iteration] = trajectory.latents[:, 0]
    # the noise still differs by rank and iteration, and is drawn again alike (what an exact resume needs)
    assert not torch.equal(starts[0, 0], starts[1, 0]) and not torch.equal(starts[0, 0], starts[0, 1])
    module.iteration.fill_(2)
    torch.testing.assert_close(module.rollout()[1].latents[:, 0], starts[1, 2], rtol=0, atol=0)
