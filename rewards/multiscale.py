"""`MultiScaleReward`: named reward components, each normalised, combined with weights.

PPO trains on the normalised total; whether the reward rose is read from the raw scores
(`raw_scores`: each component's own value and Σ_k w_k · r_k), which no statistics move. Lesion masks,
where given, reach the components that read them (`needs_masks`, e.g. `MaskFidelityReward`) and no other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_modules.finetune.reward import RAW_TOTAL, Reward, score_components
from lightning_modules.finetune.running import RunningMoments


class MultiScaleReward(Reward):
    """Weighted sum of normalised reward components (2D slice-wise, 3D volumetric, rule-based, …).

    Each component is standardised by a running mean and std of its own values (updated in
    training mode, stored in buffers and checkpoints), so that a weight means what it says whatever
    the component's scale: total = Σ_k w_k · (r_k − mean_k) / std_k.

    Args:
        components: reward modules; each is logged under its `name` (its class name if it has none).
        weights: one weight per component (None: all 1).
        normalise: standardise the components (False: plain weighted sum of raw values).
        momentum: weight of a new batch in the running statistics.
        track_statistics: update the statistics on every call (set False to freeze them).
        freeze_after: stop updating the statistics after this many batches (None: never). A component
            that saturates under PPO (the mask rule near its maximum) has a running std shrinking
            towards 0, which turns its noise into large advantages; scales frozen on the first
            policies' samples keep each weight meaning what it meant at the start.
        name: log key of the total.
    """

    def __init__(self, components: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 normalise: bool = True, momentum: float = 0.05, track_statistics: bool = True,
                 freeze_after: int | None = None, name: str = "multiscale") -> None:
        super().__init__(name)
        if not components:
            raise ValueError("MultiScaleReward needs at least one component")
        weights = list(weights) if weights is not None else [1.0] * len(components)
        if len(weights) != len(components):
            raise ValueError(f"{len(components)} components but {len(weights)} weights")
        self.components = nn.ModuleList(components)
        self.names = [getattr(c, "name", type(c).__name__) for c in components]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"component names must be distinct (set `name`), got {self.names}")
        if RAW_TOTAL in self.names:
            raise ValueError(f"no component may be named {RAW_TOTAL!r}: ppo/reward_raw/{RAW_TOTAL} is the weighted "
                             f"raw sum; got {self.names}")
        self.weights = weights
        if freeze_after is not None and freeze_after < 1:
            raise ValueError(f"freeze_after must be >= 1 batches (or None: never freeze), got {freeze_after}")
        self.normalise, self.track_statistics, self.freeze_after = normalise, track_statistics, freeze_after
        self.running = RunningMoments(len(components), momentum)

    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None,
                masks: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted total [B]."""
        return self.score(volumes, labels, masks)[0]

    def score(self, volumes: torch.Tensor, labels: torch.Tensor | None = None, masks: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The normalised total [B] and every component's raw values ({name: [B]})."""
        raw = self._raw_components(volumes, labels, masks)
        stacked = torch.stack([raw[n] for n in self.names]).double()  # [K, B]
        if self.normalise:
            frozen = self.freeze_after is not None and int(self.running.count.min()) >= self.freeze_after
            if self.track_statistics and not frozen:  # PPO's rollouts move them; evaluation freezes them
                every = _gather_across_ranks(stacked)  # identical statistics, hence scales, on every rank
                for k in range(len(self.names)):
                    self.running.update(k, every[k].mean(), every[k].var(unbiased=False))
            elif int(self.running.count.min()) == 0:
                raise RuntimeError(f"{self.name}: no normalisation statistics yet; score with track_statistics first")
            stacked = (stacked - self.running.mean[:, None]) / (self.running.var[:, None].sqrt() + 1e-8)
        weights = torch.tensor(self.weights, dtype=torch.float64, device=stacked.device)
        total = (weights[:, None] * stacked).sum(0).float()
        return total, raw

    def raw_total(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_k w_k · r_k [B] of raw component values: it rises when the components do, whatever the statistics."""
        stacked = torch.stack([components[n] for n in self.names]).double()
        weights = torch.tensor(self.weights, dtype=torch.float64, device=stacked.device)
        return (weights[:, None] * stacked).sum(0).float()

    def raw_scores(self, volumes: torch.Tensor, labels: torch.Tensor | None = None,
                   masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every component's raw values and their weighted sum under "total" ({name: [B]}).

        The statistics are neither read nor updated: a freshly built reward scores like the trained one.
        """
        raw = self._raw_components(volumes, labels, masks)
        return {**raw, RAW_TOTAL: self.raw_total(raw)}

    def _raw_components(self, volumes: torch.Tensor, labels: torch.Tensor | None,
                        masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raw = {}
        for name, component in zip(self.names, self.components, strict=True):
            # checks shape and finiteness, by name; masks only reach the components that read them
            value, _ = score_components(component, volumes, labels, masks)
            raw[name] = value
        return raw


def _gather_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """[K, B] → [K, B·world]: every rank's values, when torch.distributed runs (else unchanged)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    parts = [torch.empty_like(values) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, values.contiguous())
    return torch.cat(parts, dim=1)
