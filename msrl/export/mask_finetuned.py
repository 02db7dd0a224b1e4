"""The bundle of a model fine-tuned under a frozen ControlNet: it takes a lesion mask, as its rollouts did.

`msrl finetune` with `controlnet_checkpoint` trains the base UNet while a frozen ControlNet adds its residuals
to every prediction, each rollout drawn from a training mask; `msrl_masks` records that ControlNet's file and
SHA-256. Such a model draws from masks only with that ControlNet (`msrl.samples.MaskFinetuned`), so its bundle
is a ControlNet bundle (msrl/export/controlnet.py) whose UNet is the fine-tuned one (LoRA adapters merged) and
whose ControlNet is the recorded one's EMA: it draws what `msrl sample --checkpoint <it> --mask …` draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_modules import ControlNetModule
from lightning_modules.controlnet.module import check_architecture
from lightning_modules.diffusion.lora import LORA_KEY
from lightning_modules.finetune.masks import MASKS_KEY
from msrl.export.configs import Sampler, mask_inference_config
from msrl.export.controlnet import MASK_DEFAULTS, MASK_SCRIPTS, check_per_mask, controlnet_summary, mask_weights
from msrl.export.generator import read_generator
from msrl.export.provenance import plain, provenance
from msrl.export.writer import BundleContents
from msrl.samples.from_masks import recorded_controlnet


def mask_finetuned_contents(checkpoint_path: Path, checkpoint: dict[str, Any], sampler: Sampler, use_ema: bool,
                            data_config: str | None) -> BundleContents:
    """Weights, `inference.json` and the card's facts of a mask-fine-tuned checkpoint's bundle.

    The recorded ControlNet is refused (naming the file) when missing or changed, as are its base and, for
    LoRA, the adapters' base. `use_ema` picks the fine-tuned UNet's weights; the ControlNet's are always its
    EMA, which conditioned the rollouts and conditions `msrl sample`.
    """
    check_per_mask(sampler)
    controlnet_path = recorded_controlnet(checkpoint_path, checkpoint)
    checkpoint, model = read_generator(checkpoint_path, checkpoint)
    module = ControlNetModule.from_msrl_checkpoint(controlnet_path)
    check_architecture(model, module.base, module.base_path)
    weights, first_stage = mask_weights(model, model.ema.module if use_ema else model.unet, module,
                                        module.ema.module)
    info = provenance(checkpoint_path, checkpoint, model, data_config)
    record = checkpoint[MASKS_KEY]
    info["checkpoint"]["kind"] += " under a ControlNet (mask-conditioned)"
    info["controlnet"] = controlnet_summary(module, record["controlnet"])
    info["mask_finetuning"] = {"controlnet_checkpoint": str(controlnet_path),
                               "controlnet_sha256": record["controlnet_sha256"],
                               "mask_data": plain(record.get("mask_data")), "pool_size": record.get("pool_size"),
                               "pool_sha256": record.get("pool_sha256")}
    info["exported_weights"] = (f"fine-tuned UNet {'EMA' if use_ema else 'raw (not EMA)'}"
                                + (", LoRA adapters merged into the base weights" if LORA_KEY in checkpoint else "")
                                + "; ControlNet EMA (the frozen conditioner the rollouts were drawn through)")
    return BundleContents(weights, mask_inference_config(module, first_stage, sampler, model), info, MASK_DEFAULTS,
                          scripts=dict(MASK_SCRIPTS))
