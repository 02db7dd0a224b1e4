"""No circularity: the evaluation's networks share no weights with the reward that trained a model.

An extractor or utility classifier that is (or loads) a reward network measures how well the reward
was distilled into the samples, not their quality (docs/design.md §5). A fine-tuned checkpoint
records its reward's network files with their SHA-256; `msrl evaluate` refuses an extractor whose
weights file has one of those digests, or whose weight tensors appear in the rebuilt reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from datamodules.digest import sha256_of
from lightning_modules.finetune import REWARD_KEY
from msrl.evaluation.heldout_guard import refuse_shared_networks

WEIGHT_FILE_ATTRIBUTES = ("weights_path", "checkpoint_path")  # where extractors keep the file they loaded


def recorded_networks(metadata: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every reward network file recorded by the fine-tuned checkpoints: [{component, path, sha256, checkpoint}]."""
    networks = []
    for checkpoint, info in metadata.items():
        for network in (info.get(REWARD_KEY) or {}).get("networks", []):
            networks.append({**network, "checkpoint": checkpoint})
    return networks


def weight_files(module: nn.Module) -> list[str]:
    """The weights files an extractor (or any module) says it loaded."""
    files = [getattr(module, attribute, None) for attribute in WEIGHT_FILE_ATTRIBUTES]
    return [str(f) for f in files if f]


def refuse_shared_weights(extractors: Sequence[nn.Module], networks: list[dict[str, Any]],
                          reward: nn.Module | None) -> None:
    """Raise if an extractor's weights file is a reward network's file, or its tensors are in the reward."""
    digests = {network["sha256"]: network for network in networks if network.get("sha256")}
    for extractor in extractors:
        name = getattr(extractor, "name", type(extractor).__name__)
        for file in weight_files(extractor):
            if not Path(file).is_file():
                continue
            network = digests.get(sha256_of(file))
            if network is not None:
                raise ValueError(f"extractor {name} loads {file}, the network of the reward component "
                                 f"{network.get('component')!r} that fine-tuned {network['checkpoint']} "
                                 f"({network.get('path')}): the evaluation would measure the reward's own opinion; "
                                 "choose an extractor the reward does not use (e.g. msrl train-extractor)")
        if reward is not None:
            refuse_shared_networks(extractor, reward)
