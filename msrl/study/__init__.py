"""`msrl study`: arms (reward ablations, fine-tuning algorithms) × seeds against one pretrained model, aggregated.

The plan (msrl/study/plan.py) names the arms (msrl/study/arms.py), seeds and inputs; the runner
(msrl/study/runner.py) runs each unit (a fine-tuning run and its paired evaluation) once, as subprocesses,
resumable. A mask arm fine-tunes under a ControlNet with its own reward and is compared with that ControlNet
(mask fidelity paired per volume), reported in its own section.

The aggregation reads the finished units of a study folder (layout in msrl/study/aggregate.py),
computes every number over seeds with its paired difference to the pretrained model, decides the
claims mechanically and writes results.json, results.md and figures/.
"""

from msrl.study.aggregate import aggregate_study, study_results, write_study_results
from msrl.study.arms import PRETRAINED, Arm, arm_reward
from msrl.study.claims import evaluate_claims
from msrl.study.plan import StudyPlan, Unit, write_plan
from msrl.study.runner import run_unit, run_units
from msrl.study.units import BASELINE, MASK_PRIMARY, FinishedUnit, collect_units, read_plan

__all__ = ["BASELINE", "MASK_PRIMARY", "PRETRAINED", "Arm", "FinishedUnit", "StudyPlan", "Unit", "aggregate_study",
           "arm_reward", "collect_units", "evaluate_claims", "read_plan", "run_unit", "run_units", "study_results",
           "write_plan", "write_study_results"]
