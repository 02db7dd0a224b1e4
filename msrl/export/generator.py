"""The bundle of a diffusion checkpoint (pretrained or fine-tuned, LoRA adapters merged): it draws per class.

`read_generator` reads the checkpoint's plain diffusion model, refusing what a bundle cannot carry; the bundles
that draw from masks (msrl/export/controlnet.py, msrl/export/mask_finetuned.py) build on what is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_modules import DiffusionModule, load_weights
from lightning_modules.diffusion import DIFFUSION_KEY
from lightning_modules.diffusion.lora import LORA_KEY  # a LoRA checkpoint: adapters + its base, merged on loading
from lightning_modules.first_stage import AUTOENCODER_KEY
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
from msrl.export.writer import BundleContents, plain_state

CLASS_DEFAULTS = ("num_samples", "classes", "num_inference_steps", "eta", "guidance_scale", "seed", "batch_size")


def read_generator(path: str | Path, checkpoint: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], DiffusionModule]:
    """The raw checkpoint (read unless given) and its plain diffusion model; refuses what a bundle cannot carry.

    A LoRA checkpoint's adapters are merged into its base checkpoint's weights (`from_msrl_checkpoint`
    refuses a missing or changed base), so the bundle carries whole weights either way.
    """
    path = Path(path)
    checkpoint = load_weights(path) if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not an msrl checkpoint")
    if DIFFUSION_KEY not in checkpoint:
        if AUTOENCODER_KEY in checkpoint:
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


def generator_contents(checkpoint_path: Path, sampler: Sampler, use_ema: bool, data_config: str | None,
                       checkpoint: dict[str, Any] | None = None) -> BundleContents:
    """The bundle of a diffusion checkpoint: its (EMA) UNet, first stage and schedule, drawing per class."""
    checkpoint, model = read_generator(checkpoint_path, checkpoint)
    num_classes = int(model.hparams.num_classes)
    if sampler.classes is not None and any(not 0 <= c < max(num_classes, 1) for c in sampler.classes):
        raise ValueError(f"--classes {sampler.classes}: checkpoint {checkpoint_path} has {num_classes} classes "
                         f"(0..{num_classes - 1})")
    weights = {UNET_FILE: plain_state(model.ema.module if use_ema else model.unet)}
    first_stage = None
    if model.latent is not None:
        first_stage = first_stage_network(model.latent.autoencoder)
        weights[AUTOENCODER_FILE] = plain_state(model.latent.autoencoder.network)
    check_networks(unet_arguments(model), weights[UNET_FILE], first_stage, weights.get(AUTOENCODER_FILE))
    weights[SCHEDULE_FILE] = {"betas": model.noise_scheduler.betas.detach().cpu().float().clone()}
    info = provenance(checkpoint_path, checkpoint, model, data_config)
    info["exported_weights"] = ("EMA" if use_ema else "raw (not EMA)") + \
        (", LoRA adapters merged into the base weights" if LORA_KEY in checkpoint else "")
    return BundleContents(weights, inference_config(model, first_stage, sampler), info, CLASS_DEFAULTS)
