"""Rebuild the reward a fine-tuned checkpoint records, checking that its networks are the same files.

A PPO checkpoint holds `msrl_reward` = {"config": the reward's {class_path, init_args} as configured,
"networks": [{component, path, sha256}, …]} (`PPOFinetuneModule.on_save_checkpoint`). Evaluation
rebuilds that reward to score samples with raw values (`raw_reward_scores`), and must refuse a
network file that is missing or has changed since the run, or it would score against another reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from torch import nn

from datamodules.digest import sha256_of
from lightning_modules.finetune.reward import REWARD_KEY, reward_networks

__all__ = ["check_network_files", "check_reward_networks", "reward_from_checkpoint", "reward_from_config",
           "reward_networks"]


def reward_from_config(config: dict[str, Any], networks: list[dict[str, str]] | None = None) -> nn.Module:
    """Build a reward from its {class_path, init_args} config (any `torch.nn.Module`, as `model.reward`).

    Args:
        config: the reward's config, e.g. a checkpoint's `msrl_reward["config"]`.
        networks: the networks recorded with it (`msrl_reward["networks"]`): each file must exist and
            have the recorded SHA-256 before anything is built, and the rebuilt reward must load exactly
            these. None: no check.

    Returns:
        The reward, frozen and in eval mode (its normalisation statistics are empty: score it with
        `raw_reward_scores`).
    """
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"a reward config must be a dict with class_path (and init_args), got {config!r}")
    if networks is not None:
        check_network_files(networks)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=nn.Module, required=True)
    try:
        reward = parser.instantiate_classes(parser.parse_object({"reward": config})).reward
    except Exception as exc:  # jsonargparse wraps the constructor's error; say which config failed
        raise ValueError(f"could not build the reward {config.get('class_path')!r} from its config: {exc}") from exc
    if networks is not None:
        check_reward_networks(networks, reward_networks(reward))
    return reward.requires_grad_(False).eval()


def reward_from_checkpoint(checkpoint: dict[str, Any], path: str | Path = "the checkpoint") -> nn.Module:
    """The reward a fine-tuned checkpoint (loaded dict) was trained against, its networks checked."""
    record = checkpoint.get(REWARD_KEY)
    if record is None:
        raise ValueError(f"{path} records no reward (`msrl_reward`): it is not a fine-tuned checkpoint, or was "
                         "written before msrl recorded rewards; pass the reward's config instead")
    if record.get("config") is None:
        raise ValueError(f"{path} records no reward config: its PPO module was built in Python, not by "
                         "`msrl finetune`; pass the reward's config instead")
    return reward_from_config(record["config"], record.get("networks", []))


def check_network_files(networks: list[dict[str, str]]) -> None:
    """Every recorded network file exists and has its recorded SHA-256 (else a ValueError naming it)."""
    for network in networks:
        path, where = Path(network["path"]), f"reward component {network['component']!r}"
        if not path.is_file():
            raise ValueError(f"{where} was trained with the network {path}, which does not exist (from "
                             f"{Path.cwd()}); restore it, or run from the directory the fine-tuning ran in")
        digest = sha256_of(path)
        if digest != network["sha256"]:
            raise ValueError(f"{where}: the network {path} has changed since fine-tuning (SHA-256 {digest}, "
                             f"recorded {network['sha256']}); the rebuilt reward would not be the one trained against")


def check_reward_networks(recorded: list[dict[str, str]], rebuilt: list[dict[str, str]]) -> None:
    """The rebuilt reward loads the recorded networks: same components, paths and SHA-256 digests."""
    def key(entries: list[dict[str, str]]) -> list[tuple[str, str]]:
        return [(e["component"], e["path"]) for e in entries]

    if key(recorded) != key(rebuilt):
        raise ValueError(f"the rebuilt reward loads networks {key(rebuilt)}, the checkpoint recorded {key(recorded)}")
    for old, new in zip(recorded, rebuilt, strict=True):
        if old["sha256"] != new["sha256"]:
            raise ValueError(f"reward component {old['component']!r}: the network {old['path']} has SHA-256 "
                             f"{new['sha256']}, recorded {old['sha256']} (the file changed since fine-tuning)")
