"""The training verbs: `msrl pretrain`, `train-autoencoder`, `train-reward`, `train-extractor`, `train-controlnet`
and `finetune`.

Each is a LightningCLI `fit` run of YAML configs under `configs/` (components chosen by
`class_path`, `-c` repeatable, `--print_config` on every verb); msrl/cli.py dispatches to them.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.base import VolumeDataModule
from lightning_modules.callbacks.preemption import StepBoundaryRequeue
from lightning_modules.diffusion.module import DiffusionModule
from lightning_modules.diffusion.noise_schedules import DEFAULT_NOISE_SCHEDULER
from lightning_modules.finetune import DEFAULT_FINETUNER
from lightning_modules.lightning_internals import add_model_instantiator_only


def honour_default_root_dir(config: Any) -> None:
    """`--trainer.default_root_dir DIR` puts the run under DIR: every logger's `save_dir` becomes DIR.

    The configs' TensorBoard logger sets `save_dir: runs`, and Lightning derives the checkpoint
    folder from the logger, so without this a run asked for DIR would still write to runs/.
    """
    root = config.trainer.default_root_dir
    loggers = config.trainer.logger
    if root is None or loggers in (None, True, False):
        return
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            init_args.save_dir = str(root)


class MsrlCLI(LightningCLI):
    """LightningCLI with the data module's shape linked into the model and checkpointing set up."""

    monitor, mode = "val/loss", "min"  # what ranks the best checkpoint
    linked = ("num_channels", "spatial_size", "num_classes")  # data attributes passed to the model
    noise_scheduler_default = True  # the model takes `noise_scheduler` (a DiffusionModule): show its default

    def before_instantiate_classes(self) -> None:
        """Honour `--trainer.default_root_dir` (see `honour_default_root_dir`)."""
        honour_default_root_dir(self.config[self.subcommand] if self.subcommand else self.config)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link `linked` (in_channels/spatial_size/num_classes) from the data; configure ModelCheckpoint."""
        model = "model.init_args" if self.subclass_mode_model else "model"
        for attribute in self.linked:
            target = "in_channels" if attribute == "num_channels" else attribute
            parser.link_arguments("data", f"{model}.{target}", apply_on="instantiate",
                                  compute_fn=lambda data, a=attribute: getattr(data, a))
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Lightning 2.6 writes save_last's last.ckpt only when a top-k checkpoint is written, so after
        # the monitored metric stops improving it would stay the best one; this writes the true last.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.monitor": None, "last_checkpoint.save_top_k": 1,
                             "last_checkpoint.filename": "last", "last_checkpoint.enable_version_counter": False,
                             "last_checkpoint.save_on_train_epoch_end": True})
        parser.add_lightning_class_args(StepBoundaryRequeue, "preemption")  # SLURM's SIGUSR1 at a step boundary
        if not self.subclass_mode_model and self.noise_scheduler_default:
            # shown by --print_config, built fresh per run
            parser.set_defaults({"model.noise_scheduler": DEFAULT_NOISE_SCHEDULER})
        parser.set_defaults({
            "checkpoint.monitor": self.monitor,
            "checkpoint.mode": self.mode,
            "checkpoint.save_last": False,  # last.ckpt comes from last_checkpoint
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-epoch{epoch:03d}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })


class FinetuneCLI(LightningCLI):
    """LightningCLI for the fine-tuners: the module brings its own iteration loader; checkpoints every epoch.

    Built with `FinetuneBase` in subclass mode (as `run_finetune` does), `model.class_path` picks the algorithm
    (`lightning_modules.PPOFinetuneModule`, `lightning_modules.RewardBackpropModule`); a config without one
    builds PPO, as every config did before the choice existed.
    """

    def before_instantiate_classes(self) -> None:
        """Honour `--trainer.default_root_dir` (see `honour_default_root_dir`)."""
        honour_default_root_dir(self.config[self.subcommand] if self.subcommand else self.config)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Keep last.ckpt plus the latest epoch's checkpoint (fine-tuning has no validation metric to rank by)."""
        if self.subclass_mode_model:
            parser.set_defaults({"model": {"class_path": DEFAULT_FINETUNER}})
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(StepBoundaryRequeue, "preemption")  # SLURM's SIGUSR1 at a step boundary
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "iteration-epoch{epoch:03d}",
                             "checkpoint.auto_insert_metric_name": False})

    def _add_instantiators(self) -> None:
        """Only the model's hyper-parameter instantiator: there is no data module to record (see
        `add_model_instantiator_only`)."""
        add_model_instantiator_only(self, self._model_class, self.subclass_mode_model)


def run_finetune(argv: list[str]) -> None:
    """`msrl finetune`: LightningCLI `fit` of a fine-tuner chosen by `model.class_path` (PPO when none is given;
    no data module: it samples)."""
    from lightning_modules.finetune.base import FinetuneBase

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    # The reward and the frozen reference model are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    FinetuneCLI(FinetuneBase, datamodule_class=None, subclass_mode_model=True, args=["fit", *argv],
                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                parser_kwargs={"prog": "msrl finetune"})


class RewardTrainingCLI(MsrlCLI):
    """`msrl train-reward`: the best checkpoint is the one with the highest held-out AUROC."""

    monitor, mode = "val/auroc", "max"


def run_train_reward(argv: list[str]) -> None:
    """`msrl train-reward`: LightningCLI `fit` of a reward network (critics or classifier)."""
    from lightning import LightningDataModule

    from lightning_modules.critics.networks import RewardNetworkModule

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    RewardTrainingCLI(RewardNetworkModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=["fit", *argv], save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                      parser_kwargs={"prog": "msrl train-reward"})


class ExtractorTrainingCLI(MsrlCLI):
    """`msrl train-extractor`: the best checkpoint has the lowest held-out contrastive loss; no labels are linked."""

    monitor, mode = "val/loss", "min"
    linked = ("num_channels", "spatial_size")


def run_train_extractor(argv: list[str]) -> None:
    """`msrl train-extractor`: LightningCLI `fit` of the self-supervised encoder behind the in-domain FID."""
    from lightning_modules.extractor import SelfSupervisedEncoderModule

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    ExtractorTrainingCLI(SelfSupervisedEncoderModule, VolumeDataModule, subclass_mode_model=True,
                         subclass_mode_data=True, args=["fit", *argv], save_config_kwargs={"overwrite": True},
                         auto_configure_optimizers=False, parser_kwargs={"prog": "msrl train-extractor"})


def run_pretrain(argv: list[str]) -> None:
    """`msrl pretrain`: LightningCLI `fit` of a `DiffusionModule` on any `VolumeDataModule`."""
    # sys.argv must stay as it is: Lightning's DDP launcher re-runs it in the other processes.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    MsrlCLI(DiffusionModule, VolumeDataModule, subclass_mode_data=True, args=["fit", *argv],
            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
            parser_kwargs={"prog": "msrl pretrain"})


TRAINING_KEY = "--model.init_args.training."  # a first stage's FirstStageTraining settings on the command line


def null_training_settings(argv: list[str]) -> list[str]:
    """`--model.init_args.training.KEY null` (or `=null`) as `--model.init_args.training {"KEY": null}`.

    jsonargparse 4.53 cannot set a field of a dataclass inside a subclass's init_args to null from
    the command line (it rejects None for `int | None` and turns it into the string "None" for
    `str | None`); the dict form merges into the other settings and works. Other values pass as given.
    """
    out: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        flag, equals, value = argument.partition("=")
        if not flag.startswith(TRAINING_KEY):
            out.append(argument)
            continue
        value = value if equals else next(arguments, "")
        if value in ("null", "None"):
            out += [TRAINING_KEY[:-1], json.dumps({flag[len(TRAINING_KEY):]: None})]
        else:
            out += [flag, value]
    return out


class ControlNetCLI(MsrlCLI):
    """`msrl train-controlnet`: the noise schedule is the base checkpoint's, so the model takes none."""

    noise_scheduler_default = False


def run_train_controlnet(argv: list[str]) -> None:
    """`msrl train-controlnet`: LightningCLI `fit` of a `ControlNetModule` (masks from the data's `seg`)."""
    from lightning_modules.controlnet.module import ControlNetModule

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    ControlNetCLI(ControlNetModule, VolumeDataModule, subclass_mode_data=True, args=["fit", *argv],
                  save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                  parser_kwargs={"prog": "msrl train-controlnet"})


class AutoencoderCLI(MsrlCLI):
    """`msrl train-autoencoder`: the best checkpoint has the lowest val/l1; the module clips its own gradients."""

    monitor, mode = "val/l1", "min"

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, with null training settings passed in the form jsonargparse accepts."""
        super().parse_arguments(parser, null_training_settings(list(args)) if isinstance(args, list) else args)

    def before_instantiate_classes(self) -> None:
        """Set aside a shared trainer file's gradient_clip_val: Lightning cannot clip manual optimisation.

        The module clips both optimisers itself (model.init_args.training.gradient_clip_val); a
        differing trainer value is reported rather than silently lost.
        """
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        training = config.model.init_args.get("training")
        trainer_clip, model_clip = config.trainer.gradient_clip_val, getattr(training, "gradient_clip_val", None)
        if trainer_clip is not None and trainer_clip != model_clip:
            warnings.warn(f"trainer.gradient_clip_val={trainer_clip} is ignored: the autoencoder clips with "
                          f"model.init_args.training.gradient_clip_val={model_clip}", stacklevel=2)
        config.trainer.gradient_clip_val = None


def run_train_autoencoder(argv: list[str]) -> None:
    """`msrl train-autoencoder`: LightningCLI `fit` of the first stage (VQ-GAN or KL, chosen by class_path)."""
    from lightning_modules.first_stage.base import FirstStageModule

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    AutoencoderCLI(FirstStageModule, VolumeDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   args=["fit", *argv], save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                   parser_kwargs={"prog": "msrl train-autoencoder"})
