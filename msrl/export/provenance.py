"""What an exported generator was trained on and how: read from its checkpoint, its run's config and the repository.

Everything here is plain data (JSON-ready) for the model card: the data set and its split sizes,
pretraining and fine-tuning settings (the algorithm and the module's settings, as `FinetuneBase` records
them in `msrl_finetune`) with the reward's components and weights, the first stage, and msrl's version
and commit. A pretraining run's `config.yaml` (LightningCLI writes it beside `checkpoints/`) names the
data; a fine-tuned checkpoint leads there through its `init_checkpoint`.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from datamodules.base import VolumeDataModule
from datamodules.digest import sha256_of
from datamodules.splits import stratified_split
from lightning_modules import DiffusionModule
from lightning_modules.diffusion.lora import LORA_KEY
from lightning_modules.finetune import FINETUNE_KEY, REWARD_KEY, ROLLOUT_KEY

# DiffusionModule arguments the card states in its model and first-stage sections, not among the pretraining settings
PRETRAIN_STATED_ELSEWHERE = frozenset({"in_channels", "spatial_size", "num_classes", "noise_scheduler",
                                       "autoencoder_checkpoint", "decode_batch_size", "decode_tile_size",
                                       "decode_overlap", "decode_blend"})
LEGACY_FINETUNE = {"algorithm": "PPO", "class_path": "lightning_modules.PPOFinetuneModule"}  # before msrl_finetune


def plain(value: Any) -> Any:
    """JSON-ready copy of hyper-parameter values (tuples → lists, tensors → numbers, others → str)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def module_settings(module: Any, stated_elsewhere: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every setting a module was built with, from its saved hyper-parameters, less those stated elsewhere.

    `save_hyperparameters` records every `__init__` argument, so a setting added to the class reaches the
    card without anyone listing it. Keys starting with "_" (LightningCLI's bookkeeping) are left out.
    """
    return plain({key: value for key, value in dict(module.hparams).items()
                  if not str(key).startswith("_") and key not in stated_elsewhere})


def msrl_version() -> str:
    """The installed msrl's version (pyproject.toml's), or "unknown" when msrl runs from a bare checkout."""
    try:
        return version("msrl")
    except PackageNotFoundError:
        return "unknown"


def repository_commit() -> str:
    """The git commit msrl runs from (`+uncommitted` when the tree differs), or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parents[2]  # msrl/export/provenance.py → the repository
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+uncommitted" if dirty else "")


def run_config(checkpoint_path: Path) -> dict[str, Any] | None:
    """The `config.yaml` of the run that wrote `runs/<name>/version_<n>/checkpoints/<file>.ckpt` (None if absent)."""
    candidate = checkpoint_path.resolve().parent.parent / "config.yaml"
    if not candidate.is_file():
        return None
    loaded = yaml.safe_load(candidate.read_text())
    return loaded if isinstance(loaded, dict) else None


def data_module(config: dict[str, Any], source: str) -> VolumeDataModule:
    """Instantiate a data module from `{class_path, init_args}` (a data YAML, or a run config's `data`)."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(VolumeDataModule, "data", required=True)
    try:
        return parser.instantiate_classes(parser.parse_object({"data": config})).data
    except Exception as exc:  # jsonargparse raises many types; the user needs the file and the reason
        raise ValueError(f"{source}: the data configuration could not be built ({exc}); expected class_path and "
                         "init_args of a VolumeDataModule, e.g. configs/data/template.yaml") from exc


def data_summary(data: VolumeDataModule, source: str) -> dict[str, Any]:
    """Data set, image size, classes and split sizes per label (from the cache index training used, else a scan)."""
    index = data.cache_path / "index.json"
    if index.is_file():
        records = [record for record, _ in data.read_index()]
        origin = f"the preprocessed cache {index}"
    else:
        records, origin = data.list_subjects(), "a scan of the data on disk (no preprocessed cache found)"
    split = stratified_split([r.label for r in records], data.val_fraction, data.test_fraction, data.seed)
    splits = {name: {"subjects": len(indices), "per_label": dict(sorted(Counter(records[i].label for i in indices)
                                                                          .items()))}
              for name, indices in split.items()}
    return {"class_path": f"{type(data).__module__.split('.')[0]}.{type(data).__name__}", "source": source,
            "channels": list(data.channel_names), "num_classes": int(data.num_classes),
            "spatial_size": int(data.spatial_size), "split_seed": int(data.seed), "splits": plain(splits),
            "subjects": len(records), "counted_from": origin}


def training_data(checkpoint_path: Path, checkpoint: dict[str, Any], data_config: str | None) -> dict[str, Any] | None:
    """The pretraining data (None when neither `--data-config` nor a run config names it)."""
    if data_config is not None:
        loaded = yaml.safe_load(Path(data_config).read_text())
        return data_summary(data_module(loaded, data_config), data_config)
    path = checkpoint_path
    init = (checkpoint.get("hyper_parameters") or {}).get("init_checkpoint")
    if ROLLOUT_KEY in checkpoint and init:  # fine-tuned: the data is the pretraining run's
        path = Path(init)
    config = run_config(path)
    if not config or not isinstance(config.get("data"), dict):
        return None
    source = f"{path.resolve().parent.parent / 'config.yaml'} (data)"
    try:
        return data_summary(data_module(config["data"], source), source)
    except (ValueError, OSError) as exc:  # the data is not on this machine: name it, count nothing
        args = config["data"].get("init_args") or {}
        return {"class_path": config["data"].get("class_path"), "source": source, "channels": [],
                "num_classes": None, "spatial_size": args.get("spatial_size"), "split_seed": args.get("seed"),
                "splits": {}, "subjects": "?", "counted_from": f"nothing: the data could not be read here ({exc})"}


def reward_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Components and weights of the reward a fine-tuned checkpoint recorded (`msrl_reward`), with its network files."""
    if not record:
        return None
    config = record.get("config")
    summary: dict[str, Any] = {"class_path": None, "components": [], "weights": None,
                               "networks": plain(record.get("networks") or [])}
    if isinstance(config, dict):
        args = config.get("init_args") or {}
        summary["class_path"] = config.get("class_path")
        summary["weights"] = plain(args.get("weights"))
        summary["normalise"] = args.get("normalise")
        for component in args.get("components") or []:
            component_args = component.get("init_args") or {}
            summary["components"].append({"class_path": component.get("class_path"),
                                          "name": component_args.get("name"), "settings": plain(component_args)})
    elif config is not None:
        summary["class_path"] = str(config)
    return summary


def provenance(checkpoint_path: Path, checkpoint: dict[str, Any], model: DiffusionModule,
               data_config: str | None) -> dict[str, Any]:
    """Everything the model card states about a generator checkpoint, as plain data."""
    hparams = plain(dict(model.hparams))
    finetuned = ROLLOUT_KEY in checkpoint
    record = checkpoint.get(FINETUNE_KEY) or LEGACY_FINETUNE
    info: dict[str, Any] = {
        "checkpoint": {"path": str(checkpoint_path), "sha256": sha256_of(checkpoint_path),
                       "kind": f"{record['algorithm']} fine-tuned" if finetuned else "pretrained",
                       "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")},
        "msrl": {"version": msrl_version(), "commit": repository_commit()},
        "model": {"in_channels": hparams["in_channels"], "spatial_size": hparams["spatial_size"],
                  "num_classes": hparams["num_classes"], "sample_shape": list(model.sample_shape),
                  "prediction_type": str(model.noise_scheduler.prediction_type),
                  "num_train_timesteps": int(model.noise_scheduler.num_train_timesteps)},
        "pretraining": module_settings(model, PRETRAIN_STATED_ELSEWHERE),
        "first_stage": None, "finetuning": None, "data": training_data(checkpoint_path, checkpoint, data_config),
    }
    if model.latent is not None:
        autoencoder = model.latent.autoencoder
        info["first_stage"] = {"class": type(autoencoder).__name__, "path": str(model.latent.path),
                               "sha256": model.latent.sha256, "scale_factor": float(model.latent.scale_factor),
                               "latent_shape": list(model.latent.shape),
                               "decode_batch_size": int(model.latent.decode_batch_size),
                               "decode_tile_size": plain(getattr(model.hparams, "decode_tile_size", None)),
                               "settings": plain({k: v for k, v in autoencoder.hparams.items()
                                                  if k not in ("training", "num_classes")})}
    if finetuned:
        init = (checkpoint.get("hyper_parameters") or {}).get("init_checkpoint")
        info["finetuning"] = {"algorithm": record["algorithm"], "class_path": record["class_path"],
                       "init_checkpoint": init, "settings": finetune_settings(checkpoint),
                       "lora": plain(checkpoint.get(LORA_KEY)),
                       "rollout_sampler": plain(checkpoint[ROLLOUT_KEY]),
                       "reward": reward_summary(checkpoint.get(REWARD_KEY))}
        info["pretraining"]["checkpoint"] = init  # the policy's architecture and pretraining settings are its
        if init and Path(init).is_file():
            info["pretraining"]["checkpoint_sha256"] = sha256_of(init)
    return info


def finetune_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning module's settings: as `msrl_finetune` records them, else (older PPO checkpoints) its
    hyper-parameters; the pretrained checkpoint is stated apart."""
    record = checkpoint.get(FINETUNE_KEY)
    settings = record["settings"] if record else checkpoint.get("hyper_parameters") or {}
    return plain({key: value for key, value in settings.items()
                  if not str(key).startswith("_") and key != "init_checkpoint"})
