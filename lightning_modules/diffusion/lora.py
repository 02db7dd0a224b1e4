"""LoRA adapters on a diffusion UNet (PEFT): add them, switch them off, average them, merge them, load them.

PPO with `lora_rank > 0` trains low-rank adapters (Hu et al. 2022) on chosen Conv3d/Linear layers of a
frozen pretrained UNet. The frozen base with its adapters switched off is the KL reference, so no second
copy of the UNet is kept; the EMA averages the adapters only and shares the base weights. A LoRA
checkpoint stores the adapters and `msrl_lora` = {rank, alpha, targets, base_checkpoint, base_sha256,
base_weights}; `load_lora_model` rebuilds base + adapters (refusing a missing or changed base file)
and merges them, so `msrl sample`/`evaluate` read it like any other checkpoint.

PEFT is imported inside the functions: it imports transformers (seconds), which only LoRA runs need.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.digest import check_recorded_file, sha256_of

# The ResNet blocks' 3×3×3 convolutions and the attention projections of a MONAI DiffusionModelUNet.
DEFAULT_TARGETS = ("conv1.conv", "conv2.conv", "to_q", "to_k", "to_v", "out_proj")
ADAPTER_MARK = ".lora_"  # PEFT names adapter weights <layer>.lora_A.<adapter>.weight, <layer>.lora_B.…
LORA_KEY = "msrl_lora"  # where a checkpoint records its adapters' settings and base checkpoint


def is_adapter(name: str) -> bool:
    """Whether a parameter/state-dict name is a LoRA adapter weight (not a base weight)."""
    return ADAPTER_MARK in name


def add_lora(unet: nn.Module, rank: int, alpha: float | None, targets: Sequence[str]) -> int:
    """Inject LoRA adapters into `unet` in place and freeze everything else; return the adapted layers.

    Args:
        unet: the UNet (any module; PEFT adapts its Conv3d and Linear layers).
        rank: the adapters' rank r (> 0).
        alpha: LoRA's α; the update is scaled by α/r (None: α = r, scale 1).
        targets: layer names or name endings, e.g. "conv1.conv" adapts every `….conv1.conv`.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"lora_rank must be > 0 to add adapters, got {rank}")
    if not targets:
        raise ValueError("lora_targets is empty: name the UNet layers to adapt, e.g. " + str(list(DEFAULT_TARGETS)))
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=0.0,
                        target_modules=list(targets), bias="none")
    try:
        inject_adapter_in_model(config, unet)
    except ValueError as exc:
        layers = sorted({name.rsplit(".", 1)[-1] for name, module in unet.named_modules()
                         if isinstance(module, nn.Conv3d | nn.Linear)})
        raise ValueError(f"lora_targets {list(targets)} do not name Conv3d/Linear layers of the UNet (names or "
                         f"name endings, e.g. {list(DEFAULT_TARGETS)}; last parts present: {layers}): {exc}") from exc
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(is_adapter(name))
    return len(tuner_layers(unet))


def tuner_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The layers PEFT wrapped, by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)}


@contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """The UNet as it was before fine-tuning (adapters off): PPO's KL reference without a second copy."""
    layers = list(tuner_layers(unet).values())
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # PEFT marks the adapters trainable again: restore what they were
        for parameter in unet.parameters():
            parameter.requires_grad_(id(parameter) in trainable)


class AdapterEMA(nn.Module):
    """Exponential moving average of a LoRA UNet's adapter weights (what sampling uses afterwards).

    `module` is the UNet with averaged adapters; its base weights are the very tensors of the trained
    UNet (frozen, so their average is themselves), so the EMA costs the adapters' size, not a UNet's.
    Same update as `AveragedModel` with `get_ema_multi_avg_fn`: the first call copies, later ones lerp.
    Averaging A and B separately is not averaging their product B·A; with a high decay they differ little.

    Args:
        unet: the UNet with adapters (`add_lora`).
        decay: the EMA decay.
    """

    def __init__(self, unet: nn.Module, decay: float) -> None:
        super().__init__()
        shared = {id(t): t for name, t in chain(unet.named_parameters(), unet.named_buffers()) if not is_adapter(name)}
        self.module = copy.deepcopy(unet, memo=shared)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_parameters(self, unet: nn.Module) -> None:
        """Fold the current adapter weights of `unet` into the average."""
        current = dict(unet.named_parameters())
        for name, average in self.module.named_parameters():
            if not is_adapter(name):
                continue
            if self.n_averaged == 0:
                average.copy_(current[name])
            else:
                average.lerp_(current[name], 1 - self.decay)
        self.n_averaged += 1


def drop_base_weights(state_dict: dict[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """A state dict without the frozen base weights under `prefixes` (what a LoRA checkpoint leaves out)."""
    return {key: value for key, value in state_dict.items()
            if is_adapter(key) or not any(key.startswith(prefix) for prefix in prefixes)}


def lora_record(rank: int, alpha: float | None, targets: Sequence[str], base_checkpoint: str | Path,
                base_weights: str) -> dict[str, Any]:
    """`msrl_lora` of a checkpoint: the adapters' settings and the base file they need, with its SHA-256."""
    path = Path(base_checkpoint).resolve()
    return {"rank": int(rank), "alpha": float(alpha if alpha is not None else rank), "targets": list(targets),
            "base_checkpoint": str(path), "base_sha256": sha256_of(path), "base_weights": base_weights}


def check_base(record: dict[str, Any], checkpoint: str | Path) -> Path:
    """The base checkpoint a LoRA checkpoint names, refused (naming both files) if missing or changed."""
    return check_recorded_file(record["base_checkpoint"], record["base_sha256"], "base checkpoint",
                               f"LoRA checkpoint {checkpoint}",
                               "restore the original file (the adapters fit its weights only), or merge the adapters "
                               "where it exists (`msrl merge-lora`)")


def load_adapters(unet: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, source: str | Path) -> None:
    """Copy the adapter weights under `prefix` of a checkpoint's state dict into a UNet with adapters."""
    adapters = {key[len(prefix):]: value for key, value in state_dict.items()
                if key.startswith(prefix) and is_adapter(key)}
    expected = {name for name in unet.state_dict() if is_adapter(name)}
    if set(adapters) != expected:
        missing, extra = sorted(expected - set(adapters)), sorted(set(adapters) - expected)
        raise ValueError(f"checkpoint {source}: the adapters under {prefix!r} do not fit its msrl_lora settings "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    unet.load_state_dict(adapters, strict=False)


@torch.no_grad()
def merge_adapters(unet: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + α/r · B·A) and unwrap the layers: a plain UNet again."""
    for name, layer in tuner_layers(unet).items():
        layer.merge(safe_merge=True)  # refuses a merge that would produce non-finite weights
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, layer.get_base_layer())
    return unet


def load_lora_model(model_class: type[nn.Module], path: str | Path, checkpoint: dict[str, Any],
                    spec: dict[str, Any], map_location: str | torch.device = "cpu") -> nn.Module:
    """The plain diffusion model of a LoRA checkpoint: its base checkpoint with the adapters merged in.

    `spec` is the checkpoint's diffusion record (`DiffusionModule.diffusion_spec`, with the weights' prefix).
    The raw adapters merge into `unet`, the averaged ones into `ema.module`, as a full fine-tune's
    checkpoint holds raw and EMA weights.
    """
    record = checkpoint[LORA_KEY]
    base = check_base(record, path)
    model = model_class.from_msrl_checkpoint(base, map_location)
    if record["base_weights"] == "ema":
        model.unet.load_state_dict(model.ema.module.state_dict())
    for unet, prefix in ((model.unet, spec["prefix"] + "unet."), (model.ema.module, spec["prefix"] + "ema.module.")):
        add_lora(unet, record["rank"], record["alpha"], record["targets"])
        load_adapters(unet, checkpoint["state_dict"], prefix, path)
        merge_adapters(unet).requires_grad_(True)
    model.ema.requires_grad_(False)
    return model
