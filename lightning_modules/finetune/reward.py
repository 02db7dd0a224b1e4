"""The reward contract (docs/design.md §4), raw scores, and the networks a reward was built from.

A reward is a `torch.nn.Module` mapping volumes `[B, C, D, H, W]` in [-1, 1] and class labels
`[B]` (or None) to one finite score per volume `[B]`, higher is better, on whatever device and dtype
the volumes have. Both fine-tuners call it: PPO under `no_grad` (one scalar per volume), reward
backpropagation with gradients, ascending ∂reward/∂volume (docs/design.md §3a). A reward says whether
that gradient exists (`differentiable`); `non_differentiable_parts` names the parts that do not, so a
configuration that backpropagates through them is refused before anything runs. Any module with that
`forward` plugs in through YAML `class_path` (a plain module counts as differentiable); subclassing
`Reward` only adds a `name`, per-component scores and the flag.

A reward may also read the lesion masks the volumes were drawn from (`masks` [B, 1, D, H, W] of BraTS
label codes, from a ControlNet-conditioned rollout): it says so with `needs_masks = True`, is then
called as `forward(volumes, labels, masks)`, and is refused without masks (`check_masks`). Every
other reward is called as before, `forward(volumes, labels)`, so rewards written before masks plug in
unchanged.

The total a reward returns may be normalised by statistics that move during training
(`rewards.MultiScaleReward`), so it cannot say whether the reward rose (docs/design.md §7). Raw
scores can: each component's own value and their weighted sum, `raw_reward_scores`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

REWARD_KEY = "msrl_reward"  # where a fine-tuned checkpoint records its reward's config and networks
RAW_TOTAL = "total"  # key of the weighted raw sum among raw scores (<prefix>/reward_raw/total)


class Reward(nn.Module, ABC):
    """Base class of msrl's rewards.

    Args:
        name: the key of this reward in logs (`<prefix>/reward/<name>`, `<prefix>/reward_raw/<name>`).

    Attributes:
        differentiable: whether the score's gradient with respect to the volumes means something
            (False for a rule that thresholds, counts or bins voxels: its gradient is 0 or absent).
        needs_masks: whether the score reads the lesion masks the volumes were drawn from (then
            `forward(volumes, labels, masks)`; else `forward(volumes, labels)`).
    """

    differentiable: bool = True
    needs_masks: bool = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    @abstractmethod
    def forward(self, volumes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [B] for volumes [B, C, D, H, W] in [-1, 1] and labels [B] (or None); a reward with
        `needs_masks` takes the masks [B, 1, D, H, W] as a third argument."""

    def score(self, volumes: torch.Tensor, labels: torch.Tensor | None = None, masks: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward [B] and its raw components ({name: [B]}; a plain reward is its own component)."""
        total = call_reward(self, volumes, labels, masks)
        return total, {self.name: total}

    def raw_total(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of raw components [B], as `score` returned them (a plain reward: its own value)."""
        if self.name not in components:
            raise NotImplementedError(f"{type(self).__name__} returns components {sorted(components)} but does not "
                                      "say how they add up: override `raw_total`")
        return components[self.name]

    def raw_scores(self, volumes: torch.Tensor, labels: torch.Tensor | None = None,
                   masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Raw values of every component and their weighted sum under "total" ({name: [B]}).

        Nothing the reward keeps (running statistics) changes; a composite overrides this to skip its
        normalisation.
        """
        _, components = self.score(volumes, labels, masks)
        return {**components, RAW_TOTAL: self.raw_total(components)}


def mask_reading_parts(reward: nn.Module) -> list[str]:
    """`name (Class)` of every part of a reward, itself included, that declares `needs_masks = True`."""
    return [f"{getattr(module, 'name', type(module).__name__)} ({type(module).__name__})"
            for module in reward.modules() if getattr(module, "needs_masks", False) is True]


def check_masks(reward: nn.Module, volumes: torch.Tensor, masks: torch.Tensor | None) -> None:
    """Refuse to score a reward that reads masks without them, or with masks that do not fit the volumes.

    Raises:
        ValueError: naming the parts that need masks and where masks come from.
    """
    needing = mask_reading_parts(reward)
    if not needing:
        return
    if masks is None:
        raise ValueError(f"reward parts {', '.join(needing)} score volumes against the lesion masks they were drawn "
                         "from, and none were given: fine-tune with a ControlNet conditioner (controlnet_checkpoint "
                         "and mask_data), or pass masks [B, 1, D, H, W] to score(volumes, labels, masks)")
    expected = (volumes.shape[0], 1, *volumes.shape[2:])
    if tuple(masks.shape) != expected:
        raise ValueError(f"masks must be label maps {expected} for volumes {tuple(volumes.shape)}, got "
                         f"{tuple(masks.shape)}")


def call_reward(reward: nn.Module, volumes: torch.Tensor, labels: torch.Tensor | None,
                masks: torch.Tensor | None) -> torch.Tensor:
    """`reward(volumes, labels, masks)` for a reward that reads masks (checked), `reward(volumes, labels)` else."""
    if getattr(reward, "needs_masks", False) is True:
        check_masks(reward, volumes, masks)
        return reward(volumes, labels, masks)
    return reward(volumes, labels)


def score_components(reward: nn.Module, volumes: torch.Tensor, labels: torch.Tensor | None,
                     masks: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Call any reward module and check what it returns: finite float [B], named components.

    Modules that are not `Reward`s (a user's own `nn.Module`) are named after their class. `masks`
    [B, 1, D, H, W] reach the parts that declare `needs_masks`; without them such a reward is refused.
    """
    check_masks(reward, volumes, masks)
    if hasattr(reward, "score"):
        total, components = (reward.score(volumes, labels, masks) if mask_reading_parts(reward)
                             else reward.score(volumes, labels))
    else:
        total = call_reward(reward, volumes, labels, masks)
        components = {getattr(reward, "name", type(reward).__name__): total}
    _check_scores(reward, volumes.shape[0], {getattr(reward, "name", type(reward).__name__): total, **components})
    return total.float(), {key: value.float() for key, value in components.items()}


def raw_total_of(reward: nn.Module, total: torch.Tensor, components: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weighted raw sum [B] of a batch `score_components` scored (a module without `raw_total`: its total)."""
    return reward.raw_total(components).float() if hasattr(reward, "raw_total") else total


@torch.no_grad()
def raw_reward_scores(reward: nn.Module, volumes: torch.Tensor, labels: torch.Tensor | None,
                      masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Raw values [B] of each component of any reward module, and their weighted sum under "total".

    For evaluation: no normalisation statistics are read or updated, so a freshly built
    `MultiScaleReward` scores like the one PPO trained against. A module without `raw_scores`
    (a user's own `nn.Module`) is its own single component. `masks` as for `score_components`.
    """
    check_masks(reward, volumes, masks)
    if hasattr(reward, "raw_scores"):
        scores = dict(reward.raw_scores(volumes, labels, masks) if mask_reading_parts(reward)
                      else reward.raw_scores(volumes, labels))
    else:
        total, components = score_components(reward, volumes, labels, masks)
        scores = {**components, RAW_TOTAL: total}
    if RAW_TOTAL not in scores:
        raise ValueError(f"raw_scores of {type(reward).__name__} returned {sorted(scores)} without {RAW_TOTAL!r}")
    _check_scores(reward, volumes.shape[0], scores)
    return {key: value.float() for key, value in scores.items()}


def _check_scores(reward: nn.Module, batch: int, scores: dict[str, Any]) -> None:
    """Every score is a finite tensor [batch]; errors name the component and the samples."""
    name = getattr(reward, "name", type(reward).__name__)
    for key, value in scores.items():
        if not torch.is_tensor(value) or value.shape != (batch,):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"reward {name} returned {shape} for {key}, expected a tensor of shape ({batch},)")
        if not torch.isfinite(value).all():
            samples = torch.nonzero(~torch.isfinite(value)).flatten().tolist()
            raise FloatingPointError(f"reward component {key} returned non-finite values for samples {samples} "
                                     f"of this batch: {value.tolist()}")


def non_differentiable_parts(reward: nn.Module) -> list[str]:
    """`name (Class)` of every part of a reward, itself included, that declares `differentiable = False`."""
    return [f"{getattr(module, 'name', type(module).__name__)} ({type(module).__name__})"
            for module in reward.modules() if getattr(module, "differentiable", True) is False]


def reward_networks(reward: nn.Module) -> list[dict[str, str]]:
    """The trained networks inside a reward: [{"component", "path", "sha256"}, …] in module order.

    A network is any submodule loaded by `RewardNetworkModule.load_for_reward` (it carries
    `source_path` and `source_sha256`); its component is the `name` of the closest reward around it.
    """
    found: list[dict[str, str]] = []

    def walk(module: nn.Module, component: str) -> None:
        name = getattr(module, "name", None)
        component = name if isinstance(name, str) else component
        if isinstance(getattr(module, "source_sha256", None), str):
            found.append({"component": component, "path": str(module.source_path), "sha256": module.source_sha256})
            return
        for child in module.children():
            walk(child, component)

    walk(reward, type(reward).__name__)
    return found
