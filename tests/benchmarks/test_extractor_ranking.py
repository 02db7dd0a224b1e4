"""The ranking check of benchmarks/extractor_ranking.py: Spearman ρ, degradations, the table (16³, tiny network)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.extractor_ranking import DEGRADATIONS, degrade, markdown, ranking, spearman
from msrl.evaluation import FeatureExtractor


class TinyExtractor(FeatureExtractor):
    """A seeded random 3D conv layer, mean- and max-pooled: features in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 8, 3, stride=2)

    @property
    def name(self) -> str:
        return "tiny-random"

    def forward(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.conv(volumes).relu().flatten(2)
        return {"3d": torch.cat([features.mean(2), features.amax(2)], dim=1)}


def test_spearman_is_one_in_order_minus_one_reversed_and_counts_swaps() -> None:
    strengths = [0.0, 0.5, 1.0, 1.5, 2.0]
    assert spearman(strengths, [1.0, 2.0, 4.0, 8.0, 9.0]) == pytest.approx(1.0)
    assert spearman(strengths, [9.0, 8.0, 4.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman(strengths, [1.0, 4.0, 2.0, 8.0, 9.0]) == pytest.approx(0.9)  # one neighbour swap: 1 - 6·2/120


def _brains(count: int, seed: int) -> torch.Tensor:
    """Smooth blobs in a -1 background, [count, 1, 16, 16, 16]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 4, 4, 4, generator=generator)
    inside = torch.nn.functional.interpolate(coarse, size=(10, 10, 10), mode="trilinear") * 1.6 - 0.8
    volumes = -torch.ones(count, 1, 16, 16, 16)
    volumes[:, :, 3:13, 3:13, 3:13] = inside
    return volumes


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_every_degradation_is_deterministic_and_zero_strength_is_the_identity(name: str) -> None:
    strengths, function = DEGRADATIONS[name]
    volumes = _brains(2, 0)
    assert len(strengths) >= 5 and list(strengths) == sorted(strengths) and strengths[0] == 0
    torch.testing.assert_close(degrade(volumes, function, 0.0), volumes)
    strong = degrade(volumes, function, strengths[-1])
    assert torch.equal(strong, degrade(volumes, function, strengths[-1])) and strong.abs().max() <= 1
    mild, stronger = (degrade(volumes, function, s).sub(volumes).abs().mean() for s in (strengths[1], strengths[-1]))
    assert 0 < mild < stronger


def test_ranking_reports_rho_and_fids_per_degradation_and_extractor() -> None:
    extractor = TinyExtractor()
    chosen = {name: DEGRADATIONS[name] for name in ("noise", "blur")}
    results = ranking([extractor], _brains(6, 1), _brains(6, 2), chosen)
    assert set(results) == {"noise", "blur"}
    noise = results["noise"][extractor.name]
    assert len(noise["fid"]) == len(chosen["noise"][0]) and noise["rho"] == pytest.approx(spearman(
        chosen["noise"][0], noise["fid"]))
    assert noise["fid"][-1] > noise["fid"][0]  # strong noise moves the features
    table = markdown(results)
    assert table.count("\n") == 3 and f"| {extractor.name} |" in table.splitlines()[0] and "ρ = " in table
