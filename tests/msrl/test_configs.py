"""Every YAML under configs/ parses and instantiates (GPU ones with the accelerator set to CPU)."""

import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment

from datamodules import VolumeDataModule
from lightning_modules.backprop.module import RewardBackpropModule
from lightning_modules.critics.networks import RewardNetworkModule
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.finetune.base import FinetuneBase
from lightning_modules.first_stage.base import FirstStageModule
from lightning_modules.first_stage.vqgan import AutoencoderModule
from lightning_modules.ppo.module import PPOFinetuneModule
from msrl.commands.training import AutoencoderCLI, ExtractorTrainingCLI, FinetuneCLI, MsrlCLI, RewardTrainingCLI
from tests.conftest import REPO

# configs/rewards/multiscale*.yaml need trained critics: tests/rewards/test_rewards.py builds them with some.
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.startswith("multiscale"))
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
          "--trainer.num_nodes", "1", "--trainer.strategy", "auto"]


def _config_args(config: Path) -> list[str]:
    """`-c` for a config, stacked as users run it: a data set's file after its stage's base.yaml (and a base
    with brats2019.yaml, whose data it lacks; fine-tuning's base_backprop.yaml is another base)."""
    base = config.parent / "base.yaml"
    if config.name.startswith("base"):
        return ["-c", str(config), "-c", str(config.parent / "brats2019.yaml")]
    if base.is_file():
        return ["-c", str(base), "-c", str(config)]
    return ["-c", str(config)]


def _instantiate(args: list[str], tmp_path: Path) -> MsrlCLI:
    return MsrlCLI(DiffusionModule, VolumeDataModule, subclass_mode_data=True, run=False,
                   auto_configure_optimizers=False,
                   args=[*args, *ON_CPU, "--trainer.logger.init_args.save_dir", str(tmp_path)])


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    """Untrained small VQ-GAN checkpoints per (image size, channels) the latent configs need."""
    paths = {}
    for size, channels in ((64, 1), (128, 1), (128, 4)):  # template; OASIS-1 (T1); BraTS (4 sequences)
        module = AutoencoderModule(in_channels=channels, spatial_size=size, channels=(8, 8), num_res_channels=(8, 8),
                                   embedding_dim=8)
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
        trainer.strategy.connect(module)
        paths[size, channels] = tmp_path_factory.mktemp(f"ae{size}-{channels}") / "last.ckpt"
        trainer.save_checkpoint(paths[size, channels])
    return paths


def _instantiate_finetune(config: Path, checkpoint: Path, tmp_path: Path) -> FinetuneCLI:
    """As `msrl finetune` builds it: the module by `model.class_path`, PPO where a config names none."""
    return FinetuneCLI(FinetuneBase, datamodule_class=None, subclass_mode_model=True, run=False,
                       auto_configure_optimizers=False,
                       args=[*_config_args(config), "--model.init_args.init_checkpoint", str(checkpoint), *ON_CPU,
                             "--model.init_args.reward", "rewards.InterSliceContinuityReward",
                             "--trainer.logger.init_args.save_dir", str(tmp_path)])


def _arguments_for(config: Path) -> list[str]:
    kind = config.relative_to(REPO / "configs").parts[0]
    template = str(REPO / "configs/pretrain/template.yaml")
    if kind == "pretrain":
        return _config_args(config)
    if kind == "trainer":
        return ["-c", template, "--trainer", str(config)]
    if kind == "data":
        return ["-c", template, "--data", str(config)]
    if kind in ("finetune", "rewards", "autoencoder", "evaluate", "extractor", "study", "controlnet"):
        return []  # built by their own CLIs below
    raise AssertionError(f"{config}: no test instantiates configs/{kind}/ yet; add it to _arguments_for")


def test_configs_are_found() -> None:
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(config: Path, tmp_path: Path, pretrained_checkpoint: Path, latent_checkpoint: Path,
                             autoencoders: dict[tuple[int, int], Path]) -> None:
    kind = config.relative_to(REPO / "configs").parts[0]
    if kind == "finetune":  # needs a pretrained checkpoint; its multi-scale reward is tested in test_rewards
        latent = "latent" in config.name or "backprop" in config.name  # backprop's configs are latent ones
        cli = _instantiate_finetune(config, latent_checkpoint if latent else pretrained_checkpoint, tmp_path)
        expected = RewardBackpropModule if "backprop" in config.name else PPOFinetuneModule
        assert isinstance(cli.model, expected) and cli.model.policy.hparams.spatial_size == 16
        assert (cli.model.policy.latent is not None) == latent
        return
    if kind == "study":  # the plan parses; its arms name components of the reward it is run with
        from msrl.commands.study import build_parser
        from msrl.study.plan import StudyPlan, component_names, read_reward

        args = build_parser().parse_args(["-c", str(config), "--out", str(tmp_path)])
        plan = StudyPlan(pretrained=args.pretrained, reward=args.reward, arms=list(args.arms), seeds=list(args.seeds),
                         finetune_configs=list(args.finetune_configs), evaluate_config=args.evaluate_config,
                         primary=dict(args.primary))
        reward = str(REPO / "configs/rewards/multiscale.yaml")  # scripts/study.sh points the study at a copy of it
        names = component_names(read_reward(reward), reward)
        assert all(set(arm.components or []) <= set(names) for arm in plan.arms) and len(plan.seeds) >= 3
        assert all((REPO / path).is_file() for path in plan.finetune_configs)
        return
    if kind == "extractor":
        from lightning_modules.extractor import SelfSupervisedEncoderModule

        cli = ExtractorTrainingCLI(SelfSupervisedEncoderModule, VolumeDataModule, subclass_mode_model=True,
                                   subclass_mode_data=True, run=False, auto_configure_optimizers=False,
                                   args=["-c", str(config), *ON_CPU,
                                         "--trainer.logger.init_args.save_dir", str(tmp_path)])
        size = 64 if config.name == "template.yaml" else 128  # the demo cohort; a release at the GPU size
        assert isinstance(cli.model, SelfSupervisedEncoderModule) and cli.model.hparams.spatial_size == size
        return
    if kind == "evaluate":
        from lightning_modules.extractor import SelfSupervisedEncoderModule
        from msrl.commands.evaluate import build_parser, normalise_argv
        from msrl.evaluation.extractors import FeatureExtractor

        # the config reads the encoder msrl train-extractor writes: an untrained one stands in for it
        encoder = SelfSupervisedEncoderModule(spatial_size=64, channels=(4, 4))
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
        trainer.strategy.connect(encoder)
        trainer.save_checkpoint(tmp_path / "extractor.ckpt")
        text = re.sub(r"runs/extractor\w*/version_0/checkpoints/last.ckpt", str(tmp_path / "extractor.ckpt"),
                      config.read_text()).replace("data: ../data/", f"data: {REPO}/configs/data/")
        (tmp_path / "evaluate.yaml").write_text(text)
        parser = build_parser()
        built = parser.instantiate_classes(parser.parse_args(normalise_argv(
            ["-c", str(tmp_path / "evaluate.yaml"), "--checkpoint", "x.ckpt", "--out", str(tmp_path / "eval")])))
        assert isinstance(built.data, VolumeDataModule) and built.extractors
        assert all(isinstance(e, FeatureExtractor) for e in built.extractors)
        return
    if kind == "controlnet":  # over an untrained latent base of the config's size: 64³ (template), 4-channel 128³
        from lightning_modules.controlnet import ControlNetModule
        from msrl.commands.training import ControlNetCLI

        size, channels = (64, 1) if config.name == "template.yaml" else (128, 4)
        base = DiffusionModule(in_channels=channels, spatial_size=size, channels=(8, 8),
                               attention_levels=(False, False), norm_num_groups=8, num_head_channels=8,
                               autoencoder_checkpoint=str(autoencoders[size, channels]))
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
        trainer.strategy.connect(base)
        trainer.save_checkpoint(tmp_path / "base.ckpt")
        cli = ControlNetCLI(ControlNetModule, VolumeDataModule, subclass_mode_data=True, run=False,
                            auto_configure_optimizers=False,
                            args=["-c", str(config), "--model.base_checkpoint", str(tmp_path / "base.ckpt"), *ON_CPU,
                                  "--trainer.logger.init_args.save_dir", str(tmp_path)])
        assert isinstance(cli.model, ControlNetModule) and cli.model.hparams.spatial_size == size
        assert cli.model.hparams.in_channels == cli.datamodule.num_channels == channels
        return
    if kind == "rewards":
        cli = RewardTrainingCLI(RewardNetworkModule, L.LightningDataModule, subclass_mode_model=True,
                                subclass_mode_data=True, run=False, auto_configure_optimizers=False,
                                args=["-c", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path)])
        assert isinstance(cli.model, RewardNetworkModule) and cli.model.hparams.spatial_size == 32
        return
    if kind == "autoencoder":
        cli = AutoencoderCLI(FirstStageModule, VolumeDataModule, subclass_mode_model=True, subclass_mode_data=True,
                             run=False, auto_configure_optimizers=False,
                             args=[*_config_args(config), *ON_CPU, "--trainer.logger.init_args.save_dir",
                                   str(tmp_path)])
        assert isinstance(cli.model, AutoencoderModule) and cli.trainer.gradient_clip_val is None
        assert cli.model.settings.gradient_clip_val == 1.0  # the module clips instead
        assert cli.model.hparams.spatial_size == cli.datamodule.spatial_size
        return
    arguments = _arguments_for(config)
    text = config.read_text()
    if kind == "pretrain" and "template" not in config.name:  # latent on a release: 128³, BraTS has 4 sequences
        arguments += ["--model.autoencoder_checkpoint", str(autoencoders[128, 1 if "oasis" in config.name else 4])]
    elif kind == "pretrain" and "autoencoder_checkpoint:" in text:  # the latent template: 64³
        size, channels = 64, 1
        arguments += ["--model.autoencoder_checkpoint", str(autoencoders[size, channels])]
    cli = _instantiate(arguments, tmp_path)
    assert isinstance(cli.model, DiffusionModule) and isinstance(cli.datamodule, VolumeDataModule)
    # The data module's shape reaches the model through the CLI's links.
    assert cli.model.hparams.spatial_size == cli.datamodule.spatial_size
    assert cli.model.hparams.in_channels == cli.datamodule.num_channels


def test_a_data_set_file_holds_only_what_differs_from_its_base() -> None:
    """configs/<stage>/brats2019.yaml and oasis1.yaml are short: the shared settings are in base.yaml once."""
    for stage in ("autoencoder", "pretrain", "finetune"):
        base = "\n".join(line for line in (REPO / "configs" / stage / "base.yaml").read_text().splitlines()
                         if not line.startswith("#"))
        for name in ("brats2019", "oasis1"):
            keys = [line for line in (REPO / "configs" / stage / f"{name}.yaml").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
            # fine-tuning's file also names the held-out guard's reference data (the data set's val split)
            assert len(keys) <= (10 if stage == "finetune" else 6), (stage, name, keys)
        assert "brats" not in base.lower() and "oasis" not in base.lower()


def test_every_finetune_config_runs_the_study_settings_and_the_guard() -> None:
    """The advantage and timestep settings the study supports everywhere; the held-out guard on every data set."""
    import yaml

    for config in sorted((REPO / "configs" / "finetune").glob("*.yaml")):
        node = yaml.safe_load(config.read_text())
        model = node.get("model") or {}
        if "backprop" in config.name:  # no advantages or PPO steps: its guard (on the template) is below
            assert model["class_path"] == "lightning_modules.RewardBackpropModule", config
            model = {"advantage_mode": "batch", "timestep_fraction": 1.0}
        if config.name in ("brats2019.yaml", "oasis1.yaml"):
            guard = node["trainer"]["callbacks"][0]
            assert guard["class_path"] == "msrl.evaluation.HeldoutFIDGuard", config
            assert guard["init_args"]["data"] == f"../data/{config.name}", config
            continue
        # the CPU template runs half the steps per update (study 4's PPO arm, for time); the GPU configs every step
        assert model["advantage_mode"] == "batch", config
        assert model["timestep_fraction"] == (0.5 if config.name == "template_latent.yaml" else 1.0), config
        if not config.name.startswith("base"):
            assert node["trainer"]["callbacks"][0]["class_path"] == "msrl.evaluation.HeldoutFIDGuard", config


def test_the_noise_schedule_is_written_once() -> None:
    """No config repeats the schedule: the code default (with --print_config) is the one place."""
    for config in (REPO / "configs").rglob("*.yaml"):
        assert "beta_start" not in config.read_text(), config


def test_every_key_is_commented() -> None:
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        for number, line in enumerate(config.read_text().splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#") or text.startswith("- class_path") or text.endswith(":"):
                continue  # comments, list items naming a class, and section headers
            if text.startswith("class_path:") or text == "init_args:":
                continue
            assert "#" in line, f"{config.relative_to(REPO)}:{number} has no comment: {text}"


def test_slurm_trainer_requeues_on_sigusr1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "msrl", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    cli = _instantiate(_arguments_for(REPO / "configs/trainer/slurm_ddp.yaml"), tmp_path)
    environment = cli.trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.job_id() == 42


def test_the_demo_configs_read_one_cohort() -> None:
    """Every stage of the 64³ demo reads the same cohort and split: a model trained on one split and
    evaluated on another cohort would meet its own training volumes in the held-out reference."""
    import yaml

    def cohort(path: str, *keys: object) -> dict[str, object]:
        node = yaml.safe_load((REPO / "configs" / path).read_text())
        for key in keys:
            node = node[key]
        fields = ("num_subjects", "val_fraction", "test_fraction", "spatial_size", "template_resolution")
        return {field: node["init_args"].get(field) for field in fields} | {"seed": node["init_args"].get("seed", 0)}

    reference = cohort("evaluate/template.yaml", "data")
    assert reference["num_subjects"] * reference["test_fraction"] >= 64  # >= 32 test volumes per class
    for path, keys in (("autoencoder/template.yaml", ("data",)), ("pretrain/template_latent.yaml", ("data",)),
                       ("extractor/template.yaml", ("data",)), ("controlnet/template.yaml", ("data",)),
                       ("finetune/template_latent.yaml", ("trainer", "callbacks", 0, "init_args", "data"))):
        found = cohort(path, *keys)
        if path.startswith("finetune"):  # the guard's data module needs no loader settings
            assert {k: found[k] for k in reference if found[k] is not None} == \
                {k: reference[k] for k in reference if found[k] is not None}, path
        else:
            assert found == reference, path
    demo = (REPO / "scripts/models.sh").read_text()  # the models of the demo and the study
    expected = (f"cohort=(num_subjects {reference['num_subjects']} spatial_size {reference['spatial_size']} "
                f"template_resolution {reference['template_resolution']} val_fraction {reference['val_fraction']} "
                f"test_fraction {reference['test_fraction']})")
    assert expected in demo


def test_the_templates_hold_the_settings_study_4_measured() -> None:
    """`make demo` runs configs/finetune/template_latent.yaml as it is, and a user the backprop template: their settings
    must be the ones study 4's arms measured (the arm's finetune_args, on top of the same file)."""
    import yaml

    study = yaml.safe_load((REPO / "configs/study/template.yaml").read_text())
    for name, config in (("ppo_multiscale", "template_latent.yaml"), ("backprop_multiscale", "template_backprop.yaml")):
        arm = next(a for a in study["arms"] if a["name"] == name)
        assert arm["finetune_configs"] == [f"configs/finetune/{config}"]
        template = yaml.safe_load((REPO / "configs/finetune" / config).read_text())
        args = arm["finetune_args"]
        overrides = dict(zip(args[::2], args[1::2], strict=True))
        assert overrides, f"the arm {name} names its settings"
        for option, value in overrides.items():
            section, key = option.removeprefix("--").split(".", 1)
            node = template[section].get("init_args", template[section]) if section == "model" else template[section]
            assert float(node[key]) == float(value), (config, option, node[key], value)
    arm = next(a for a in study["arms"] if a["name"] == "ppo_multiscale")
    assert "multiscale_critics.yaml" in (REPO / "scripts/demo.sh").read_text()  # the arm's two critics ...
    full = yaml.safe_load((REPO / "configs/rewards/multiscale_differentiable.yaml").read_text())["init_args"]
    critics = yaml.safe_load((REPO / "configs/rewards/multiscale_critics.yaml").read_text())["init_args"]
    keep = [i for i, c in enumerate(full["components"]) if c["init_args"]["name"] in arm["components"]]
    assert critics["components"] == [full["components"][i] for i in keep]  # ... as the study selects them
    assert critics["weights"] == [full["weights"][i] for i in keep]
    assert {k: v for k, v in critics.items() if k not in ("components", "weights")} == \
        {k: v for k, v in full.items() if k not in ("components", "weights")}
