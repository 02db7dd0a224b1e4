"""`msrl study` with a mask-fidelity arm: fine-tuned under a ControlNet with its own reward, compared with that one.

The plan tests check the arm's validation and the unit's commands through the real `msrl finetune` and
`msrl evaluate` parsers (no training). The aggregation test writes unit folders by hand: the mask arm's
metrics.json holds the rows `msrl evaluate` writes with a `segmentation:` section (mask fidelity and
segmentation utility from msrl/evaluation's own functions, judged by threshold "segmenters"), the other
arm's those of tests/msrl/test_study_aggregate.py.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import yaml

from msrl.cli import main
from msrl.evaluation.comparison import paired_distribution, paired_records
from msrl.evaluation.mask_fidelity import MASK_FIDELITY_METRIC, mask_fidelity_records
from msrl.evaluation.segmentation import SEGMENTATION_METRIC, SegmentationProtocol, segmentation_records
from msrl.evaluation.segmenter import WHOLE_TUMOUR, MaskedVolumes
from msrl.study import study_results, write_study_results
from msrl.study.plan import Arm, StudyPlan, write_plan
from msrl.study.runner import evaluate_command, finetune_command
from msrl.study.tables import results_markdown
from tests.conftest import REPO
from tests.lightning_modules.test_finetune_masks import _controlnet as _tiny_controlnet
from tests.msrl.test_study_aggregate import CACHE, GOOD, N, _distribution, _metrics_text
from tests.rewards.test_mask_reward import segmenter_checkpoint  # noqa: F401  (a fixture)

MASK_REWARD = str(REPO / "configs/rewards/multiscale_mask.yaml")
MASK_FINETUNE = str(REPO / "configs/finetune/template_mask.yaml")
MASK_EVALUATE = str(REPO / "configs/evaluate/template_mask.yaml")
RULES = {"class_path": "rewards.MultiScaleReward", "init_args": {
    "components": [{"class_path": "rewards.InterSliceContinuityReward", "init_args": {"name": "continuity"}},
                   {"class_path": "rewards.BrainMaskPlausibilityReward", "init_args": {"name": "mask"}}]}}


def _plan(tmp_path: Path, arms: list[Arm], **changes: object) -> StudyPlan:
    """A plan whose input files exist (empty checkpoints: nothing is loaded)."""
    for name in ("pre.ckpt", "controlnet.ckpt", "other.ckpt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "reward.yaml").write_text(yaml.safe_dump(RULES))
    settings = dict(pretrained=str(tmp_path / "pre.ckpt"), reward=str(tmp_path / "reward.yaml"), arms=arms, seeds=[0],
                    finetune_configs=[str(REPO / "configs/finetune/template_latent.yaml")],
                    evaluate_config=str(REPO / "configs/evaluate/template.yaml"),
                    evaluate_args=["--utility.seeds", "[0]"])
    return StudyPlan(**{**settings, **changes})


def _mask_arm(tmp_path: Path, **changes: object) -> Arm:
    controlnet = str(tmp_path / "controlnet.ckpt")
    settings = dict(name="ppo_mask", reward=MASK_REWARD, finetune_configs=[MASK_FINETUNE],
                    finetune_args=["--model.controlnet_checkpoint", controlnet],
                    baseline={"name": "controlnet", "checkpoint": controlnet}, evaluate_config=MASK_EVALUATE,
                    evaluate_args=["--num_samples", "8"])
    return Arm(**{**settings, **changes})


def test_a_mask_arm_is_validated_with_the_arm_and_key_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arm 'ppo_mask' has both components and reward"):
        _mask_arm(tmp_path, components=["continuity"])
    with pytest.raises(ValueError, match=r"arm 'ppo_mask': baseline must be \{name: NAME, checkpoint: PATH\}"):
        _mask_arm(tmp_path, baseline={"checkpoint": "x.ckpt"})
    with pytest.raises(ValueError, match="baseline name 'pretrained' must differ"):
        _mask_arm(tmp_path, baseline={"name": "pretrained", "checkpoint": "x.ckpt"})
    with pytest.raises(ValueError, match="arm 'solo': evaluate_config needs a baseline"):
        Arm("solo", ["continuity"], evaluate_config=MASK_EVALUATE)
    plain = Arm("continuity", ["continuity"])
    with pytest.raises(ValueError, match="baseline name 'continuity' is an arm's name"):
        _plan(tmp_path, [plain, _mask_arm(tmp_path, baseline={"name": "continuity", "checkpoint": "x.ckpt"})])
    other = _mask_arm(tmp_path, name="ppo_mask_2", baseline={"name": "controlnet", "checkpoint": "other.ckpt"})
    with pytest.raises(ValueError, match="give different checkpoints different names"):
        _plan(tmp_path, [_mask_arm(tmp_path), other])
    with pytest.raises(ValueError, match=r"claims name arms \['ppo_mask'\] with their own baseline"):
        _plan(tmp_path, [plain, _mask_arm(tmp_path)], claims={"multiscale": "ppo_mask"})
    # the inputs: its own files exist, and its baseline is the ControlNet it fine-tunes under
    with pytest.raises(FileNotFoundError, match=r"study key arms\[ppo_mask\].reward: .*missing.yaml"):
        _plan(tmp_path, [_mask_arm(tmp_path, reward=str(tmp_path / "missing.yaml"))]).check_inputs()
    unpaired = _mask_arm(tmp_path, baseline=None, evaluate_config=None, evaluate_args=[])
    with pytest.raises(ValueError, match="arm 'ppo_mask' fine-tunes under the ControlNet .*controlnet.ckpt .*give it "
                                         "baseline"):
        _plan(tmp_path, [unpaired]).check_inputs()
    elsewhere = _mask_arm(tmp_path, baseline={"name": "controlnet", "checkpoint": str(tmp_path / "other.ckpt")})
    with pytest.raises(ValueError, match="its baseline 'controlnet' is .*other.ckpt: they must be the same file"):
        _plan(tmp_path, [elsewhere]).check_inputs()
    _plan(tmp_path, [plain, _mask_arm(tmp_path)], claims={"multiscale": "continuity"}).check_inputs()


def test_a_mask_arm_runs_its_own_reward_controlnet_and_evaluation(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The unit's commands, read back through the real `msrl finetune` and `msrl evaluate` parsers (no compute)."""
    plain, mask = Arm("continuity", ["continuity"]), _mask_arm(tmp_path)
    plan = _plan(tmp_path, [plain, mask], seeds=[2])
    out = tmp_path / "study"
    write_plan(plan, out)
    assert (out / "arms/ppo_mask/reward.yaml").read_text() == Path(MASK_REWARD).read_text()  # as is
    arms = {arm["name"]: arm for arm in json.loads((out / "study.json").read_text())["arms"]}
    assert "baseline" not in arms["continuity"] and "reward" not in arms["continuity"]  # older study.json still match
    assert arms["ppo_mask"]["baseline"] == mask.baseline and arms["ppo_mask"]["reward"] == MASK_REWARD
    unit = plan.units(out)[1]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*finetune_command(plan, unit, out)[3:], "--print_config"])
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init["controlnet_checkpoint"] == str(tmp_path / "controlnet.ckpt") and init["seed"] == 2
    assert [c["class_path"] for c in init["reward"]["init_args"]["components"]] == ["rewards.MaskFidelityReward"]
    command = evaluate_command(plan, unit)
    assert command[command.index("-c") + 1] == MASK_EVALUATE
    assert command[-4:] == ["--utility.seeds", "[0]", "--num_samples", "8"]  # the plan's options, then the arm's
    with pytest.raises(SystemExit):
        main([*command[3:], "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["checkpoint"] == [str(tmp_path / "controlnet.ckpt"), str(unit.checkpoint)]
    assert config["names"] == ["controlnet", "ppo_mask"] and config["baseline"] == "controlnet"
    assert config["seed"] == 1236 and config["num_samples"] == 8 and config["segmentation"]["seeds"] == [0, 1]
    assert evaluate_command(plan, plan.units(out)[0])[6:13] == [  # the other arm: as before, against pretrained
        "--checkpoint", plan.pretrained, "--checkpoint", str(plan.units(out)[0].checkpoint), "--names",
        "[pretrained, continuity]", "--baseline"]


class ThresholdSegmenter(torch.nn.Module):
    """Calls a voxel oedema (label 2) where the volume exceeds `threshold`, background elsewhere: logits over
    (background, 1, 2, 4), as the evaluation's segmenters give them."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        lesion = (volumes > self.threshold).float()
        return torch.cat([1 - lesion, torch.zeros_like(lesion), lesion, torch.zeros_like(lesion)], dim=1)


JUDGES = [ThresholdSegmenter(0.45), ThresholdSegmenter(0.55)]  # the real-trained segmenters, seeds 0 and 1
PROTOCOL = SegmentationProtocol(seeds=(0, 1))
SAMPLER = "ddim20-eta1"  # configs/evaluate/template_mask.yaml's sampler


def _masks() -> torch.Tensor:
    """Held-out masks of N 4³ volumes: class-1 volumes (odd) carry oedema around an enhancing voxel, class 0 none."""
    masks = torch.zeros(N, 1, 4, 4, 4, dtype=torch.uint8)
    masks[1::2, 0, 1:3, 1:3, 1:3] = 2
    masks[1::2, 0, 1, 1, 1] = 4
    return masks


def _drawn(seed: int, strength: float) -> MaskedVolumes:
    """Volumes drawn from the masks with the same noise (paired): lesion voxels `strength` brighter."""
    noise = 0.2 * torch.randn(N, 1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return MaskedVolumes(noise + strength * (_masks() > 0).float(), _masks())


def _segmentation(data: MaskedVolumes, train_set: str, shift: float) -> list[dict]:
    """Segmentation utility rows: segmenters "trained" on `data` judged on held-out real pairs."""
    real = _drawn(99, 1.5)
    runs = [PROTOCOL.test(ThresholdSegmenter(judge.threshold + shift), real) for judge in JUDGES]
    return segmentation_records(runs, train_set, PROTOCOL.seeds, len(real.volumes), len(data.volumes))


def _mask_metrics(arm: str, seed: int, gain: float) -> dict:
    """metrics.json of one mask-arm unit, as `msrl evaluate -c configs/evaluate/template_mask.yaml` writes it:
    the ControlNet (baseline) and the arm drawn from the same held-out masks at one sampler, paired."""
    real = _drawn(99, 1.5)
    result = {"schema_version": 2, "data": {"real_split": "test", "num_real": N, "num_train": N, "num_test": None,
                                            "segmentation_test_split": "test", "num_segmentation_test": N,
                                            "num_segmentation_train": N},
              "extractors": ["a", "b"],
              "primary": {"metric": "fid", "extractor": "a", "view": "3d", "class": "all", "reference": "test"},
              "samplers": {"evaluation": SAMPLER, "all": [{"label": SAMPLER}]}, "reward": None,
              "real": {"records": _segmentation(real, "real", 0.0)
                       + mask_fidelity_records(JUDGES, real, PROTOCOL.seeds, N, seed=seed)},
              "entries": [], "comparisons": []}
    sets = {}
    for name, strength in (("controlnet", 0.5), (arm, 0.5 + gain)):
        features, rows = _distribution(seed, 10 * seed, (1.5 - gain, 1.5) if name == arm else (1.5, 1.5))
        drawn = _drawn(seed, strength)
        rows = rows + _segmentation(drawn, "synthetic", -gain if name == arm else 0.0)
        rows += mask_fidelity_records(JUDGES, drawn, PROTOCOL.seeds, N, seed=seed)
        sets[name] = features, [{**row, "sampler": SAMPLER} for row in rows]
        result["entries"].append({"name": name, "model": name, "num_samples": N, "records": sets[name][1]})
    labels = torch.arange(N) % 2
    rows = paired_distribution(CACHE, sets["controlnet"][0], sets[arm][0], labels, num_resamples=6, seed=seed)
    rows += paired_records(sets["controlnet"][1], sets[arm][1], num_resamples=20, seed=seed)
    result["comparisons"].append({"baseline": "controlnet", "candidate": arm, "sampler": SAMPLER, "num_volumes": N,
                                  "records": rows})
    return result


def _study(root: Path, gain: float, seeds: tuple[int, ...] = (0, 1, 2)) -> Path:
    """A study folder: "multiscale" against pretrained (test_study_aggregate's units) and "ppo_mask" against its
    ControlNet, every unit finished."""
    controlnet = {"name": "controlnet", "checkpoint": "models/controlnet.ckpt"}
    plan = {"arms": [{"name": "multiscale", "components": ["slice2d", "volume3d"],
                      "model": "lightning_modules.PPOFinetuneModule"},
                     {"name": "ppo_mask", "components": None, "reward": MASK_REWARD, "baseline": controlnet,
                      "evaluate_config": MASK_EVALUATE, "model": "lightning_modules.PPOFinetuneModule"}],
            "seeds": list(seeds), "primary": {"metric": "fid", "extractor": None, "class": "all",
                                              "sampler": "ddim4-eta1"},
            "claims": {"multiscale": "multiscale", "single_scale": []}}
    root.mkdir()
    (root / "study.json").write_text(json.dumps(plan))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for arm in ("multiscale", "ppo_mask"):
            for seed in seeds:
                folder = root / "units" / arm / f"seed_{seed}"
                (folder / "evaluation").mkdir(parents=True)
                metrics = _metrics_text(arm, seed, *GOOD[arm]) if arm == "multiscale" else json.dumps(
                    _mask_metrics(arm, seed, gain))
                (folder / "evaluation" / "metrics.json").write_text(metrics)
                (folder / "unit.json").write_text(json.dumps({"arm": arm, "seed": seed, "status": "done",
                                                              "seconds": {"finetune": 20.0, "evaluate": 5.0}}))
    finally:
        torch.set_num_threads(threads)
    return root


PRIMARY = {"metric": MASK_FIDELITY_METRIC, "label": WHOLE_TUMOUR, "train_set": "real", "sampler": SAMPLER}


def _row(rows: list[dict], **fields: object) -> dict:
    return next(row for row in rows if all(row.get(k) == v for k, v in fields.items()))


def test_a_mask_arm_is_paired_against_its_controlnet_in_its_own_section(tmp_path: Path) -> None:
    study = _study(tmp_path / "study", gain=0.3)
    results = write_study_results(study)
    arm = results["arms"]["ppo_mask"]
    values, differences = [], []
    for seed in (0, 1, 2):
        evaluation = json.loads((study / f"units/ppo_mask/seed_{seed}/evaluation/metrics.json").read_text())
        entry = next(e for e in evaluation["entries"] if e["name"] == "ppo_mask")
        values.append(_row(entry["records"], **PRIMARY)["value"])
        paired = _row(evaluation["comparisons"][0]["records"], **{k: v for k, v in PRIMARY.items() if k != "sampler"})
        differences.append(paired["difference"])
    row = _row(arm["rows"], **PRIMARY)
    assert row["values"] == values and row["lower_is_better"] is False
    half = scipy.stats.t.ppf(0.975, 2) * np.std(differences, ddof=1) / np.sqrt(3)
    assert [p["difference"] for p in row["paired"]["per_seed"]] == differences and min(differences) > 0.15
    assert row["paired"]["ci95"] == pytest.approx([np.mean(differences) - half, np.mean(differences) + half])
    assert row["paired"]["better"] == 3 and row["paired"]["verdict"] == "better"
    baseline = _row(arm["baseline"]["rows"], **PRIMARY)  # the ControlNet's own numbers, from the arm's units
    assert arm["baseline"]["name"] == "controlnet" and baseline["from_arms"] == ["ppo_mask"] * 3
    assert baseline["values"] == pytest.approx([v - d for v, d in zip(values, differences, strict=True)])
    synthetic = _row(arm["rows"], metric=SEGMENTATION_METRIC, train_set="synthetic", label=WHOLE_TUMOUR)
    assert synthetic["paired"]["worse"] == 3  # its segmenters' thresholds set lower: more false lesion voxels
    ceiling = _row(arm["real"]["rows"], metric=MASK_FIDELITY_METRIC, label=WHOLE_TUMOUR)
    assert ceiling["mean"] > max(values) and not arm["problems"]
    # the pretrained model's numbers and the paper's table come from the multiscale units alone
    assert all(r["from_arms"] == ["multiscale"] * 3 for r in results["pretrained"]["rows"])
    assert not any(r["metric"] == MASK_FIDELITY_METRIC for r in results["pretrained"]["rows"] + results["real"]["rows"])
    claims = {claim["id"]: claim["status"] for claim in results["claims"]}
    assert claims == {"primary_fid": "holds", "other_fid": "holds", "utility": "holds", "class_fidelity": "holds",
                      "mask_fidelity:ppo_mask": "holds"}
    assert not results["study"]["problems"]  # its other evaluation does not count as the table's
    text = (study / "results.md").read_text()
    table = text[text.index("### Table 1"):text.index("### Mask arm ppo_mask")]
    assert "multiscale (3/3 seeds)" in table and "ppo_mask" not in table
    section = text[text.index("### Mask arm ppo_mask: against controlnet"):text.index("## Claims")]
    line = next(line for line in section.splitlines() if "mask fidelity ↑ (primary), whole tumour" in line)
    assert f"| {ceiling['mean']:.3g} [" in line and "better 3/3" in line
    assert "segmentation utility ↑ (trained on synthetic), whole tumour" in section
    assert "label 1" not in section  # no mask has the necrotic core: no number, no row
    assert "- **holds**: ppo_mask raises mask fidelity (whole tumour, real-trained segmenters) over controlnet" in text
    assert "| ppo_mask | PPO | its own reward (" in text and "#### controlnet (the baseline of ppo_mask" in text
    assert "| mask_fidelity/dice [whole tumour] |" in text and "forest" in results["figures"]


def test_a_mask_arm_that_loses_mask_fidelity_or_has_no_controlnet_rows(tmp_path: Path) -> None:
    results = study_results(_study(tmp_path / "worse", gain=-0.3, seeds=(0, 1)))
    claim = next(c for c in results["claims"] if c["id"] == "mask_fidelity:ppo_mask")
    assert claim["status"] == "does not hold" and claim["numbers"]["better"] == 0
    assert "ppo_mask − controlnet: mean -" in claim["detail"]
    study = _study(tmp_path / "renamed", gain=0.4, seeds=(0,))
    metrics = study / "units/ppo_mask/seed_0/evaluation/metrics.json"
    metrics.write_text(metrics.read_text().replace('"controlnet"', '"pretrained"'))  # evaluated against the wrong one
    with pytest.raises(ValueError, match="no entry of source 'controlnet'"):
        study_results(study)
    (study / "units/ppo_mask/seed_0/unit.json").unlink()
    text = results_markdown(study_results(study))
    assert "### Mask arm ppo_mask: against controlnet" in text and "No finished unit yet" in text


def test_the_study_templates_commented_mask_arm_is_a_valid_arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """configs/study/template.yaml carries a mask arm commented out (`make study` does not run it): uncommented,
    the plan parses through `msrl study`'s parser and pairs the arm with the ControlNet it fine-tunes under."""
    from msrl.commands.study import build_parser

    lines = (REPO / "configs/study/template.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - name: ppo_mask "))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("  #"))
    uncommented = lines[:start] + [line.replace("  # ", "  ", 1) for line in lines[start:end]] + lines[end:]
    config = tmp_path / "study.yaml"
    config.write_text("\n".join(uncommented) + "\n")
    monkeypatch.chdir(REPO)  # the template's paths are relative to the repository
    args = build_parser().parse_args(["-c", str(config), "--out", str(tmp_path / "out")])
    plan = StudyPlan(pretrained=args.pretrained, reward=args.reward, arms=list(args.arms), seeds=list(args.seeds),
                     finetune_configs=list(args.finetune_configs), evaluate_config=args.evaluate_config,
                     claims=dict(args.claims), primary=dict(args.primary))
    arm = plan.arm("ppo_mask")
    controlnet = "study_out/models/runs/controlnet/version_0/checkpoints/last.ckpt"
    assert arm.baseline == {"name": "controlnet", "checkpoint": controlnet} and arm.components is None
    assert arm.reward == "study_out/models/multiscale_mask.yaml" and arm.evaluate_config == MASK_EVALUATE.removeprefix(
        f"{REPO}/")
    plan.check_controlnet(arm)  # the baseline is the ControlNet its fine-tuning runs under
    assert len(plan.arms) == 5 and [a.name for a in plan.arms][:4] == [a["name"] for a in yaml.safe_load(
        (REPO / "configs/study/template.yaml").read_text())["arms"]]  # commented out, `make study` runs four


@pytest.mark.slow  # a mask-conditioned PPO run and an evaluation with segmenters, as subprocesses (~60 s)
def test_a_mask_arm_unit_runs_end_to_end(tmp_path: Path, cohort_cache: Path, latent_checkpoint: Path,
                                         segmenter_checkpoint: Path) -> None:  # noqa: F811
    """One unit of a mask arm through the real `msrl finetune` and `msrl evaluate` (tiny 16³ models): fine-tuned
    under the ControlNet with the mask reward, evaluated against that ControlNet, aggregated into its section."""
    controlnet = _tiny_controlnet(latent_checkpoint, tmp_path / "tiny_controlnet.ckpt")
    reward = tmp_path / "mask_reward.yaml"
    reward.write_text(yaml.safe_dump({"class_path": "rewards.MultiScaleReward", "init_args": {
        "components": [{"class_path": "rewards.MaskFidelityReward",
                        "init_args": {"checkpoint": str(segmenter_checkpoint), "name": "mask_fidelity"}}],
        "weights": [1.0], "normalise": False}}))
    cohort = {"num_subjects": "8", "spatial_size": "16", "cache_dir": str(cohort_cache), "val_fraction": "0.25",
              "test_fraction": "0.25"}
    finetune = [*[a for k, v in cohort.items() for a in (f"--model.mask_data.init_args.{k}", v)],
                "--model.num_steps", "3", "--model.samples_per_iteration", "2", "--model.micro_batch_size", "2",
                "--model.iterations_per_epoch", "1", "--model.image_every_n_iterations", "0",
                "--trainer.max_epochs", "1", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
                "--model.controlnet_checkpoint", str(controlnet)]
    evaluate = [*[a for k, v in cohort.items() for a in (f"--data.init_args.{k}", v)], "--num_samples", "4",
                "--steps", "2", "--bootstrap", "4", "--kid_subsets", "4", "--ms_ssim_pairs", "4",
                "--paired_bootstrap", "20", "--batch_size", "2", "--segmentation.blocks_down", "[1]",
                "--segmentation.steps", "3", "--segmentation.batch_size", "2", "--segmentation.downsample", "1"]
    arm = Arm("ppo_mask", reward=str(reward), finetune_configs=[MASK_FINETUNE], finetune_args=finetune,
              baseline={"name": "controlnet", "checkpoint": str(controlnet)}, evaluate_config=MASK_EVALUATE,
              evaluate_args=evaluate)
    plan = _plan(tmp_path, [arm], pretrained=str(latent_checkpoint), evaluate_args=[])
    out = tmp_path / "study"
    main(["study", "--pretrained", plan.pretrained, "--reward", plan.reward, "--arms", json.dumps([
        {key: getattr(arm, key) for key in ("name", "reward", "finetune_configs", "finetune_args", "baseline",
                                            "evaluate_config", "evaluate_args")}]),
          "--seeds", "[0]", "--finetune_configs", json.dumps(plan.finetune_configs), "--evaluate_config",
          plan.evaluate_config, "--out", str(out)])
    metrics = json.loads((out / "units/ppo_mask/seed_0/evaluation/metrics.json").read_text())
    assert [(c["baseline"], c["candidate"]) for c in metrics["comparisons"]] == [("controlnet", "ppo_mask")]
    results = json.loads((out / "results.json").read_text())
    entry = results["arms"]["ppo_mask"]
    row = _row(entry["rows"], metric=MASK_FIDELITY_METRIC, label=WHOLE_TUMOUR, sampler=entry["primary"]["sampler"])
    assert row["paired"]["num_seeds"] == 1 and row["paired"]["per_seed"][0]["verdict"] is not None
    assert _row(entry["baseline"]["rows"], metric=MASK_FIDELITY_METRIC, label=WHOLE_TUMOUR)["from_arms"] == [
        "ppo_mask"]
    assert not entry["problems"] and "### Mask arm ppo_mask: against controlnet" in (out / "results.md").read_text()
