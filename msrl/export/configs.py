"""The MONAI networks of an exported bundle and its `configs/inference.json`.

The bundle rebuilds MONAI's own classes (`DiffusionModelUNet`, `VQVAE` or `AutoencoderKL`,
`DDIMScheduler`, `LatentDiffusionInferer`) from the arguments found here; `check_networks` builds
them in msrl's process and loads the exported weights strictly, so an export whose arguments no
longer match msrl's modules fails at export time, not on a colleague's machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.nets import VQVAE, AutoencoderKL, ControlNet, DiffusionModelUNet

from lightning_modules import (
    AutoencoderModule,
    ControlNetModule,
    DiffusionModule,
    FirstStageModule,
    KLAutoencoderModule,
)
from lightning_modules.controlnet import label_channels

UNET_FILE, AUTOENCODER_FILE, SCHEDULE_FILE = "diffusion_unet.pt", "autoencoder.pt", "noise_schedule.pt"
CONTROLNET_FILE = "controlnet.pt"


@dataclass(frozen=True)
class Sampler:
    """The sampler a bundle uses by default (overridable at `monai.bundle run` time), as in `msrl sample`."""

    steps: int = 50  # DDIM steps
    eta: float = 0.0  # DDIM η (0: deterministic)
    guidance_scale: float = 1.0  # classifier-free guidance weight (1: none)
    seed: int = 0  # seed of batch k: seed + k·batch_size
    batch_size: int = 4  # volumes per forward pass (part of what seeds a volume)
    num_samples: int = 1  # volumes per requested class
    classes: list[int] | None = field(default=None)  # requested classes (None: every class)


def unet_arguments(model: DiffusionModule) -> dict[str, Any]:
    """Constructor arguments of the model's `DiffusionModelUNet` (as DiffusionModule builds it)."""
    hp = model.hparams
    channels = model.sample_shape[0]
    return {"spatial_dims": 3, "in_channels": channels, "out_channels": channels, "channels": list(hp.channels),
            "attention_levels": list(hp.attention_levels), "num_res_blocks": int(hp.num_res_blocks),
            "num_head_channels": int(hp.num_head_channels), "norm_num_groups": int(hp.norm_num_groups),
            "num_class_embeds": int(hp.num_classes) + 1 if hp.num_classes > 0 else None,
            "use_flash_attention": bool(hp.use_flash_attention)}


def first_stage_network(autoencoder: FirstStageModule) -> tuple[str, dict[str, Any]]:
    """MONAI class path and constructor arguments of a first stage's network (VQ-GAN or KL autoencoder)."""
    hp = autoencoder.hparams
    if isinstance(autoencoder, AutoencoderModule):
        levels = int(hp.downsample_levels)
        res = hp.num_res_channels
        return "monai.networks.nets.VQVAE", {
            "spatial_dims": 3, "in_channels": int(hp.in_channels), "out_channels": int(hp.in_channels),
            "channels": list(hp.channels), "num_res_layers": int(hp.num_res_layers),
            "num_res_channels": res if isinstance(res, int) else list(res),
            "downsample_parameters": [[2, 4, 1, 1]] * levels, "upsample_parameters": [[2, 4, 1, 1, 0]] * levels,
            "num_embeddings": int(hp.num_embeddings), "embedding_dim": int(hp.embedding_dim),
            "commitment_cost": float(hp.commitment_cost), "decay": float(hp.codebook_decay)}
    if isinstance(autoencoder, KLAutoencoderModule):
        return "monai.networks.nets.AutoencoderKL", {
            "spatial_dims": 3, "in_channels": int(hp.in_channels), "out_channels": int(hp.in_channels),
            "channels": list(hp.channels), "num_res_blocks": int(hp.num_res_blocks),
            "attention_levels": [False] * len(hp.channels), "latent_channels": int(hp.latent_channels),
            "norm_num_groups": int(hp.norm_num_groups), "with_encoder_nonlocal_attn": bool(hp.attention),
            "with_decoder_nonlocal_attn": bool(hp.attention)}
    raise ValueError(f"first stage {type(autoencoder).__name__} cannot be exported: a bundle rebuilds MONAI's VQVAE "
                     "(lightning_modules.AutoencoderModule) or AutoencoderKL (lightning_modules.KLAutoencoderModule)")


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples some MONAI constructors insist on (nested parameters)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def check_networks(unet_args: dict[str, Any], unet_state: dict[str, torch.Tensor],
                   first_stage: tuple[str, dict[str, Any]] | None, first_stage_state: dict[str, torch.Tensor] | None
                   ) -> None:
    """Build the bundle's MONAI networks from these arguments and load the weights strictly (raises on mismatch)."""
    DiffusionModelUNet(**{k: _tuples(v) for k, v in unet_args.items()}).load_state_dict(unet_state)
    if first_stage is not None:
        classes = {"monai.networks.nets.VQVAE": VQVAE, "monai.networks.nets.AutoencoderKL": AutoencoderKL}
        network = classes[first_stage[0]]
        network(**{k: _tuples(v) for k, v in first_stage[1].items()}).load_state_dict(first_stage_state)


def scheduler_arguments(model: DiffusionModule) -> dict[str, Any]:
    """`DDIMScheduler` arguments of msrl's sampler: the training T and prediction type, x0 clipped in voxel space.

    The exact betas travel in `models/noise_schedule.pt` (any beta schedule), set by `scripts.sampler.set_betas`.
    """
    schedule = model.noise_scheduler
    return {"num_train_timesteps": int(schedule.num_train_timesteps), "prediction_type": str(schedule.prediction_type),
            "clip_sample": model.latent is None, "set_alpha_to_one": True}


def inference_config(model: DiffusionModule, first_stage: tuple[str, dict[str, Any]] | None,
                     sampler: Sampler) -> dict[str, Any]:
    """`configs/inference.json`: MONAI builds the networks, scheduler and inferer; `scripts.sampler` samples.

    Override any top-level key at run time, e.g. `--num_samples 4 --classes "[1]" --seed 7`.
    """
    config: dict[str, Any] = {
        "imports": ["$import os", "$import torch", "$import scripts"],  # scripts/: the bundle's sampler
        # the folder holding scripts/ (MONAI puts it on sys.path): the bundle runs from any working directory
        "bundle_root": "$os.path.dirname(os.path.dirname(os.path.abspath(scripts.__file__)))",
        "output_dir": "$os.path.join(@bundle_root, 'samples')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "num_samples": sampler.num_samples,
        "classes": sampler.classes,
        "num_inference_steps": sampler.steps,
        "eta": sampler.eta,
        "guidance_scale": sampler.guidance_scale,
        "seed": sampler.seed,
        "batch_size": sampler.batch_size,
        "network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **unet_arguments(model)},
        "network": f"$scripts.sampler.load_weights(@network_def, os.path.join(@bundle_root, 'models', '{UNET_FILE}'))",
        "noise_scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", **scheduler_arguments(model)},
        "scheduler": f"$scripts.sampler.set_betas(@noise_scheduler, os.path.join(@bundle_root, 'models', "
                     f"'{SCHEDULE_FILE}'))",
    }
    if first_stage is None:
        config["inferer"] = {"_target_": "monai.inferers.DiffusionInferer", "scheduler": "@scheduler"}
    else:
        class_path, arguments = first_stage
        config["autoencoder_def"] = {"_target_": class_path, **arguments}
        config["autoencoder"] = (f"$scripts.sampler.load_weights(@autoencoder_def, os.path.join(@bundle_root, "
                                 f"'models', '{AUTOENCODER_FILE}'))")
        config["inferer"] = {"_target_": "monai.inferers.LatentDiffusionInferer", "scheduler": "@scheduler",
                             "scale_factor": float(model.latent.scale_factor)}
    config["sampler"] = {"_target_": "scripts.sampler.ConditionalSampler", "network": "@network",
                         "inferer": "@inferer", "sample_shape": list(model.sample_shape),
                         "num_classes": int(model.hparams.num_classes),
                         "autoencoder": None if first_stage is None else "@autoencoder",
                         "decode_batch_size": 4 if model.latent is None else int(model.latent.decode_batch_size),
                         "affine": [list(row) for row in torch.eye(4).tolist()]}
    config["run"] = ["$@sampler(@output_dir, @classes, num_samples=@num_samples, "
                     "num_inference_steps=@num_inference_steps, eta=@eta, guidance_scale=@guidance_scale, "
                     "seed=@seed, batch_size=@batch_size, device=@device)"]
    return config


def controlnet_arguments(module: ControlNetModule) -> dict[str, Any]:
    """Constructor arguments of the module's MONAI `ControlNet` (as ControlNetModule builds it on its base)."""
    unet = unet_arguments(module.base)
    return {**{key: unet[key] for key in ("spatial_dims", "in_channels", "channels", "attention_levels",
                                          "num_res_blocks", "num_head_channels", "norm_num_groups",
                                          "num_class_embeds", "use_flash_attention")},
            "conditioning_embedding_in_channels": len(module.mask_labels),
            "conditioning_embedding_num_channels": list(module.embedding_channels)}


def check_controlnet(arguments: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Build the bundle's `ControlNet` from these arguments and load its weights strictly (raises on mismatch)."""
    ControlNet(**{k: _tuples(v) for k, v in arguments.items()}).load_state_dict(state)


def mask_inference_config(module: ControlNetModule, first_stage: tuple[str, dict[str, Any]] | None,
                          sampler: Sampler, model: DiffusionModule | None = None) -> dict[str, Any]:
    """`configs/inference.json` of a ControlNet bundle: the networks of `model` (None: the ControlNet's base; else
    one of the base's architecture, e.g. fine-tuned under the ControlNet) plus the ControlNet and the mask rules.

    Run it with `--mask seg.nii.gz` (a file or a folder); override `label`, `num_samples`, `seed`, … likewise.
    """
    config = inference_config(module.base if model is None else model, first_stage, sampler)
    del config["classes"]
    config["imports"] = [*config["imports"], "$import scripts.masks"]  # scripts/masks.py: msrl's mask_files
    config["output_dir"] = None  # None: each volume beside its mask
    channels = label_channels(module.mask_labels)
    config.update({
        "mask": None,  # a NIfTI lesion mask or a folder of them (required)
        "label": "auto",  # the class of every volume; "auto": 1 for a mask with a lesion voxel, else 0
        "overwrite": False,  # replace volumes drawn before
        "controlnet_def": {"_target_": "monai.networks.nets.ControlNet", **controlnet_arguments(module)},
        "controlnet": f"$scripts.sampler.load_weights(@controlnet_def, os.path.join(@bundle_root, 'models', "
                      f"'{CONTROLNET_FILE}'))",
        "mask_rules": {"_target_": "scripts.masks.MaskRules", "size": int(module.hparams.spatial_size),
                       "labels": [c["label"] for c in channels], "meanings": [c["meaning"] for c in channels]},
    })
    base_sampler = config.pop("sampler")
    del base_sampler["affine"]  # the volumes take their masks' affines
    config["sampler"] = {**base_sampler, "_target_": "scripts.sampler.MaskSampler", "controlnet": "@controlnet",
                         "mask_files": "$scripts.masks", "mask_rules": "@mask_rules",
                         "conditioning": str(module.hparams.conditioning),
                         "conditioning_scale": float(module.hparams.conditioning_scale)}
    config["run"] = ["$@sampler(@mask, @output_dir, label=@label, num_samples=@num_samples, "
                     "num_inference_steps=@num_inference_steps, eta=@eta, guidance_scale=@guidance_scale, "
                     "seed=@seed, batch_size=@batch_size, device=@device, overwrite=@overwrite)"]
    return config

