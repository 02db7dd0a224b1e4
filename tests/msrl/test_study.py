"""Tests of `msrl study`'s plan and runner: arms select reward components, units run once, requeue resumes."""

import json
import os
import threading
from pathlib import Path

import pytest
import yaml

from msrl.cli import main
from msrl.study import runner
from msrl.study.plan import Arm, StudyPlan, arm_reward, read_reward, write_plan
from msrl.study.runner import finetune_command
from tests.conftest import REPO

RULES = {"class_path": "rewards.MultiScaleReward", "init_args": {
    "components": [{"class_path": "rewards.InterSliceContinuityReward", "init_args": {"name": "continuity"}},
                   {"class_path": "rewards.BrainMaskPlausibilityReward", "init_args": {"name": "mask"}}],
    "weights": [1.0, 0.5], "freeze_after": 2}}


def _plan(tmp_path: Path, pretrained: Path, **changes: object) -> StudyPlan:
    reward = tmp_path / "reward.yaml"
    reward.write_text(yaml.safe_dump(RULES))
    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(yaml.safe_dump(_EVALUATE))
    settings = dict(pretrained=str(pretrained), reward=str(reward), arms=[Arm("continuity", ["continuity"])],
                    seeds=[0], finetune_configs=[str(REPO / "configs/finetune/template.yaml")],
                    finetune_args=_FINETUNE, evaluate_config=str(evaluate))
    return StudyPlan(**{**settings, **changes})


_FINETUNE = ["--model.num_steps", "4", "--model.samples_per_iteration", "4", "--model.micro_batch_size", "2",
             "--trainer.max_epochs", "1", "--model.iterations_per_epoch", "2", "--trainer.callbacks", "[]",
             "--trainer.enable_progress_bar", "false"]
_EVALUATE = {"num_samples": 4, "steps": 2, "bootstrap": 4, "kid_subsets": 4, "ms_ssim_pairs": 4,
             "paired_bootstrap": 10, "utility": {"channels": [8, 8], "epochs": 1, "seeds": [0]}}


def test_an_arm_keeps_its_components_and_their_weights(tmp_path: Path, pretrained_checkpoint: Path) -> None:
    plan = _plan(tmp_path, pretrained_checkpoint)
    full = read_reward(plan.reward)
    only_mask = arm_reward(full, Arm("mask", ["mask"]), plan.reward)["init_args"]
    assert [c["init_args"]["name"] for c in only_mask["components"]] == ["mask"]
    assert only_mask["weights"] == [0.5] and only_mask["freeze_after"] == 2 and only_mask["name"] == "mask"
    assert len(arm_reward(full, Arm("all"), plan.reward)["init_args"]["components"]) == 2
    with pytest.raises(ValueError, match=r"\['volume3d'\] are not in"):
        _plan(tmp_path, pretrained_checkpoint, arms=[Arm("critic", ["volume3d"])]).check_inputs()
    with pytest.raises(ValueError, match="distinct and not 'pretrained'"):
        _plan(tmp_path, pretrained_checkpoint, arms=[Arm("pretrained", None)])
    with pytest.raises(FileNotFoundError, match="study key pretrained"):
        _plan(tmp_path, tmp_path / "missing.ckpt").check_inputs()


def test_a_folder_holding_another_study_is_refused(tmp_path: Path, pretrained_checkpoint: Path) -> None:
    write_plan(_plan(tmp_path, pretrained_checkpoint), tmp_path / "study")
    write_plan(_plan(tmp_path, pretrained_checkpoint), tmp_path / "study")  # the same plan: continue
    with pytest.raises(ValueError, match=r"different study \(keys \['seeds'\]"):
        write_plan(_plan(tmp_path, pretrained_checkpoint, seeds=[0, 1]), tmp_path / "study")


def test_a_begun_unit_resumes_from_its_last_checkpoint(tmp_path: Path, pretrained_checkpoint: Path) -> None:
    plan = _plan(tmp_path, pretrained_checkpoint, seeds=[3])
    unit = plan.units(tmp_path)[0]
    command = finetune_command(plan, unit, tmp_path)
    assert "--ckpt_path" not in command
    assert command[command.index("--model.seed") + 1] == "3" and command[command.index("--seed_everything") + 1] == "3"
    unit.checkpoint.parent.mkdir(parents=True)
    unit.checkpoint.write_bytes(b"")
    assert finetune_command(plan, unit, tmp_path)[-2:] == ["--ckpt_path", str(unit.checkpoint)]


def _study(plan: StudyPlan, out: Path, *extra: str) -> None:
    args = ["study", "--pretrained", plan.pretrained, "--reward", plan.reward, "--arms",
            json.dumps([{"name": a.name, "components": a.components} for a in plan.arms]),
            "--seeds", json.dumps(plan.seeds), "--finetune_configs", json.dumps(plan.finetune_configs),
            "--finetune_args", json.dumps(plan.finetune_args), "--evaluate_config", plan.evaluate_config,
            "--evaluate_args", json.dumps(plan.evaluate_args), "--primary", json.dumps(plan.primary),
            "--out", str(out), *extra]
    main(args)


@pytest.mark.parametrize("switch", [["--list"], ["--list", "true"]])
def test_list_prints_the_units_and_runs_nothing(tmp_path: Path, pretrained_checkpoint: Path, switch: list[str],
                                                capsys: pytest.CaptureFixture) -> None:
    """`--list` works as a bare switch and with a value; it starts no unit and writes nothing."""
    plan = _plan(tmp_path, pretrained_checkpoint, seeds=[0, 1])
    out = tmp_path / "study"
    _study(plan, out, *switch)
    printed = capsys.readouterr().out
    assert "continuity     seed 1    not started" in printed and "sbatch --array=0-1" in printed
    assert not out.exists()
    with pytest.raises(SystemExit):  # a bare --aggregate-only before anything ran: a clear error
        _study(plan, out, "--aggregate-only")
    assert "study.json does not exist" in capsys.readouterr().err


@pytest.mark.slow  # a PPO run and an evaluation as subprocesses (~30 s): make test-full
def test_study_runs_each_unit_once_and_aggregates(tmp_path: Path, cohort_cache: Path, pretrained_checkpoint: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    data = ["--data", str(REPO / "configs/data/template.yaml"), "--data.init_args.num_subjects", "8",
            "--data.init_args.spatial_size", "16", "--data.init_args.cache_dir", str(cohort_cache),
            "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25"]
    plan = _plan(tmp_path, pretrained_checkpoint, evaluate_args=data, primary={"sampler": "ddim4-eta1"})
    out = tmp_path / "study"
    _study(plan, out, "--unit", "0")
    unit = plan.units(out)[0]
    record = json.loads((unit.folder / "unit.json").read_text())
    assert record["status"] == "done" and unit.checkpoint.is_file()
    metrics = json.loads((unit.evaluation / "metrics.json").read_text())
    assert [c["candidate"] for c in metrics["comparisons"]][0] == "continuity"  # paired against the pretrained
    reward = yaml.safe_load((out / "arms" / "continuity" / "reward.yaml").read_text())
    assert [c["init_args"]["name"] for c in reward["init_args"]["components"]] == ["continuity"]
    stamp = (unit.folder / "unit.json").stat().st_mtime_ns
    capsys.readouterr()
    _study(plan, out)  # every unit finished: nothing recomputed, the results written
    assert "finished earlier, kept" in capsys.readouterr().out
    assert (unit.folder / "unit.json").stat().st_mtime_ns == stamp
    results = (out / "results.md").read_text()
    assert "Finished units: 1 of 1" in results and "Problem" not in results  # the primary sampler was evaluated
    assert json.loads((out / "results.json").read_text())["study"]["primary"]["sampler"] == "ddim4-eta1"
    # an evaluation lost after PPO finished: only the evaluation runs again
    (unit.folder / "unit.json").unlink()
    finetune_log = (unit.folder / "finetune.log").read_text()
    _study(plan, out, "--unit", "0")
    assert (unit.folder / "finetune.log").read_text() == finetune_log and (unit.folder / "unit.json").is_file()
    with pytest.raises(SystemExit):
        _study(plan, out, "--unit", "5")


def test_units_run_side_by_side_with_the_cores_shared_out(tmp_path: Path, pretrained_checkpoint: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs=2: two units are inside run_unit at once (a barrier that one job alone would never pass), each
    with its share of the cores as torch threads; a failing unit is returned and the other still finishes."""
    plan = _plan(tmp_path, pretrained_checkpoint, seeds=[0, 1])
    both_running = threading.Barrier(2, timeout=20)
    seen: dict[int, str | None] = {}

    def fake_unit(plan: StudyPlan, unit: object, out: Path, env: dict[str, str] | None = None) -> dict:
        both_running.wait()  # BrokenBarrierError (a failed test) unless the other unit runs too
        seen[unit.seed] = (env or {}).get("OMP_NUM_THREADS")
        if unit.seed == 1:
            raise RuntimeError("PPO failed")
        return {"seconds": {"finetune": 1.0, "evaluate": 2.0}}

    monkeypatch.setattr(runner, "run_unit", fake_unit)
    units = plan.units(tmp_path / "study")
    failed = runner.run_units(plan, units, tmp_path / "study", jobs=2)
    assert [unit.seed for unit in failed] == [1]
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert seen == {0: share, 1: share}
    assert runner.thread_environment(1) is None
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        runner.thread_environment(0)
