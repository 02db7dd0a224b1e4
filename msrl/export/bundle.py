"""`export_bundle`: a generator checkpoint → a MONAI bundle folder, written all or nothing.

```
configs/inference.json   MONAI builds the UNet, first stage, DDIMScheduler and inferer; scripts.sampler samples
configs/metadata.json    MONAI's metadata + the model card's facts
models/*.pt              state dicts of plain tensors (torch.load(..., weights_only=True))
scripts/sampler.py       the DDIM loop of `msrl sample` (torch, monai, nibabel, numpy only)
docs/README.md           the model card
```
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from datamodules.atomic import atomic_folder
from lightning_modules import DiffusionModule, load_weights
from lightning_modules.diffusion.latent import sha256_of
from msrl.export.card import metadata, readme
from msrl.export.configs import (
    AUTOENCODER_FILE,
    SCHEDULE_FILE,
    UNET_FILE,
    Sampler,
    check_networks,
    first_stage_network,
    inference_config,
    unet_arguments,
)
from msrl.export.provenance import provenance

LORA_KEY = "msrl_lora"  # a LoRA PPO checkpoint: adapters + its base checkpoint, merged on loading
SCRIPT = Path(__file__).with_name("sampler_script.py")


def read_generator(path: str | Path) -> tuple[dict[str, Any], DiffusionModule]:
    """The raw checkpoint and its plain diffusion model; refuses what a bundle cannot carry, saying why.

    A LoRA checkpoint's adapters are merged into its base checkpoint's weights (`from_msrl_checkpoint`
    refuses a missing or changed base), so the bundle carries whole weights either way.
    """
    path = Path(path)
    checkpoint = load_weights(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not an msrl checkpoint")
    if "msrl_diffusion" not in checkpoint:
        if "msrl_autoencoder" in checkpoint:
            raise ValueError(f"checkpoint {path} is a first stage (msrl train-autoencoder), not a generator: export "
                             "the latent diffusion model trained on it (its msrl pretrain or finetune checkpoint)")
        raise ValueError(f"checkpoint {path} was not written by msrl pretrain or msrl finetune (no msrl_diffusion "
                         "entry): msrl export exports generators only")
    try:
        return checkpoint, DiffusionModule.from_msrl_checkpoint(path)
    except ImportError as exc:  # merging LoRA adapters needs PEFT
        raise ValueError(f"checkpoint {path} holds LoRA adapters ({LORA_KEY}) that could not be merged here ({exc}): "
                         f"run `msrl merge-lora --checkpoint {path} --out merged.ckpt` where PEFT is installed and "
                         "export merged.ckpt") from exc


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of contiguous CPU tensors that shares no storage with the model."""
    return {key: value.detach().cpu().contiguous().clone() for key, value in module.state_dict().items()}


def export_bundle(checkpoint_path: str | Path, out: str | Path, sampler: Sampler | None = None, use_ema: bool = True,
                  metrics_path: str | Path | None = None, data_config: str | None = None) -> Path:
    """Write the MONAI bundle of a pretraining or PPO checkpoint into `out` (replaced in one step).

    Args:
        checkpoint_path: a checkpoint of msrl pretrain or msrl finetune (voxel or latent).
        out: the bundle folder.
        sampler: the bundle's default sampler (steps, η, guidance, seed, batch size, samples per class);
            None: `Sampler()`, the defaults of `msrl sample`.
        use_ema: export the EMA weights (what `msrl sample` uses) rather than the raw ones.
        metrics_path: `msrl evaluate`'s metrics.json, whose numbers the model card reports.
        data_config: a data YAML naming the training data, when the checkpoint's run config is not beside it.
    """
    checkpoint_path, sampler = Path(checkpoint_path), sampler or Sampler()
    metrics = _read_metrics(metrics_path)
    checkpoint, model = read_generator(checkpoint_path)
    num_classes = int(model.hparams.num_classes)
    if sampler.classes is not None and any(not 0 <= c < max(num_classes, 1) for c in sampler.classes):
        raise ValueError(f"--classes {sampler.classes}: checkpoint {checkpoint_path} has {num_classes} classes "
                         f"(0..{num_classes - 1})")
    unet = model.ema.module if use_ema else model.unet
    unet_state = _plain_state(unet)
    first_stage, first_state = None, None
    if model.latent is not None:
        first_stage = first_stage_network(model.latent.autoencoder)
        first_state = _plain_state(model.latent.autoencoder.network)
    check_networks(unet_arguments(model), unet_state, first_stage, first_state)
    info = provenance(checkpoint_path, checkpoint, model, data_config)
    info["exported_weights"] = ("EMA" if use_ema else "raw (not EMA)") + \
        (", LoRA adapters merged into the base weights" if LORA_KEY in checkpoint else "")
    config = inference_config(model, first_stage, sampler)
    with atomic_folder(out) as staging:
        for folder in ("configs", "models", "scripts", "docs"):
            (staging / folder).mkdir()
        torch.save(unet_state, staging / "models" / UNET_FILE)
        torch.save({"betas": model.noise_scheduler.betas.detach().cpu().float().clone()},
                   staging / "models" / SCHEDULE_FILE)
        if first_state is not None:
            torch.save(first_state, staging / "models" / AUTOENCODER_FILE)
        weights = {f"models/{f.name}": sha256_of(f) for f in sorted((staging / "models").iterdir())}
        shutil.copyfile(SCRIPT, staging / "scripts" / "sampler.py")
        (staging / "scripts" / "__init__.py").write_text(
            '"""The bundle\'s sampler (torch, monai, nibabel, numpy only)."""\n\nfrom . import sampler  # noqa: F401\n')
        (staging / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
        defaults = {key: config[key] for key in ("num_samples", "classes", "num_inference_steps", "eta",
                                                 "guidance_scale", "seed", "batch_size")}
        (staging / "configs" / "metadata.json").write_text(
            json.dumps(metadata(info, defaults, weights, metrics), indent=2) + "\n")
        (staging / "docs" / "README.md").write_text(readme(info, defaults, weights, metrics))
    return Path(out)


def _read_metrics(path: str | Path | None) -> dict[str, Any] | None:
    """`msrl evaluate`'s metrics.json, checked for the fields the card reads."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--metrics {path} does not exist (msrl evaluate writes metrics.json)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--metrics {path} is not JSON: {exc}") from exc
    missing = [key for key in ("data", "entries", "extractors", "real") if key not in metrics]
    if missing:
        raise ValueError(f"--metrics {path} lacks {missing}: expected the metrics.json written by msrl evaluate")
    return metrics
