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


BACKPROP = str(REPO / "configs/finetune/template_backprop.yaml")
LATENT = str(REPO / "configs/finetune/template_latent.yaml")


def test_an_arm_runs_its_own_finetune_configs_and_args(tmp_path: Path) -> None:
    arms = [Arm("shared", ["continuity"]), Arm("backprop", ["continuity"], [BACKPROP], ["--trainer.max_epochs", "3"])]
    plan = _plan(tmp_path, tmp_path / "pre.ckpt", arms=arms, finetune_args=["--trainer.max_epochs", "1"])
    shared, backprop = (finetune_command(plan, unit, tmp_path) for unit in plan.units(tmp_path))
    assert [shared[i + 1] for i, a in enumerate(shared) if a == "-c"] == plan.finetune_configs
    assert [backprop[i + 1] for i, a in enumerate(backprop) if a == "-c"] == [BACKPROP]
    assert backprop[-4:] == ["--trainer.max_epochs", "1", "--trainer.max_epochs", "3"]  # the arm's last: it wins
    models = {arm["name"]: (arm["model"], arm["finetune_configs"]) for arm in plan.as_json()["arms"]}
    assert models == {"shared": ("lightning_modules.PPOFinetuneModule", plan.finetune_configs),
                      "backprop": ("lightning_modules.RewardBackpropModule", [BACKPROP])}


@pytest.mark.parametrize(("config", "model"), [(LATENT, "lightning_modules.PPOFinetuneModule"),
                                               (BACKPROP, "lightning_modules.RewardBackpropModule")])
def test_msrl_finetune_reads_the_unit_command_for_either_fine_tuner(tmp_path: Path, config: str, model: str,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """The unit's options (`--model.init_checkpoint`, `--model.reward`, `--model.seed`) reach the init
    arguments of the class the config chose, through the real `msrl finetune` parser (no training)."""
    plan = _plan(tmp_path, tmp_path / "pre.ckpt", arms=[Arm("arm", ["continuity"], [config])], seeds=[5],
                 finetune_args=[])  # _FINETUNE's options are PPO's: shared options must suit every arm's fine-tuner
    out = tmp_path / "study"
    write_plan(plan, out)
    command = finetune_command(plan, plan.units(out)[0], out)
    assert command[1:4] == ["-m", "msrl.cli", "finetune"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        main([*command[3:], "--print_config"])
    assert exit_code.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == model
    init = printed["model"]["init_args"]
    assert init["init_checkpoint"] == str(tmp_path / "pre.ckpt") and init["seed"] == 5
    assert [c["init_args"]["name"] for c in init["reward"]["init_args"]["components"]] == ["continuity"]
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == str(plan.units(out)[0].folder)


def test_plans_with_missing_configs_or_bad_claims_are_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_backprop.yaml")
    plan = _plan(tmp_path, tmp_path / "pre.ckpt", arms=[Arm("arm", ["continuity"], [missing])])
    (tmp_path / "pre.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"study key arms\[arm\].finetune_configs: .*no_such_backprop.yaml"):
        plan.check_inputs()
    arms = [Arm("multi", ["continuity", "mask"]), Arm("ppo_multi", ["continuity", "mask"], [LATENT])]
    with pytest.raises(ValueError, match=r"claims: unknown keys \['singlescale'\]"):
        _plan(tmp_path, tmp_path / "pre.ckpt", arms=arms, claims={"singlescale": ["multi"]})
    with pytest.raises(ValueError, match=r"claims name arms \['ppo'\] that the plan does not have"):
        _plan(tmp_path, tmp_path / "pre.ckpt", arms=arms, claims={"multiscale": "multi", "versus": "ppo"})
    with pytest.raises(ValueError, match="claims.versus must differ"):
        _plan(tmp_path, tmp_path / "pre.ckpt", arms=arms, claims={"multiscale": "multi", "versus": "multi"})
    good = _plan(tmp_path, tmp_path / "pre.ckpt", arms=arms, claims={"multiscale": "multi", "versus": "ppo_multi"})
    good.check_inputs()
    write_plan(good, tmp_path / "study")
    with pytest.raises(ValueError, match=r"different study \(keys \['claims'\]"):  # claims are pre-registered
        write_plan(_plan(tmp_path, tmp_path / "pre.ckpt", arms=arms, claims={"multiscale": "ppo_multi"}),
                   tmp_path / "study")


def _study(plan: StudyPlan, out: Path, *extra: str) -> None:
    args = ["study", "--pretrained", plan.pretrained, "--reward", plan.reward, "--arms",
            json.dumps([{"name": a.name, "components": a.components, "finetune_configs": a.finetune_configs,
                         "finetune_args": a.finetune_args} for a in plan.arms]),
            "--seeds", json.dumps(plan.seeds), "--finetune_configs", json.dumps(plan.finetune_configs),
            "--finetune_args", json.dumps(plan.finetune_args), "--evaluate_config", plan.evaluate_config,
            "--evaluate_args", json.dumps(plan.evaluate_args), "--primary", json.dumps(plan.primary),
            "--claims", json.dumps(plan.claims),
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
