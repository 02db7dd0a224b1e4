"""`msrl study`: the paper's experiment — fine-tuning arms (PPO or reward backpropagation) that differ in the reward
or the algorithm, over seeds, each evaluated paired against the pretrained model (a mask arm: against its
ControlNet) — then results.md/.json and figures over whatever has finished, with the pre-registered claims decided.

On a workstation every unit runs one after another; on a cluster `scripts/slurm/study.sbatch` runs one
unit per array task (`--unit $SLURM_ARRAY_TASK_ID`) and a last `--aggregate-only` writes the results.
The evaluation config is fixed before any tuning (README, "Does it work?").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser

from msrl.commands.parsing import command_parser
from msrl.study.aggregate import write_study_results
from msrl.study.arms import Arm
from msrl.study.plan import PRIMARY, StudyPlan, write_plan
from msrl.study.runner import run_units


def build_parser() -> ArgumentParser:
    """Options of `msrl study` (a study YAML given with -c holds the plan)."""
    parser = command_parser("msrl study", "Arms x seeds: fine-tuning runs and paired evaluations.")
    parser.add_argument("--pretrained", type=str, required=True, help="the pretrained checkpoint every arm starts from")
    parser.add_argument("--reward", type=str, required=True, help="the full reward YAML (named components)")
    parser.add_argument("--arms", type=list[Arm], required=True,
                        help="[{name, components, finetune_configs, finetune_args}]: the reward components each arm "
                        "keeps (null: all), its own msrl finetune -c files (null: the shared ones) and options; a "
                        "mask arm has reward (its own YAML) instead of components, and baseline {name, checkpoint} "
                        "(its ControlNet), evaluate_config and evaluate_args of its own")
    parser.add_argument("--seeds", type=list[int], default=[0, 1, 2],
                        help="study seeds (fine-tuning and evaluation)")
    parser.add_argument("--finetune-configs", "--finetune_configs", type=list[str], required=True,
                        help="msrl finetune -c files of every arm that names none of its own")
    parser.add_argument("--finetune-args", "--finetune_args", type=list[str], default=[],
                        help="further msrl finetune options shared by every arm (before the arm's own)")
    parser.add_argument("--evaluate-config", "--evaluate_config", type=str, required=True,
                        help="msrl evaluate -c file (fixed before any tuning)")
    parser.add_argument("--evaluate-args", "--evaluate_args", type=list[str], default=[],
                        help="further msrl evaluate options")
    parser.add_argument("--evaluation-seed", "--evaluation_seed", type=int, default=1234,
                        help="the evaluation's sampling seed at study seed 0 (seed s: this + s)")
    parser.add_argument("--primary", type=dict[str, Any], default=dict(PRIMARY),
                        help="the pre-registered primary metric {metric, extractor, class, sampler}")
    parser.add_argument("--claims", type=dict[str, Any], default={},
                        help="the pre-registered claims' arms {multiscale: ARM, single_scale: [ARM, ...], versus: ARM}")
    parser.add_argument("--out", type=str, required=True, help="the study folder (units/, results.md, figures/)")
    parser.add_argument("--unit", type=int | None, default=None,
                        help="run only this unit (0-based, arm-major; a SLURM array task id), no results")
    # Switches: `--list` alone or `--list true|false` (likewise --aggregate-only).
    parser.add_argument("--aggregate-only", "--aggregate_only", action=ActionYesNo, nargs="?", default=False,
                        help="run nothing: write results.md/.json and figures from the finished units")
    parser.add_argument("--jobs", type=int, default=1,
                        help="units run side by side, the cores shared out as torch threads (CPU workstations)")
    parser.add_argument("--list", action=ActionYesNo, nargs="?", default=False,
                        help="print every unit with its status and exit")
    return parser


def main(argv: list[str]) -> None:
    """Check the plan and inputs, run the units asked for, write the results of everything finished."""
    args = build_parser().parse_args(argv)
    plan = StudyPlan(pretrained=args.pretrained, reward=args.reward, arms=list(args.arms), seeds=list(args.seeds),
                     finetune_configs=list(args.finetune_configs), evaluate_config=args.evaluate_config,
                     finetune_args=list(args.finetune_args), evaluate_args=list(args.evaluate_args),
                     evaluation_seed=args.evaluation_seed, primary=dict(args.primary), claims=dict(args.claims))
    out = Path(args.out)
    units = plan.units(out)
    if args.list:
        for index, unit in enumerate(units):
            state = "finished" if unit.finished else ("begun" if unit.folder.exists() else "not started")
            print(f"{index:3d}  {unit.arm:<14} seed {unit.seed:<4} {state}")
        print(f"{len(units)} units: sbatch --array=0-{len(units) - 1} scripts/slurm/study.sbatch …")
        return
    if args.aggregate_only:
        _write_results(out)
        return
    plan.check_inputs()
    write_plan(plan, out)
    if args.unit is not None:
        if not 0 <= args.unit < len(units):
            raise ValueError(f"--unit {args.unit}: this study has units 0..{len(units) - 1} (msrl study … --list)")
        failed = run_units(plan, [units[args.unit]], out)
    else:
        print(f"msrl study: {len(plan.arms)} arms x {len(plan.seeds)} seeds = {len(units)} units in {out}, "
              f"{args.jobs} at a time", flush=True)
        failed = run_units(plan, units, out, args.jobs)
        _write_results(out)
    if failed:
        print(f"msrl study: {len(failed)} unit(s) failed: " + ", ".join(f"{u.arm} seed {u.seed}" for u in failed)
              + "; rerun the same command to retry them (finished units are kept)", file=sys.stderr)
        sys.exit(1)


def _write_results(out: Path) -> None:
    """results.md/.json and figures of the finished units; say where they are."""
    if not (out / "study.json").is_file():
        raise FileNotFoundError(f"{out}/study.json does not exist: run msrl study without --aggregate-only first")
    write_study_results(out)
    print(f"wrote {out}/results.md, {out}/results.json and {out}/figures/")
