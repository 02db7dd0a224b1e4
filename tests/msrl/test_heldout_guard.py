"""The reward-hacking guard: the stopping rule, independence from the reward.

Its run inside PPO (ppo/heldout_fid at iterations 0, 1 and every k; raw rewards) is tested with the
rest of PPO's logs in tests/lightning_modules/test_ppo_provenance.py.
"""

from pathlib import Path

import pytest
import torch

from datamodules import TemplateCohortDataModule
from msrl.evaluation import MedicalNetExtractor
from msrl.evaluation.heldout_guard import HeldoutFIDGuard, refuse_shared_networks


def _guard(cache: Path | str, **kwargs: object) -> HeldoutFIDGuard:
    data = TemplateCohortDataModule(num_subjects=8, spatial_size=16, cache_dir=cache, val_fraction=0.25)
    return HeldoutFIDGuard(data, MedicalNetExtractor(depth=10), **kwargs)


@pytest.mark.parametrize("history, expected", [
    ([(1, 1.0, 0.1), (2, 1.1, 0.2), (3, 1.2, 0.3)], True),    # FID worse twice in a row, reward up: hacking
    ([(1, 1.0, 0.1), (2, 1.1, 0.2), (3, 1.05, 0.3)], False),  # FID recovered
    ([(1, 1.0, 0.3), (2, 1.1, 0.2), (3, 1.2, 0.1)], False),   # reward fell too: the policy is just getting worse
    ([(1, 1.0, 0.1), (2, 1.1, 0.2)], False),                  # not enough evaluations yet
])
def test_stopping_rule(history: list[tuple[int, float, float]], expected: bool) -> None:
    guard = _guard("unused", patience=2)
    guard.history = history
    assert guard.hacking() is expected
    restored = _guard("unused", patience=2)
    restored.load_state_dict(guard.state_dict())
    assert restored.history == history


def test_an_extractor_sharing_the_rewards_network_is_refused() -> None:
    extractor = MedicalNetExtractor(depth=10)
    reward = torch.nn.Sequential(torch.nn.Linear(3, 3), extractor.network.layer1)  # the same weights inside
    with pytest.raises(ValueError, match="shares weights with the reward"):
        refuse_shared_networks(extractor, reward)
    refuse_shared_networks(extractor, torch.nn.Sequential(torch.nn.Conv3d(64, 64, 3)))  # different weights: fine
