"""A study's arms: what each fine-tunes with (the full reward's components, or its own reward) and what it is
compared with (the pretrained model, or its own baseline: a mask arm's ControlNet).

Reading an arm's `msrl finetune` configs (its fine-tuner's class, its ControlNet) and its reward
YAML lives here too; the plan (msrl/study/plan.py) checks the arms together and writes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.finetune import DEFAULT_FINETUNER

PRETRAINED = "pretrained"  # the baseline arm's name, in every unit's evaluation but a mask arm's
# an arm's own reward, baseline and evaluation: left out of study.json when unset, so that a study folder
# written before they existed still matches its plan
OWN_ARM_KEYS = ("reward", "baseline", "evaluate_config", "evaluate_args")


@dataclass(frozen=True)
class Arm:
    """One fine-tuned arm: a name, its reward and, where they differ from the plan's, its fine-tuner and evaluation.

    Args:
        name: the arm's name (its units' folder, its source name in the evaluation).
        components: the full reward's components it keeps (None: every component, unless `reward`).
        finetune_configs: its own `msrl finetune -c` files (None: the plan's shared ones).
        finetune_args: options appended after the plan's `finetune_args`.
        reward: its own reward YAML, used as is instead of the full reward's components (a mask arm's
            mask-fidelity reward); exclusive with `components`.
        baseline: {name, checkpoint}: the source its units are compared with instead of the pretrained
            model (a mask arm: the ControlNet it is fine-tuned under, e.g. name "controlnet").
        evaluate_config: its own `msrl evaluate -c` file (only with a `baseline`: the pretrained model's
            numbers pool over the other arms' units, so those are measured alike).
        evaluate_args: options appended after the plan's `evaluate_args` (only with a `baseline`).
    """

    name: str
    components: list[str] | None = None
    finetune_configs: list[str] | None = None
    finetune_args: list[str] = field(default_factory=list)
    reward: str | None = None
    baseline: dict[str, str] | None = None
    evaluate_config: str | None = None
    evaluate_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = f"arm {self.name!r}"
        if self.components is not None and self.reward is not None:
            raise ValueError(f"{where} has both components and reward: give components (a subset of the study's "
                             "reward) or reward (its own reward YAML, used as is), not both")
        if self.baseline is not None:
            if not isinstance(self.baseline, dict) or set(self.baseline) != {"name", "checkpoint"} or not all(
                    isinstance(v, str) and v for v in self.baseline.values()):
                raise ValueError(f"{where}: baseline must be {{name: NAME, checkpoint: PATH}} (e.g. name controlnet "
                                 f"and the ControlNet checkpoint), got {self.baseline!r}")
            if self.baseline["name"] in (PRETRAINED, self.name):
                raise ValueError(f"{where}: baseline name {self.baseline['name']!r} must differ from {PRETRAINED!r} "
                                 "and from the arm's name (both are source names in its evaluation)")
        own = [key for key in ("evaluate_config", "evaluate_args") if getattr(self, key)]
        if own and self.baseline is None:
            raise ValueError(f"{where}: {own[0]} needs a baseline: an arm compared with the pretrained model is "
                             "evaluated as every other (its pretrained numbers pool over their units)")

    @property
    def baseline_name(self) -> str:
        """The source its units are compared with: its baseline's name, else the pretrained model."""
        return PRETRAINED if self.baseline is None else self.baseline["name"]


def arm_files(arm: Arm) -> list[tuple[str, str]]:
    """(key, path) of every file an arm names itself: finetune configs, own reward, baseline, evaluate config."""
    files = [("finetune_configs", p) for p in arm.finetune_configs or []]
    files += [("reward", arm.reward)] if arm.reward else []
    files += [("baseline.checkpoint", arm.baseline["checkpoint"])] if arm.baseline else []
    return files + ([("evaluate_config", arm.evaluate_config)] if arm.evaluate_config else [])


def finetune_model(configs: list[str], args: list[str]) -> str:
    """The class `msrl finetune` builds from these configs and options: the last `model.class_path` given
    (a later -c file or option overrides an earlier one, as jsonargparse reads them), else PPO."""
    return finetune_setting(configs, args, "class_path") or DEFAULT_FINETUNER


def finetune_setting(configs: list[str], args: list[str], key: str) -> str | None:
    """The last value of `model.<key>` (or `model.init_args.<key>`) these configs and options give, as jsonargparse
    reads them (a later -c file or option overrides an earlier one); None where none sets it."""
    found = None
    for path in configs:
        config = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict):
            for level in (model, model.get("init_args")):
                if isinstance(level, dict) and key in level:
                    found = level[key]
    options = {f"--model.{key}", f"--model.init_args.{key}"}
    for index, option in enumerate(args):
        flag, equals, inline = option.partition("=")
        if flag in options:
            found = inline if equals else (args[index + 1] if index + 1 < len(args) else None)
    return found if isinstance(found, str) else None


def read_reward(path: str) -> dict[str, Any]:
    """A reward YAML as a dict ({class_path, init_args})."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict) or "init_args" not in config:
        raise ValueError(f"{path}: expected a reward config with class_path and init_args")
    return config


def component_names(config: dict[str, Any], path: str) -> list[str]:
    """The names of a MultiScaleReward config's components (each component's init_args.name)."""
    components = config["init_args"].get("components")
    if not isinstance(components, list):
        raise ValueError(f"{path}: a study needs a MultiScaleReward with a list of named components")
    names = [(c.get("init_args") or {}).get("name") for c in components]
    if None in names:
        raise ValueError(f"{path}: every component needs init_args.name (the arms select components by it)")
    return names


def arm_reward(config: dict[str, Any], arm: Arm, path: str) -> dict[str, Any]:
    """The arm's reward: the full reward with only the arm's components and their weights; the rest unchanged."""
    names = component_names(config, path)
    keep = [i for i, n in enumerate(names) if arm.components is None or n in arm.components]
    result = copy.deepcopy(config)
    init = result["init_args"]
    init["components"] = [init["components"][i] for i in keep]
    if init.get("weights") is not None:
        init["weights"] = [init["weights"][i] for i in keep]
    init["name"] = arm.name
    return result
