"""Does an extractor's FID order degraded real volumes by degradation strength? (docs/design.md §7)

For each degradation (TorchIO's deterministic `Blur`, `Noise`, `Ghosting`, `BiasField`) at fixed,
increasing strengths, FID(held-out real reference, degraded real volumes) should grow with the
strength; the Spearman ρ between strength and FID measures how well it does (1: in order). The
in-domain self-supervised encoder (`msrl train-extractor`) is compared with the random-weight
MedicalNet-layout 3D ResNet-10 and slice ResNet-18, which are comparable only to themselves.

    python -m benchmarks.extractor_ranking --checkpoint runs/extractor/version_0/checkpoints/last.ckpt \\
        --data-config configs/extractor/template.yaml [--out ranking.json]

Prints a Markdown table (degradation × extractor → ρ and the FIDs). The reference is the test
split, the degraded volumes the validation split (neither seen by the encoder's training).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchio as tio
import yaml
from scipy.stats import spearmanr

from msrl.evaluation.extractors import FeatureExtractor, InDomainExtractor, MedicalNetExtractor, SliceExtractor
from msrl.evaluation.metrics import fid_from_samples

log = logging.getLogger(__name__)
Degrade = Callable[[torch.Tensor, float, int], torch.Tensor]  # unit-range volume [C, S, S, S], strength, index
BIAS_ORDER = 3
BIAS_TERMS = (BIAS_ORDER + 1) * (BIAS_ORDER + 2) * (BIAS_ORDER + 3) // 6  # polynomial terms of TorchIO's field


def _bias_direction(seed: int = 0) -> list[float]:
    """A fixed bias-field shape (TorchIO polynomial coefficients in [-1, 1]); the strength scales it."""
    return (torch.rand(BIAS_TERMS, generator=torch.Generator().manual_seed(seed)) * 2 - 1).tolist()


# name: (strengths, first one the clean volumes, what one strength does to a volume in [0, 1])
DEGRADATIONS: dict[str, tuple[tuple[float, ...], Degrade]] = {
    "blur": ((0.0, 0.5, 1.0, 1.5, 2.0, 3.0),  # Gaussian std in voxels
             lambda v, s, i: tio.Blur(std=(s, s, s))(v) if s else v),
    "noise": ((0.0, 0.01, 0.025, 0.05, 0.1, 0.2),  # Gaussian std, on intensities in [0, 1]
              lambda v, s, i: tio.Noise(mean=0.0, std=s, seed=i)(v) if s else v),
    "ghosting": ((0.0, 0.1, 0.25, 0.4, 0.6, 0.8),  # ghost intensity (4 ghosts along axis 1)
                 lambda v, s, i: tio.Ghosting(num_ghosts=4, axis=1, intensity=s, restore=0.02)(v) if s else v),
    "bias_field": ((0.0, 0.1, 0.2, 0.35, 0.5, 0.7),  # scale of a fixed order-3 log bias field
                   lambda v, s, i: tio.BiasField(coefficients=[s * c for c in _bias_direction()],
                                                 order=BIAS_ORDER)(v) if s else v),
}


def degrade(volumes: torch.Tensor, function: Degrade, strength: float) -> torch.Tensor:
    """Volumes [N, C, S, S, S] in [-1, 1] degraded in magnitude space ([0, 1], background 0), clamped back."""
    unit = (volumes + 1) / 2
    out = torch.stack([function(volume, strength, index).float() for index, volume in enumerate(unit)])
    return (2 * out - 1).clamp(-1, 1)


def spearman(strengths: Sequence[float], values: Sequence[float]) -> float:
    """Spearman's rank correlation of FID with strength (1: FID grows with every step)."""
    return float(spearmanr(strengths, values).statistic)


def main_view(extractor: FeatureExtractor) -> str:
    """The feature view an FID is read from: the slice network's pooled planes, else the volume's."""
    return "pooled" if isinstance(extractor, SliceExtractor) else "3d"


def ranking(extractors: Sequence[FeatureExtractor], reference: torch.Tensor, volumes: torch.Tensor,
            degradations: dict[str, tuple[tuple[float, ...], Degrade]] = DEGRADATIONS,
            batch_size: int = 8) -> dict[str, dict[str, dict[str, Any]]]:
    """{degradation: {extractor name: {"rho", "strengths", "fid"}}} of FID(reference, degraded volumes).

    The FID is `fid_from_samples` (msrl/evaluation/metrics.py): the same Fréchet distance as MONAI's,
    through an n×m SVD rather than a 512×512 matrix square root, which with fewer volumes than
    features is both faster and exact where `sqrtm` warns of a singular matrix.
    """
    features = {e.name: e.extract(reference, batch_size)[main_view(e)] for e in extractors}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (strengths, function) in degradations.items():
        degraded = [degrade(volumes, function, s) for s in strengths]
        results[name] = {}
        log.info("%s at strengths %s", name, strengths)
        for extractor in extractors:
            fids = [fid_from_samples(features[extractor.name], extractor.extract(d, batch_size)[main_view(extractor)])
                    for d in degraded]
            results[name][extractor.name] = {"rho": spearman(strengths, fids), "strengths": list(strengths),
                                             "fid": fids}
    return results


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per degradation, a column per extractor: ρ, then the FIDs from the clean volumes up."""
    names = list(next(iter(results.values())))
    lines = ["| degradation (strengths) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for degradation, row in results.items():
        strengths = ", ".join(f"{s:g}" for s in next(iter(row.values()))["strengths"])
        cells = [f"ρ = {row[n]['rho']:.2f}; " + ", ".join(f"{v:.3g}" for v in row[n]["fid"]) for n in names]
        lines.append(f"| {degradation} ({strengths}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_split_volumes(data_config: Path, split: str) -> torch.Tensor:
    """Every volume [N, C, S, S, S] of one split of the data module a YAML names (`data:` of a training config
    or a data config of its own: class_path and init_args)."""
    config = yaml.safe_load(data_config.read_text())
    config = config.get("data", config) if isinstance(config, dict) else None
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{data_config}: expected `data: {{class_path, init_args}}` or `class_path`/`init_args`")
    module_name, _, class_name = config["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module_name), class_name)(**config.get("init_args", {}))
    data.prepare_data()
    data.setup("fit")
    if split not in data.datasets or len(data.datasets[split]) < 2:
        raise ValueError(f"{data_config}: the {split} split needs at least 2 volumes")
    return torch.stack([item["image"] for item in data.datasets[split]])


def main(argv: list[str] | None = None) -> int:
    """The command line: build the extractors and data, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.extractor_ranking", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="`msrl train-extractor` checkpoint")
    parser.add_argument("--data-config", type=Path, required=True, help="YAML with the data module")
    parser.add_argument("--reference", default="test", help="split of the real reference volumes")
    parser.add_argument("--degraded", default="val", help="split of the volumes that are degraded")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reference, volumes = (load_split_volumes(args.data_config, s) for s in (args.reference, args.degraded))
    extractors = [InDomainExtractor(args.checkpoint), MedicalNetExtractor(depth=10), SliceExtractor(depth=18)]
    start = time.perf_counter()
    results = ranking(extractors, reference, volumes)
    print(f"{len(reference)} {args.reference} volumes as reference, {len(volumes)} {args.degraded} volumes degraded "
          f"({time.perf_counter() - start:.0f} s)\n")
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps({"reference": args.reference, "degraded": args.degraded,
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
