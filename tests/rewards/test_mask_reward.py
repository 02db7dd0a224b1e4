"""Tests of `MaskFidelityReward` and masks in the reward contract: the gradient reaches the volume, soft Dice is
the evaluation's hard Dice on one-hot predictions, a reward that reads masks is refused without them, composites
pass masks to the components that read them only, and the segmenter is recorded like every reward network."""

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.digest import sha256_of
from lightning_modules.critics import SegmenterModule, one_hot_masks, soft_dice
from msrl.evaluation.segmenter import dice_per_volume
from rewards import (
    InterSliceContinuityReward,
    MaskFidelityReward,
    MultiScaleReward,
    mask_reading_parts,
    raw_reward_scores,
    reward_networks,
    score_components,
)
from rewards.mask import mask_fidelity

LABELS = (1, 2, 4)


def _masks(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Label maps [B, 1, S, S, S]: a random box of each code per volume, the first volume without any lesion."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch, 1, size, size, size, dtype=torch.uint8)
    for b in range(1, batch):
        for code in LABELS[: 1 + b % 3]:  # volumes with one, two or three labels
            corner = torch.randint(0, size - 5, (3,), generator=generator).tolist()
            masks[b, 0, corner[0]:corner[0] + 5, corner[1]:corner[1] + 4, corner[2]:corner[2] + 3] = code
    return masks


@pytest.fixture(scope="module")
def segmenter_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny `SegmenterModule` (16³), saved as `msrl train-reward` saves one."""
    torch.manual_seed(0)
    module = SegmenterModule(in_channels=1, spatial_size=16, channels=(8, 16), downsample=1)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("segmenter") / "segmenter.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_the_gradient_reaches_every_volume(segmenter_checkpoint: Path) -> None:
    reward = MaskFidelityReward(str(segmenter_checkpoint))
    assert reward.differentiable and reward.needs_masks
    volumes = (torch.rand(4, 1, 16, 16, 16) * 2 - 1).requires_grad_(True)
    masks = _masks(4)
    values, components = score_components(reward, volumes, None, masks)
    assert values.shape == (4,) and ((values >= 0) & (values <= 1)).all()
    assert torch.equal(components["mask_fidelity"], values)
    (gradient,) = torch.autograd.grad(values.sum(), volumes)
    assert torch.isfinite(gradient).all()
    assert all(gradient[b].abs().sum() > 0 for b in range(4))  # the lesion-free volume's too


def test_soft_dice_is_the_evaluations_hard_dice_on_one_hot_predictions() -> None:
    masks, predicted = _masks(6, seed=1), _masks(6, seed=2)
    predicted[1] = masks[1]  # a perfect prediction
    predicted[2] = 0  # a missed lesion
    predicted[0, 0, 2:4, 2:4, 2:4] = 4  # a lesion drawn where the mask has none
    probabilities = one_hot_masks(predicted, LABELS)
    hard = dice_per_volume(predicted, masks, LABELS)
    soft = soft_dice(probabilities, one_hot_masks(masks, LABELS))[:, 1:]
    for index, label in enumerate(LABELS):
        torch.testing.assert_close(soft[:, index].double(), hard[str(label)], equal_nan=True)
    rewards = mask_fidelity(probabilities, masks, LABELS)
    present = torch.stack([(masks == label).flatten(1).any(1) for label in LABELS], 1)
    for b in range(1, 6):  # lesion masks: the mean hard Dice over the labels the mask holds
        expected = torch.stack([hard[str(label)][b] for label, p in zip(LABELS, present[b], strict=True) if p]).mean()
        assert float(rewards[b]) == pytest.approx(float(expected))
    assert float(rewards[1]) == 1.0 and float(rewards[2]) == 0.0
    assert float(rewards[0]) == 0.0  # no lesion in the mask, one in the prediction
    predicted[0] = 0
    assert float(mask_fidelity(one_hot_masks(predicted, LABELS), masks, LABELS)[0]) == 1.0


def test_a_reward_that_reads_masks_is_refused_without_them(segmenter_checkpoint: Path) -> None:
    mask_reward = MaskFidelityReward(str(segmenter_checkpoint))
    composite = MultiScaleReward([InterSliceContinuityReward(), mask_reward], normalise=False)
    volumes = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    assert mask_reading_parts(composite) == ["mask_fidelity (MaskFidelityReward)"]
    for reward in (mask_reward, composite):
        with pytest.raises(ValueError, match=r"reward parts mask_fidelity \(MaskFidelityReward\) score volumes "
                                             r"against the lesion masks .* none were given: fine-tune with a "
                                             r"ControlNet conditioner"):
            score_components(reward, volumes, None)
        with pytest.raises(ValueError, match="none were given"):
            raw_reward_scores(reward, volumes, None)
    with pytest.raises(ValueError, match=r"masks must be label maps \(2, 1, 16, 16, 16\)"):
        score_components(mask_reward, volumes, None, _masks(2, size=8))
    with pytest.raises(ValueError, match=r"seg holds labels \[3\]"):
        score_components(mask_reward, volumes, None, torch.full((2, 1, 16, 16, 16), 3, dtype=torch.uint8))


def test_a_composite_passes_masks_only_to_the_components_that_read_them(segmenter_checkpoint: Path) -> None:
    continuity = InterSliceContinuityReward()  # its forward takes (volumes, labels): a reward written before masks
    mask_reward = MaskFidelityReward(str(segmenter_checkpoint))
    composite = MultiScaleReward([continuity, mask_reward], weights=[1.0, 2.0], normalise=False)
    volumes, masks = torch.rand(3, 1, 16, 16, 16) * 2 - 1, _masks(3)
    total, components = score_components(composite, volumes, None, masks)
    alone, _ = score_components(mask_reward, volumes, None, masks)
    torch.testing.assert_close(components["mask_fidelity"], alone)
    torch.testing.assert_close(components["continuity"], continuity(volumes))
    torch.testing.assert_close(total, components["continuity"] + 2 * alone)
    raw = raw_reward_scores(composite, volumes, None, masks)
    torch.testing.assert_close(raw["total"], total)
    plain, _ = score_components(continuity, volumes, None)  # masks are optional for a reward that does not read them
    torch.testing.assert_close(plain, components["continuity"])


def test_the_segmenter_is_recorded_and_is_not_the_evaluations(segmenter_checkpoint: Path) -> None:
    from monai.networks.nets import SegResNet, UNet

    reward = MultiScaleReward([InterSliceContinuityReward(), MaskFidelityReward(str(segmenter_checkpoint))])
    assert reward_networks(reward) == [{"component": "mask_fidelity", "path": str(segmenter_checkpoint),
                                        "sha256": sha256_of(segmenter_checkpoint)}]
    network = reward.components[1].segmenter.network
    assert isinstance(network, UNet) and not any(isinstance(m, SegResNet) for m in reward.modules())
    with pytest.raises(ValueError, match=r"needs `checkpoint`, a network trained by `msrl train-reward -c "
                                         r"configs/rewards/segmenter.yaml`"):
        MaskFidelityReward(None)
