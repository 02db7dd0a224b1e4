"""`write_bundle`: a bundle's contents (weights, config, scripts, provenance) → its folder, all or nothing.

```
configs/inference.json   MONAI builds the networks, scheduler and inferer; scripts.sampler samples
configs/metadata.json    MONAI's metadata + the model card's facts
models/*.pt              state dicts of plain tensors (torch.load(..., weights_only=True))
scripts/*.py             the sampler (torch, monai, nibabel, numpy only); a ControlNet bundle's mask checks
docs/README.md           the model card
```
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datamodules.atomic import atomic_folder
from datamodules.digest import sha256_of
from msrl.export.card import metadata, readme

SAMPLER_SCRIPT = Path(__file__).with_name("sampler_script.py")


@dataclass
class BundleContents:
    """What a bundle holds: weight files, `inference.json`, the scripts to copy, the card's facts.

    `defaults` names the config keys the card lists as the sampler's run-time defaults.
    """

    weights: dict[str, dict[str, torch.Tensor]]
    config: dict[str, Any]
    info: dict[str, Any]
    defaults: tuple[str, ...]
    scripts: dict[str, Path] = field(default_factory=lambda: {"sampler": SAMPLER_SCRIPT})


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of contiguous CPU tensors that shares no storage with the model."""
    return {key: value.detach().cpu().contiguous().clone() for key, value in module.state_dict().items()}


def write_bundle(out: str | Path, contents: BundleContents, metrics: dict[str, Any] | None) -> Path:
    """Write the bundle into `out` (replaced in one step); the card lists every weight file's SHA-256."""
    with atomic_folder(out) as staging:
        for folder in ("configs", "models", "scripts", "docs"):
            (staging / folder).mkdir()
        for name, state in contents.weights.items():
            torch.save(state, staging / "models" / name)
        weights = {f"models/{f.name}": sha256_of(f) for f in sorted((staging / "models").iterdir())}
        for name, source in contents.scripts.items():
            shutil.copyfile(source, staging / "scripts" / f"{name}.py")
        imports = "".join(f"from . import {name}  # noqa: F401\n" for name in contents.scripts)
        (staging / "scripts" / "__init__.py").write_text(
            '"""The bundle\'s sampler (torch, monai, nibabel, numpy only)."""\n\n' + imports)
        (staging / "configs" / "inference.json").write_text(json.dumps(contents.config, indent=2) + "\n")
        defaults = {key: contents.config[key] for key in contents.defaults}
        (staging / "configs" / "metadata.json").write_text(
            json.dumps(metadata(contents.info, defaults, weights, metrics), indent=2) + "\n")
        (staging / "docs" / "README.md").write_text(readme(contents.info, defaults, weights, metrics))
    return Path(out)
