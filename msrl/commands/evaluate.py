"""`msrl evaluate`: distribution metrics per extractor, paired differences, reward, memorisation, utility, fidelity.

Each `--checkpoint` is sampled at the evaluation's sampler and at the rollout sampler of every
fine-tuned checkpoint, always with the same seeds (a ControlNet checkpoint, or one fine-tuned under a
ControlNet, under the held-out split's lesion masks), or each `--generated` folder of `msrl sample` is
read; everything is compared with the held-out real volumes (FID against the training split beside),
the fine-tuned run's reward scores every set of volumes (its parts that read masks against the masks
the volumes carry), the utility classifiers trained on the real training split judge
whether each volume shows its class (class fidelity), and every checkpoint is compared with the
baseline by paired bootstrap. With lesion masks, segmenters trained on real, synthetic and
real + synthetic pairs give the segmentation utility, and the real-trained ones judge whether each
volume shows its mask (mask fidelity; msrl/commands/evaluate_masks.py). `metrics.json` and
`metrics.md` are written together with the volumes they were computed on (and `mask_contours.png`
when checkpoints drew from masks), all or nothing (docs/design.md §5).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from datamodules.atomic import atomic_folder
from datamodules.base import VolumeDataModule
from msrl.commands.evaluate_masks import contour_panels
from msrl.commands.evaluate_run import EvaluationRun
from msrl.commands.evaluate_sources import Sampler
from msrl.commands.parsing import command_parser
from msrl.evaluation.extractors import FeatureExtractor, MedicalNetExtractor
from msrl.evaluation.figures import mask_contours
from msrl.evaluation.segmentation import SegmentationProtocol
from msrl.evaluation.tables import metrics_markdown
from msrl.evaluation.utility import LabelledVolumes, UtilityProtocol
from msrl.samples import write_samples

log = logging.getLogger(__name__)

REAL_SPLITS = ("train", "val", "test", "all")


def build_parser() -> ArgumentParser:
    """Options of `msrl evaluate` (each also readable from a YAML given with -c)."""
    parser = command_parser("msrl evaluate", "Evaluate generators against real volumes.")
    parser.add_subclass_arguments(VolumeDataModule, "data", help="the real data: a data YAML (--data-config) or class")
    parser.add_argument("--checkpoint", type=list[str], default=[],
                        help="msrl checkpoints to sample (repeatable): pretraining, fine-tuning or ControlNet "
                             "(drawn from the held-out lesion masks, as is a checkpoint fine-tuned under one)")
    parser.add_argument("--generated", type=list[str], default=[], help="folders written by msrl sample (repeatable)")
    parser.add_argument("--autoencoder", type=list[str], default=[],
                        help="first-stage checkpoints: their reconstructions of the real volumes (the FID floor)")
    parser.add_argument("--names", type=list[str] | None, default=None, help="a name per source (default: from path)")
    parser.add_argument("--baseline", type=str | None, default=None,
                        help="the source every other checkpoint is compared with (default: the first checkpoint)")
    parser.add_argument("--num-samples", "--num_samples", type=int, default=16, help="volumes drawn per checkpoint")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the evaluation sampler")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η of the evaluation sampler")
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=1.0, help="CFG weight")
    parser.add_argument("--rollout-sampler", "--rollout_sampler", type=bool, default=True,
                        help="also sample every checkpoint at each fine-tuned checkpoint's recorded rollout sampler")
    parser.add_argument("--seed", type=int, default=1234, help="seed of sampling, bootstrap and subsets")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=4, help="volumes per forward pass")
    parser.add_argument("--real-split", "--real_split", type=str, default="test",
                        help=f"held-out real reference for FID/KID/MMD: one of {REAL_SPLITS} (val or test: "
                             "also the utility classifiers' test split; otherwise they test on test)")
    parser.add_argument("--extractors", type=list[FeatureExtractor] | None, default=None,
                        help="feature extractors by class_path, the primary one first (default: MedicalNet "
                             "resnet10, random weights)")
    parser.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples of each FID/KID/MMD interval")
    parser.add_argument("--paired-bootstrap", "--paired_bootstrap", type=int, default=200,
                        help="resamples of each paired difference")
    parser.add_argument("--kid-subsets", "--kid_subsets", type=int, default=100, help="subsets of each KID")
    parser.add_argument("--ms-ssim-pairs", "--ms_ssim_pairs", type=int, default=32, help="pairs for MS-SSIM")
    parser.add_argument("--reward", type=str | None, default=None,
                        help="a reward YAML to score the volumes with (default: the fine-tuned checkpoint's)")
    parser.add_argument("--skip-reward", "--skip_reward", type=bool, default=False, help="no reward scores")
    parser.add_argument("--utility", type=UtilityProtocol, default=UtilityProtocol(), help="classifier protocol")
    parser.add_argument("--skip-utility", "--skip_utility", type=bool, default=False,
                        help="no utility classifiers (and so no class fidelity, which they judge)")
    parser.add_argument("--segmentation", type=SegmentationProtocol, default=SegmentationProtocol(),
                        help="segmenter protocol (segmentation utility and mask fidelity)")
    parser.add_argument("--skip-segmentation", "--skip_segmentation", type=bool | None, default=None,
                        help="true: no segmenters; false: segmenters even without a ControlNet checkpoint; "
                             "default: segmenters when a checkpoint drawing from masks (a ControlNet, or one "
                             "fine-tuned under it) is given and the data serves masks")
    parser.add_argument("--device", type=str, default="auto", help="'auto', 'cpu', 'cuda', …")
    parser.add_argument("--out", type=str, required=True, help="output folder (metrics.json, metrics.md, volumes)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing output folder")
    return parser


def source_name(path: str) -> str:
    """A readable name for a checkpoint or folder: `finetune/version_0/last` for its checkpoints/last.ckpt."""
    p = Path(path)
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.parent.name}/{p.parent.parent.name}/{p.stem}"
    return p.stem if p.suffix else p.name


def normalise_argv(argv: list[str]) -> list[str]:
    """`--data-config` is `--data`; a repeated `--checkpoint X` (or --generated, --autoencoder) appends."""
    out = []
    for arg in argv:
        arg = arg.replace("--data-config", "--data").replace("--data_config", "--data")
        flag, _, value = arg.partition("=")
        if flag in ("--checkpoint", "--generated", "--autoencoder"):
            out += [f"{flag}+", value] if value else [f"{flag}+"]
        else:
            out.append(arg)
    return out


def main(argv: list[str]) -> None:
    """Parse, check every input before any compute, then evaluate and write the outputs atomically."""
    parser = build_parser()
    config = parser.parse_args(normalise_argv(argv))
    built = parser.instantiate_classes(config)
    if config.real_split not in REAL_SPLITS:
        raise ValueError(f"--real-split must be one of {REAL_SPLITS}, got {config.real_split!r}")
    sources = [("checkpoint", p) for p in config.checkpoint] + [("generated", p) for p in config.generated] \
        + [("autoencoder", p) for p in config.autoencoder]
    if not sources:
        raise ValueError("nothing to evaluate: give --checkpoint, --generated and/or --autoencoder")
    names = config.names or [source_name(path) for _, path in sources]
    if len(names) != len(sources) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per source ({len(sources)}), got {names}: pass --names")
    checkpoints = [name for name, (kind, _) in zip(names, sources, strict=True) if kind == "checkpoint"]
    if config.baseline is not None and config.baseline not in checkpoints:
        raise ValueError(f"--baseline {config.baseline!r} is not one of the checkpoints' names {checkpoints}")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    if built.data is None:
        raise ValueError("--data is required: the real volumes to compare with, e.g. --data configs/data/template.yaml")
    for kind, path in sources + ([("reward", config.reward)] if config.reward else []):  # fail before any compute
        if not Path(path).exists():
            raise FileNotFoundError(f"--{kind} {path} does not exist")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    data: VolumeDataModule = built.data
    data.prepare_data()
    data.setup("fit")
    extractors = [e.to(device) for e in (built.extractors or [MedicalNetExtractor(depth=10)])]
    evaluate(config, built.utility, data, dict(zip(names, sources, strict=True)), extractors, device, out,
             built.segmentation)


def evaluate(config: Namespace, protocol: UtilityProtocol, data: VolumeDataModule,
             sources: dict[str, tuple[str, str]], extractors: list[FeatureExtractor], device: torch.device,
             out: Path, segmentation: SegmentationProtocol | None = None) -> dict[str, Any]:
    """Compute metrics.json's content and write it, metrics.md and the volumes into `out` (all or nothing)."""
    evaluation = Sampler(config.steps, config.eta, config.guidance_scale)
    run = EvaluationRun(config, protocol, data, extractors, device, evaluation, segmentation)
    run.check_independence(sources)  # reads every checkpoint (weights only) before any real volume
    run.read_real()
    result = run.compute(sources)
    with atomic_folder(out) as staging:
        _write_reference(run.reference, staging / "real")
        for source in run.volumes:
            write_samples(source.volumes.volumes, source.volumes.labels,
                          staging / "samples" / source.key.replace("/", "_").replace(" ", "_"),
                          seeds=[source.seed or 0] * len(source.volumes.labels), checkpoint=source.path)
        (staging / "metrics.json").write_text(json.dumps(result, indent=1))
        (staging / "metrics.md").write_text(metrics_markdown(result))
        panels = None if run.heldout is None else contour_panels(run.volumes, run.heldout, run.heldout_volumes,
                                                                  evaluation)
        if panels is not None:
            mask_contours(*panels, staging / "mask_contours.png")
    print(metrics_markdown(result, summary_only=True))
    print(f"\nwrote {out}/metrics.json, {out}/metrics.md and the evaluated volumes under {out}/samples")
    return result


def _write_reference(reference: LabelledVolumes, folder: Path, per_class: int = 4) -> None:
    """Up to `per_class` real volumes per class, for the report's side-by-side figures."""
    keep = torch.cat([torch.nonzero(reference.labels == label).flatten()[:per_class]
                      for label in sorted(set(reference.labels.tolist()))])
    write_samples(reference.volumes[keep], reference.labels[keep], folder, seeds=[0] * len(keep), checkpoint="real")
