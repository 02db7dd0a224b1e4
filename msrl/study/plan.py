"""The plan of a study: arms × seeds, each arm's reward and fine-tuner, and where every unit's outputs live.

An *arm* is a fine-tuning run (PPO or reward backpropagation, chosen by its `msrl finetune` configs'
`model.class_path`) with a subset of the full reward's named components, with the full reward's
weights and settings. Arms of one algorithm differ only in the reward; an arm with its own
`finetune_configs` compares algorithms. A *unit* is one arm at one seed: a fine-tuning run from the one
pretrained checkpoint, then an evaluation of that checkpoint against the pretrained model with the
same sampling seeds (paired). The pretrained model itself is the arm "pretrained": the
baseline in every unit's evaluation, never fine-tuned.

A *mask arm* fine-tunes under a frozen ControlNet of the pretrained model (its finetune configs set
`model.controlnet_checkpoint`) with its own reward YAML, used as is (`reward`: the mask-fidelity
reward is no subset of the full reward). Its `baseline` is that ControlNet ({name, checkpoint}), not
the plain pretrained model, and its own `evaluate_config` (one with `segmentation:`) measures mask
fidelity paired per volume against it: both draw from the same held-out masks with the same seeds.

Folder layout of a study (`DIR`; msrl/study/aggregate.py reads it):

    DIR/study.json                              this plan (arms, seeds, inputs), written once
    DIR/arms/<arm>/reward.yaml                  the arm's reward: the full reward's selected components (or the
                                                arm's own reward YAML, copied as is)
    DIR/units/<arm>/seed_<s>/finetune/version_0 the fine-tuning run (TensorBoard events, checkpoints/last.ckpt)
    DIR/units/<arm>/seed_<s>/evaluation/        `msrl evaluate` output, sources "pretrained" (a mask arm: its
                                                baseline's name) and "<arm>"
    DIR/units/<arm>/seed_<s>/unit.json          written last: the unit has finished (never recomputed)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datamodules.atomic import atomic_write_text
from msrl.study.arms import (
    OWN_ARM_KEYS,
    PRETRAINED,
    Arm,
    arm_files,
    arm_reward,
    component_names,
    finetune_model,
    finetune_setting,
    read_reward,
)

# the primary metric unless a study says otherwise: FID in the evaluation's first (in-domain) features, both
# classes pooled, at the sampler the fine-tuner trained (its DDIM steps and η)
PRIMARY = {"metric": "fid", "extractor": None, "class": "all", "sampler": "ddim20-eta1"}
# the pre-registered claims' roles (msrl/study/claims.py): the multi-scale arm, the single-scale arms it is
# compared with, and the other algorithm's multi-scale arm
CLAIM_ROLES = ("multiscale", "single_scale", "versus")


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
        self.check_baselines(names)
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
        own = [name for name in named if name is not None and self.arm(name).baseline is not None]
        if own:
            raise ValueError(f"claims name arms {own} with their own baseline: the claims are about arms compared "
                             "with the pretrained model (a mask arm's mask fidelity is reported on its own)")
        if self.claims.get("versus") is not None and self.claims.get("versus") == self.claims.get("multiscale"):
            raise ValueError("claims.versus must differ from claims.multiscale (it is the other algorithm's arm)")

    def check_baselines(self, names: list[str]) -> None:
        """Baselines are not arms, and one baseline name is one checkpoint (its rows pool over seeds by name)."""
        checkpoints: dict[str, str] = {}
        for arm in self.arms:
            if arm.baseline is None:
                continue
            name = arm.baseline["name"]
            if name in names:
                raise ValueError(f"arm {arm.name!r}: baseline name {name!r} is an arm's name (arms: {names})")
            if checkpoints.setdefault(name, arm.baseline["checkpoint"]) != arm.baseline["checkpoint"]:
                raise ValueError(f"arm {arm.name!r}: baseline {name!r} is {arm.baseline['checkpoint']}, another arm's "
                                 f"is {checkpoints[name]}: give different checkpoints different names")

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
        """Every input file exists, every arm's components are in the reward, every own reward is a reward config,
        and an arm fine-tuned under a ControlNet is compared with that ControlNet: fail before any compute."""
        for key, path in [("pretrained", self.pretrained), ("reward", self.reward),
                          ("evaluate_config", self.evaluate_config)] + [
                ("finetune_configs", p) for p in self.finetune_configs] + [
                (f"arms[{arm.name}].{key}", p) for arm in self.arms for key, p in arm_files(arm)]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"study key {key}: {path} does not exist")
        names = component_names(read_reward(self.reward), self.reward)
        for arm in self.arms:
            unknown = sorted(set(arm.components or []) - set(names))
            if unknown:
                raise ValueError(f"arm {arm.name!r}: components {unknown} are not in {self.reward} "
                                 f"(its components: {names})")
            if arm.reward is not None:
                read_reward(arm.reward)
            self.check_controlnet(arm)

    def check_controlnet(self, arm: Arm) -> None:
        """A mask arm's baseline is the ControlNet its fine-tuning runs under (same masks, same noise: paired)."""
        controlnet = finetune_setting(self.arm_finetune_configs(arm), [*self.finetune_args, *arm.finetune_args],
                                      "controlnet_checkpoint")
        if controlnet is None:
            return
        if arm.baseline is None:
            raise ValueError(f"arm {arm.name!r} fine-tunes under the ControlNet {controlnet} (model."
                             "controlnet_checkpoint): give it baseline: {name: controlnet, checkpoint: "
                             f"{controlnet}}} so it is compared with that ControlNet, not the plain pretrained model")
        if Path(controlnet).resolve() != Path(arm.baseline["checkpoint"]).resolve():
            raise ValueError(f"arm {arm.name!r}: fine-tunes under the ControlNet {controlnet}, but its baseline "
                             f"{arm.baseline['name']!r} is {arm.baseline['checkpoint']}: they must be the same file")

    def as_json(self) -> dict[str, Any]:
        """The plan as study.json stores it: each arm with the configs it runs and its fine-tuner's class."""
        arms = [{**{k: v for k, v in asdict(a).items() if k not in OWN_ARM_KEYS or v},
                 "finetune_configs": self.arm_finetune_configs(a),
                 "model": finetune_model(self.arm_finetune_configs(a), [*self.finetune_args, *a.finetune_args])}
                for a in self.arms]
        return {**asdict(self), "arms": arms}


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
        text = Path(arm.reward).read_text() if arm.reward is not None else yaml.safe_dump(  # its own: as is
            arm_reward(full, arm, plan.reward), sort_keys=False)
        atomic_write_text(text, folder / "reward.yaml")
    if not stored.is_file():
        atomic_write_text(json.dumps(plan.as_json(), indent=1), stored)
