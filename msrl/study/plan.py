"""The plan of a study: arms × seeds, each arm's reward and fine-tuner, and where every unit's outputs live.

An *arm* is a fine-tuning run (PPO or reward backpropagation, chosen by its `msrl finetune` configs'
`model.class_path`) with a subset of the full reward's named components, with the full reward's
weights and settings. Arms of one algorithm differ only in the reward; an arm with its own
`finetune_configs` compares algorithms. A *unit* is one arm at one seed: a fine-tuning run from the one
pretrained checkpoint, then an evaluation of that checkpoint against the pretrained model with the
same sampling seeds (paired). The pretrained model itself is the arm "pretrained": the
baseline in every unit's evaluation, never fine-tuned.

Folder layout of a study (`DIR`; msrl/study/aggregate.py reads it):

    DIR/study.json                              this plan (arms, seeds, inputs), written once
    DIR/arms/<arm>/reward.yaml                  the arm's reward: the full reward's selected components
    DIR/units/<arm>/seed_<s>/finetune/version_0 the fine-tuning run (TensorBoard events, checkpoints/last.ckpt)
    DIR/units/<arm>/seed_<s>/evaluation/        `msrl evaluate` output, sources "pretrained" and "<arm>"
    DIR/units/<arm>/seed_<s>/unit.json          written last: the unit has finished (never recomputed)
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamodules.atomic import atomic_write_text
from lightning_modules.finetune import DEFAULT_FINETUNER

PRETRAINED = "pretrained"  # the baseline arm's name, in every unit's evaluation
# the primary metric unless a study says otherwise: FID in the evaluation's first (in-domain) features, both
# classes pooled, at the sampler the fine-tuner trained (its DDIM steps and η)
PRIMARY = {"metric": "fid", "extractor": None, "class": "all", "sampler": "ddim20-eta1"}
# the pre-registered claims' roles (msrl/study/claims.py): the multi-scale arm, the single-scale arms it is
# compared with, and the other algorithm's multi-scale arm
CLAIM_ROLES = ("multiscale", "single_scale", "versus")


@dataclass(frozen=True)
class Arm:
    """One fine-tuned arm: a name, the full reward's components it keeps (None: every component), and,
    where it differs from the plan's, its own fine-tuner (`finetune_configs` None: the plan's shared ones;
    `finetune_args` are appended after the plan's)."""

    name: str
    components: list[str] | None = None
    finetune_configs: list[str] | None = None
    finetune_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unit:
    """One arm at one seed, and the folder of its outputs."""

    arm: str
    seed: int
    folder: Path

    @property
    def finished(self) -> bool:
        """unit.json is written last, atomically: present means fine-tuning and evaluation are complete."""
        return (self.folder / "unit.json").is_file()

    @property
    def run_folder(self) -> Path:
        """The fine-tuning run's TensorBoard folder (version fixed to 0 so a requeued job resumes into it)."""
        return self.folder / "finetune" / "version_0"

    @property
    def checkpoint(self) -> Path:
        """The fine-tuning run's last checkpoint (written every epoch: a requeued job resumes from it)."""
        return self.run_folder / "checkpoints" / "last.ckpt"

    @property
    def evaluation(self) -> Path:
        """The evaluation's output folder (metrics.json, metrics.md, the evaluated volumes)."""
        return self.folder / "evaluation"


@dataclass
class StudyPlan:
    """Everything that defines a study; `study.json` stores it and a rerun must match it.

    Args:
        pretrained: the one pretrained checkpoint every arm starts from (and the baseline).
        reward: the full reward's YAML (`class_path: rewards.MultiScaleReward`, named components).
        arms: the fine-tuned arms (the pretrained arm is implicit).
        seeds: study seeds; seed s sets the fine-tuner's seeds and the evaluation's sampling seed.
        finetune_configs: `msrl finetune -c` files of every arm that names none of its own.
        finetune_args: further `msrl finetune` options shared by every arm (before the arm's own).
        evaluate_config: `msrl evaluate -c` file (decided before any tuning; reads the test split).
        evaluate_args: further `msrl evaluate` options.
        evaluation_seed: the evaluation's sampling seed at study seed 0 (seed s uses this + s).
        primary: the pre-registered primary metric: {metric, extractor (None: the evaluation's first),
            class ("all" or a label), sampler (a sampler name of metrics.json, e.g. "ddim20-eta1")}.
        claims: the pre-registered claims' arms {multiscale: ARM, single_scale: [ARM, …], versus: ARM}
            (each optional; msrl/study/claims.py guesses multiscale and single_scale from the components).
    """

    pretrained: str
    reward: str
    arms: list[Arm]
    seeds: list[int]
    finetune_configs: list[str]
    evaluate_config: str
    finetune_args: list[str] = field(default_factory=list)
    evaluate_args: list[str] = field(default_factory=list)
    evaluation_seed: int = 1234
    primary: dict[str, Any] = field(default_factory=lambda: dict(PRIMARY))
    claims: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.arms = [a if isinstance(a, Arm) else Arm(**a) for a in self.arms]
        names = [a.name for a in self.arms]
        if not names:
            raise ValueError("a study needs at least one arm (arms: [{name: …, components: […]}])")
        if len(set(names)) != len(names) or PRETRAINED in names:
            raise ValueError(f"arm names must be distinct and not {PRETRAINED!r} (the baseline), got {names}")
        unknown = sorted(set(self.primary) - set(PRIMARY))
        if unknown:
            raise ValueError(f"primary: unknown keys {unknown}; expected {sorted(PRIMARY)}")
        self.primary = {**PRIMARY, **self.primary}
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        self.check_claims(names)

    def check_claims(self, names: list[str]) -> None:
        """The claims name known roles and existing arms (a typo would silently leave a claim undecided)."""
        unknown = sorted(set(self.claims) - set(CLAIM_ROLES))
        if unknown:
            raise ValueError(f"claims: unknown keys {unknown}; expected some of {list(CLAIM_ROLES)}")
        single = self.claims.get("single_scale", [])
        if not isinstance(single, list):
            raise ValueError(f"claims.single_scale must be a list of arm names, got {single!r}")
        named = [self.claims.get("multiscale"), *single, self.claims.get("versus")]
        missing = [name for name in named if name is not None and name not in names]
        if missing:
            raise ValueError(f"claims name arms {missing} that the plan does not have (arms: {names})")
        if self.claims.get("versus") is not None and self.claims.get("versus") == self.claims.get("multiscale"):
            raise ValueError("claims.versus must differ from claims.multiscale (it is the other algorithm's arm)")

    def arm(self, name: str) -> Arm:
        """The arm called `name`."""
        return next(arm for arm in self.arms if arm.name == name)

    def arm_finetune_configs(self, arm: Arm) -> list[str]:
        """The `msrl finetune -c` files of an arm: its own, else the plan's shared ones."""
        return self.finetune_configs if arm.finetune_configs is None else arm.finetune_configs

    def units(self, out: Path) -> list[Unit]:
        """Every arm × seed, arm-major (the SLURM array index is the position in this list)."""
        return [Unit(arm.name, seed, out / "units" / arm.name / f"seed_{seed}") for arm in self.arms
                for seed in self.seeds]

    def check_inputs(self) -> None:
        """Every input file exists and every arm's components are in the reward: fail before any compute."""
        for key, path in [("pretrained", self.pretrained), ("reward", self.reward),
                          ("evaluate_config", self.evaluate_config)] + [
                ("finetune_configs", p) for p in self.finetune_configs] + [
                (f"arms[{arm.name}].finetune_configs", p) for arm in self.arms for p in arm.finetune_configs or []]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"study key {key}: {path} does not exist")
        names = component_names(read_reward(self.reward), self.reward)
        for arm in self.arms:
            unknown = sorted(set(arm.components or []) - set(names))
            if unknown:
                raise ValueError(f"arm {arm.name!r}: components {unknown} are not in {self.reward} "
                                 f"(its components: {names})")

    def as_json(self) -> dict[str, Any]:
        """The plan as study.json stores it: each arm with the configs it runs and its fine-tuner's class."""
        arms = [{**asdict(a), "finetune_configs": self.arm_finetune_configs(a),
                 "model": finetune_model(self.arm_finetune_configs(a), [*self.finetune_args, *a.finetune_args])}
                for a in self.arms]
        return {**asdict(self), "arms": arms}


def finetune_model(configs: list[str], args: list[str]) -> str:
    """The class `msrl finetune` builds from these configs and options: the last `model.class_path` given
    (a later -c file or option overrides an earlier one, as jsonargparse reads them), else PPO."""
    found = DEFAULT_FINETUNER
    for path in configs:
        config = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict) and isinstance(model.get("class_path"), str):
            found = model["class_path"]
    for option, value in zip(args, args[1:], strict=False):
        if option == "--model.class_path":
            found = value
    return found


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


def write_plan(plan: StudyPlan, out: Path) -> None:
    """Write study.json and every arm's reward.yaml; a folder holding a different study is refused."""
    stored = out / "study.json"
    if stored.is_file():
        previous = json.loads(stored.read_text())
        if previous != plan.as_json():
            changed = sorted(k for k in plan.as_json() if previous.get(k) != plan.as_json()[k])
            raise ValueError(f"{stored} holds a different study (keys {changed} differ): finished units would "
                             "mix two plans; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    full = read_reward(plan.reward)
    for arm in plan.arms:
        folder = out / "arms" / arm.name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(arm_reward(full, arm, plan.reward), sort_keys=False),
                          folder / "reward.yaml")
    if not stored.is_file():
        atomic_write_text(json.dumps(plan.as_json(), indent=1), stored)
