"""`export_bundle`: a generator or ControlNet checkpoint → a MONAI bundle folder, written all or nothing.

A diffusion checkpoint's bundle draws per class (msrl/export/generator.py); a ControlNet's
(msrl/export/controlnet.py) and a model's fine-tuned under one (msrl/export/mask_finetuned.py) draw from
lesion masks. `msrl/export/writer.py` lays out the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_modules import load_weights
from lightning_modules.controlnet import CONTROLNET_KEY
from lightning_modules.finetune.masks import MASKS_KEY
from msrl.export.configs import Sampler
from msrl.export.controlnet import controlnet_contents
from msrl.export.generator import generator_contents
from msrl.export.mask_finetuned import mask_finetuned_contents
from msrl.export.writer import write_bundle


def export_bundle(checkpoint_path: str | Path, out: str | Path, sampler: Sampler | None = None, use_ema: bool = True,
                  metrics_path: str | Path | None = None, data_config: str | None = None) -> Path:
    """Write the MONAI bundle of a pretraining, fine-tuning or ControlNet checkpoint into `out` (replaced in one step).

    Args:
        checkpoint_path: a checkpoint of msrl pretrain or msrl finetune (voxel or latent), or of msrl
            train-controlnet (its bundle takes a lesion mask and carries the base's weights too); a checkpoint
            fine-tuned under a ControlNet (`msrl_masks`) takes a mask too and carries its recorded ControlNet.
        out: the bundle folder.
        sampler: the bundle's default sampler (steps, η, guidance, seed, batch size, samples per class or
            per mask); None: `Sampler()`, the defaults of `msrl sample`.
        use_ema: export the EMA weights (what `msrl sample` uses) rather than the raw ones.
        metrics_path: `msrl evaluate`'s metrics.json, whose numbers the model card reports.
        data_config: a data YAML naming the training data, when the checkpoint's run config is not beside it.
    """
    checkpoint_path, sampler = Path(checkpoint_path), sampler or Sampler()
    metrics = _read_metrics(metrics_path)
    checkpoint = load_weights(checkpoint_path)
    if isinstance(checkpoint, dict) and CONTROLNET_KEY in checkpoint:
        contents = controlnet_contents(checkpoint_path, checkpoint, sampler, use_ema, data_config)
    elif isinstance(checkpoint, dict) and MASKS_KEY in checkpoint:  # fine-tuned under a ControlNet: it takes masks
        contents = mask_finetuned_contents(checkpoint_path, checkpoint, sampler, use_ema, data_config)
    else:
        contents = generator_contents(checkpoint_path, sampler, use_ema, data_config, checkpoint)
    return write_bundle(out, contents, metrics)


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
