"""`msrl evaluate`: FID/KID/MMD per extractor, MS-SSIM diversity and downstream utility, per model.

Each `--checkpoint` is sampled (or each `--generated` folder of `msrl sample` is read); everything is
compared with real volumes of the data configuration; `metrics.json` (one entry per source, every
number with its extractor, sample counts and 95 % interval) and `metrics.md` are written together
with the volumes they were computed on, all or nothing.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from datamodules.atomic import atomic_folder
from datamodules.base import VolumeDataModule
from msrl.commands.parsing import command_parser
from msrl.evaluation.extractors import FeatureExtractor, MedicalNetExtractor, file_digest
from msrl.evaluation.scores import (
    SCHEMA_VERSION,
    FeatureCache,
    distribution_records,
    diversity_records,
    utility_records,
)
from msrl.evaluation.tables import metrics_markdown
from msrl.evaluation.utility import LabelledVolumes, UtilityProtocol
from msrl.samples import draw_volumes, load_checkpoint, read_samples, write_samples

log = logging.getLogger(__name__)

REAL_SPLITS = ("train", "val", "test", "all")


def build_parser() -> ArgumentParser:
    """Options of `msrl evaluate` (each also readable from a YAML given with -c)."""
    parser = command_parser("msrl evaluate", "Evaluate generators against real volumes.")
    parser.add_subclass_arguments(VolumeDataModule, "data", help="the real data: a data YAML (--data-config) or class")
    parser.add_argument("--checkpoint", type=list[str], default=[], help="msrl checkpoints to sample (repeatable)")
    parser.add_argument("--generated", type=list[str], default=[], help="folders written by msrl sample (repeatable)")
    parser.add_argument("--autoencoder", type=list[str], default=[],
                        help="first-stage checkpoints: their reconstructions of the real volumes (the FID floor)")
    parser.add_argument("--names", type=list[str] | None, default=None, help="a name per source (default: from path)")
    parser.add_argument("--num-samples", "--num_samples", type=int, default=16, help="volumes drawn per checkpoint")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps when sampling")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η when sampling")
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=1.0, help="CFG weight")
    parser.add_argument("--seed", type=int, default=1234, help="seed of sampling, bootstrap and subsets")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=4, help="volumes per forward pass")
    parser.add_argument("--real-split", "--real_split", type=str, default="all",
                        help=f"real reference volumes for FID/KID/MMD: one of {REAL_SPLITS}")
    parser.add_argument("--extractors", type=list[FeatureExtractor] | None, default=None,
                        help="feature extractors by class_path (default: MedicalNet resnet10, random weights)")
    parser.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples of each FID/MMD interval")
    parser.add_argument("--kid-subsets", "--kid_subsets", type=int, default=100, help="subsets of each KID")
    parser.add_argument("--ms-ssim-pairs", "--ms_ssim_pairs", type=int, default=32, help="pairs for MS-SSIM")
    parser.add_argument("--utility", type=UtilityProtocol, default=UtilityProtocol(), help="classifier protocol")
    parser.add_argument("--skip-utility", "--skip_utility", type=bool, default=False, help="no utility classifiers")
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


def real_volumes(data: VolumeDataModule, split: str) -> LabelledVolumes:
    """Volumes and labels of one split of the data module ("all": every split)."""
    names = ["train", "val", "test"] if split == "all" else [split]
    items = [data.datasets[name][i] for name in names for i in range(len(data.datasets[name]))]
    if not items:
        raise ValueError(f"the real split {split!r} of {type(data).__name__} is empty")
    return LabelledVolumes(torch.stack([item["image"] for item in items]),
                           torch.tensor([int(item["label"]) for item in items]))


def main(argv: list[str]) -> None:
    """Parse, sample or read every source, compute every metric, write the outputs atomically."""
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
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite true or choose another --out")
    if built.data is None:
        raise ValueError("--data is required: the real volumes to compare with, e.g. --data configs/data/template.yaml")
    for kind, path in sources:  # fail before any compute
        if not Path(path).exists():
            raise FileNotFoundError(f"--{kind} {path} does not exist")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    data: VolumeDataModule = built.data
    data.prepare_data()
    data.setup("fit")
    extractors = [e.to(device) for e in (built.extractors or [MedicalNetExtractor(depth=10)])]
    evaluate(config, built.utility, data, dict(zip(names, sources, strict=True)), extractors, device, out)


def evaluate(config: Namespace, protocol: UtilityProtocol, data: VolumeDataModule,
             sources: dict[str, tuple[str, str]], extractors: list[FeatureExtractor], device: torch.device,
             out: Path) -> dict[str, Any]:
    """Compute metrics.json's content and write it, metrics.md and the volumes into `out` (all or nothing)."""
    reference = real_volumes(data, config.real_split)
    cache = FeatureCache(extractors, reference, config.batch_size)
    # the utility classifiers' splits; --skip-utility needs neither (a data set may have no test split)
    train, test = (None, None) if config.skip_utility else (real_volumes(data, "train"), real_volumes(data, "test"))
    with atomic_folder(out) as staging:
        result: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "data": {"class_path": f"{type(data).__module__}.{type(data).__name__}",
                     "spatial_size": data.spatial_size, "real_split": config.real_split,
                     "num_real": len(reference.labels), "num_test": None if test is None else len(test.labels)},
            "extractors": [e.name for e in extractors],
            "real": {"records": diversity_records(reference.volumes, config.ms_ssim_pairs, config.seed)},
            "entries": [],
        }
        if not config.skip_utility:
            result["real"]["records"] += utility_records(protocol, train, test, data.num_classes, "real")
        _write_reference(reference, staging / "real")
        for name, (kind, path) in sources.items():
            generated, entry = _load_source(config, kind, path, device, data, reference)
            print(f"msrl evaluate: {name}: {len(generated.labels)} volumes, computing metrics", flush=True)
            records = distribution_records(cache, generated, config.bootstrap, config.kid_subsets, config.seed)
            records += diversity_records(generated.volumes, config.ms_ssim_pairs, config.seed)
            if not config.skip_utility and kind != "autoencoder":  # reconstructions of test volumes would leak
                records += utility_records(protocol, generated, test, data.num_classes, "synthetic")
                records += utility_records(protocol, train + generated, test, data.num_classes, "real+synthetic")
            result["entries"].append({"name": name, **entry, "num_samples": len(generated.labels),
                                      "samples_dir": f"samples/{name.replace('/', '_')}", "records": records})
            write_samples(generated.volumes, generated.labels, staging / "samples" / name.replace("/", "_"),
                          seeds=[config.seed] * len(generated.labels), checkpoint=path)
        (staging / "metrics.json").write_text(json.dumps(result, indent=1))
        (staging / "metrics.md").write_text(metrics_markdown(result))
    print(metrics_markdown(result, summary_only=True))
    print(f"\nwrote {out}/metrics.json, {out}/metrics.md and the evaluated volumes under {out}/samples")
    return result


def _load_source(config: Namespace, kind: str, path: str, device: torch.device, data: VolumeDataModule,
                 reference: LabelledVolumes) -> tuple[LabelledVolumes, dict[str, Any]]:
    """Generated volumes of one source, and what metrics.json says about where they came from."""
    if kind == "autoencoder":
        from lightning_modules.diffusion.latent import LatentSpace

        first_stage = LatentSpace(path).to(device)
        volumes = torch.cat([first_stage.decode(first_stage.encode(chunk.to(device))).cpu()
                             for chunk in reference.volumes.split(config.batch_size)])
        labels = reference.labels
        entry = {"source": {"autoencoder": str(path), "sha256_8": file_digest(path),
                            "reconstructs": f"the {config.real_split} real volumes"}}
    elif kind == "generated":
        volumes, labels = read_samples(path)
        if labels is None:
            raise ValueError(f"--generated {path}: its manifest.csv has no labels; utility and per-class FID need them")
        entry = {"source": {"generated": str(path)}}
    else:
        model = load_checkpoint(path, device)
        num_classes = model.hparams.num_classes
        if num_classes != data.num_classes:
            raise ValueError(f"--checkpoint {path} has {num_classes} classes, the data {data.num_classes}")
        labels = torch.arange(config.num_samples) % max(num_classes, 1)
        volumes, _ = draw_volumes(model, config.num_samples, labels if num_classes else None, steps=config.steps,
                                  eta=config.eta, guidance_scale=config.guidance_scale, seed=config.seed,
                                  batch_size=config.batch_size)
        entry = {"source": {"checkpoint": str(path), "sha256_8": file_digest(path)},
                 "sampling": {"steps": config.steps, "eta": config.eta, "guidance_scale": config.guidance_scale,
                              "seed": config.seed}}
    if volumes.shape[-1] != data.spatial_size:
        raise ValueError(f"{kind} {path}: volumes of side {volumes.shape[-1]}, the real data {data.spatial_size}; "
                         "set --data.init_args.spatial_size to the model's")
    return LabelledVolumes(volumes, labels), entry


def _write_reference(reference: LabelledVolumes, folder: Path, per_class: int = 4) -> None:
    """Up to `per_class` real volumes per class, for the report's side-by-side figures."""
    keep = torch.cat([torch.nonzero(reference.labels == label).flatten()[:per_class]
                      for label in sorted(set(reference.labels.tolist()))])
    write_samples(reference.volumes[keep], reference.labels[keep], folder, seeds=[0] * len(keep), checkpoint="real")
