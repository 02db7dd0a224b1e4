"""The bundle of a ControlNet checkpoint: it takes a lesion mask and draws what `msrl sample --mask` draws.

It carries the base's EMA UNet (what the ControlNet was trained on), the base's first stage when latent,
the ControlNet's weights and the noise schedule, and `scripts/masks.py` (msrl/samples/mask_files.py, copied):
the bundle reads, checks and refuses masks, and writes volumes beside them, exactly as `msrl sample` does.
`mask_weights` and `controlnet_summary` serve the bundle of a model fine-tuned under a ControlNet too
(msrl/export/mask_finetuned.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import msrl.samples.mask_files as mask_files
from datamodules.digest import sha256_of
from lightning_modules import ControlNetModule, DiffusionModule, load_weights
from lightning_modules.controlnet import CONTROLNET_KEY
from msrl.export.configs import (
    AUTOENCODER_FILE,
    CONTROLNET_FILE,
    SCHEDULE_FILE,
    UNET_FILE,
    Sampler,
    check_controlnet,
    check_networks,
    controlnet_arguments,
    first_stage_network,
    mask_inference_config,
    unet_arguments,
)
from msrl.export.provenance import module_settings, plain, provenance, training_data
from msrl.export.writer import SAMPLER_SCRIPT, BundleContents, plain_state

MASK_DEFAULTS = ("num_samples", "label", "num_inference_steps", "eta", "guidance_scale", "seed", "batch_size")
MASK_SCRIPTS = {"sampler": SAMPLER_SCRIPT, "masks": Path(mask_files.__file__)}  # the sampler and the mask checks
# ControlNetModule arguments `controlnet_summary` states apart from its training settings
CONTROLNET_STATED_ELSEWHERE = frozenset({"base_checkpoint", "in_channels", "spatial_size", "num_classes",
                                         "mask_labels", "conditioning", "embedding_channels", "conditioning_scale"})


def check_per_mask(sampler: Sampler) -> None:
    """Refuse default classes for a bundle that draws per mask (each mask's class, or `--label` at run time)."""
    if sampler.classes is not None:
        raise ValueError(f"--classes {sampler.classes}: a ControlNet bundle draws per mask, each of the mask's class "
                         "(label auto: 1 with a lesion voxel, else 0) or of --label given at run time")


def mask_weights(model: DiffusionModule, unet: torch.nn.Module, module: ControlNetModule,
                 controlnet: torch.nn.Module) -> tuple[dict[str, dict[str, torch.Tensor]], tuple[str, Any] | None]:
    """The weight files of a bundle drawing from masks and its first stage's MONAI network (None in voxel space).

    `unet` (a UNet of `model`) and `controlnet` (of `module`) are checked to load strictly into the MONAI networks
    the bundle builds; the first stage and the noise schedule are `model`'s.
    """
    weights = {UNET_FILE: plain_state(unet), CONTROLNET_FILE: plain_state(controlnet)}
    first_stage = None
    if model.latent is not None:
        first_stage = first_stage_network(model.latent.autoencoder)
        weights[AUTOENCODER_FILE] = plain_state(model.latent.autoencoder.network)
    check_networks(unet_arguments(model), weights[UNET_FILE], first_stage, weights.get(AUTOENCODER_FILE))
    check_controlnet(controlnet_arguments(module), weights[CONTROLNET_FILE])
    weights[SCHEDULE_FILE] = {"betas": model.noise_scheduler.betas.detach().cpu().float().clone()}
    return weights, first_stage


def controlnet_contents(checkpoint_path: Path, checkpoint: dict[str, Any], sampler: Sampler, use_ema: bool,
                        data_config: str | None) -> BundleContents:
    """Weights, `inference.json` and the card's facts of a ControlNet checkpoint's bundle (base refused if changed)."""
    check_per_mask(sampler)
    module = ControlNetModule.from_msrl_checkpoint(checkpoint_path)
    base = module.base
    # the ControlNet steers the base's EMA weights
    weights, first_stage = mask_weights(base, base.ema.module, module, module.ema.module if use_ema else
                                        module.controlnet)
    info = provenance(module.base_path, load_weights(module.base_path), base, data_config)
    if data_config is None:  # the data the ControlNet was trained on, from its own run's config.yaml
        info["data"] = training_data(checkpoint_path, checkpoint, None) or info["data"]
    info["base_checkpoint"] = info["checkpoint"]
    info["checkpoint"] = {"path": str(checkpoint_path), "sha256": sha256_of(checkpoint_path),
                          "kind": f"ControlNet on a {info['base_checkpoint']['kind']}",
                          "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}
    info["controlnet"] = controlnet_summary(module, checkpoint[CONTROLNET_KEY])
    info["exported_weights"] = (f"ControlNet {'EMA' if use_ema else 'raw (not EMA)'}; base UNet EMA (the weights the "
                                "ControlNet was trained on)")
    return BundleContents(weights, mask_inference_config(module, first_stage, sampler), info, MASK_DEFAULTS,
                          scripts=dict(MASK_SCRIPTS))


def controlnet_summary(module: ControlNetModule, record: dict[str, Any]) -> dict[str, Any]:
    """The card's ControlNet facts from its `msrl_controlnet` record: its base, label channels, conditioning and
    training settings."""
    hparams = plain(dict(module.hparams))
    return {"base_checkpoint": record["base_checkpoint"], "base_sha256": record["base_sha256"],
            "label_channels": plain(record["label_channels"]), "mask_size": int(hparams["spatial_size"]),
            "conditioning": hparams["conditioning"], "conditioning_scale": hparams["conditioning_scale"],
            "embedding_channels": list(module.embedding_channels),
            "training": module_settings(module, CONTROLNET_STATED_ELSEWHERE)}
