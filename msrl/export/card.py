"""The model card of an exported bundle: `docs/README.md` for people, `configs/metadata.json` for MONAI.

It states what a medical generator's card must: the data and splits, image size and spacing, classes,
the first stage and latent shape, pretraining and fine-tuning settings (the algorithm, the reward's components
and weights),
the sampler, the evaluation's numbers with their intervals (from `msrl evaluate`'s metrics.json),
msrl's version and commit, the SHA-256 of every weight file, and its intended use and limitations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import monai
import nibabel
import numpy
import torch

from msrl.evaluation.tables import metrics_markdown

INTENDED_USE = (
    "Research on generative models of brain MRI: drawing synthetic volumes of the training data's classes to study "
    "the generator, to augment or pre-train research models, and to compare generators. The volumes are synthetic: "
    "they show no real patient, are not medical images of anyone, and must not be used for diagnosis, treatment "
    "planning or any clinical decision.")
LIMITATIONS = [
    "Synthetic data, not for diagnosis or any clinical use; not a medical device.",
    "The model reproduces its training data's population, scanners and preprocessing (skull-stripped, cropped to "
    "the brain, resized to a cube, intensities mapped to [-1, 1] per channel); it says nothing about other "
    "populations, sequences or pathologies.",
    "A class label asks for the class's appearance as the model learned it; it guarantees no lesion location, size "
    "or grade, and a classifier trained on these volumes must be validated on real data.",
    "Fine-tuning (PPO or reward backpropagation) maximises a learned reward and can exploit it (reward hacking): "
    "judge the model by the "
    "evaluation's paired differences below, never by the reward alone.",
    "Generated volumes may resemble training subjects; check memorisation before sharing volumes outside the "
    "data set's licence.",
]


def evaluation_section(metrics: dict[str, Any] | None) -> list[str]:
    """The evaluation's summary and paired differences with their 95 % intervals (headings moved one level down)."""
    if metrics is None:
        return ["No evaluation was given (`msrl export --metrics metrics.json` adds `msrl evaluate`'s numbers)."]
    lines = metrics_markdown(metrics, summary_only=True).splitlines()
    return [("##" + line if line.startswith("#") else line) for line in lines]


def eval_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """metadata.json's `eval_metrics`: each source's all-class numbers with intervals, and the paired differences."""
    if metrics is None:
        return {}
    out: dict[str, Any] = {}
    for entry in metrics.get("entries", []):
        out[entry["name"]] = [{key: row.get(key) for key in ("metric", "extractor", "view", "reference", "sampler",
                                                              "value", "ci95")}
                              for row in entry["records"] if row.get("class") == "all"]
    out["paired_differences"] = [
        {"candidate": c["candidate"], "baseline": c["baseline"],
         "records": [{key: row.get(key) for key in ("metric", "extractor", "difference", "ci95", "verdict")}
                     for row in c["records"] if row.get("class") == "all"]}
        for c in metrics.get("comparisons", [])]
    return out


def _bullets(values: dict[str, Any]) -> list[str]:
    return [f"- {key}: `{json.dumps(value)}`" for key, value in values.items()]


def readme(info: dict[str, Any], sampler: dict[str, Any], weights: dict[str, str], metrics: dict[str, Any] | None
           ) -> str:
    """`docs/README.md`: the model card in Markdown."""
    model, data, first, tuned = info["model"], info["data"], info["first_stage"], info["finetuning"]
    size = model["spatial_size"]
    classes = "unconditional" if model["num_classes"] == 0 else f"{model['num_classes']} classes (labels 0…" \
        f"{model['num_classes'] - 1}; label {model['num_classes']} is the null class of classifier-free guidance)"
    controlnet = info.get("controlnet")
    text = [f"# msrl generator: {info['checkpoint']['kind']} 3D diffusion model, {size}³, "
            f"{'latent' if first else 'voxel space'}", "",
            "A MONAI bundle exported by `msrl export`; it runs without msrl:", "",
            "```", "pip install torch monai nibabel fire"]
    if controlnet is None:
        text += ["python -m monai.bundle run --config_file <bundle>/configs/inference.json --output_dir samples \\",
                 "    --num_samples 4 --classes \"[0, 1]\" --seed 0", "```", "",
                 "Each requested class gets `num_samples` volumes in `samples/class_<c>/sample_<i>.nii.gz`, listed in "
                 "`samples/manifest.csv` (`msrl evaluate --generated samples` reads the folder).", ""]
    else:
        text += mask_usage(controlnet)
    limitations = LIMITATIONS + ([MASK_LIMITATION] if controlnet else [])
    text += ["## Intended use", "", INTENDED_USE, "", "## Limitations", ""] + [f"- {item}" for item in limitations]
    text += ["", "## Data", ""]
    if data is None:
        text += ["Not recorded: the checkpoint's run left no config.yaml and no `--data-config` was given.", ""]
    else:
        text += [f"- data set: `{data['class_path']}` (from {data['source']}), {data['subjects']} subjects, "
                 f"channels {data['channels']}", f"- split (seed {data['split_seed']}, counted from "
                 f"{data['counted_from']}):"]
        text += [f"  - {name}: {split['subjects']} subjects, per label {split['per_label']}"
                 for name, split in data["splits"].items()]
    text += [f"- image size: {model['in_channels']} channel(s) × {size}³ voxels, intensities in [-1, 1] "
             "(background -1)",
             "- spacing: none fixed; each subject's brain bounding box was padded to a cube and resized to "
             f"{size}³, so a voxel is the subject's brain extent / {size}. "
             + ("Each volume is written with its mask's affine and header." if controlnet else
                "The volumes are written with the identity affine (1 mm voxels, voxel coordinates), as `msrl sample` "
                "writes them."), f"- classes: {classes}", ""]
    text += ["## Model", "", f"- checkpoint: `{info['checkpoint']['path']}` (sha256 `{info['checkpoint']['sha256']}`,"
             f" epoch {info['checkpoint']['epoch']}, step {info['checkpoint']['global_step']})",
             f"- diffusion: MONAI `DiffusionModelUNet` on {model['sample_shape']}, {model['prediction_type']}, "
             f"T = {model['num_train_timesteps']} (exact betas in `models/noise_schedule.pt`)",
             f"- exported weights: {info['exported_weights']}"]
    if info.get("mask_finetuning"):
        text += mask_finetuned_model(info)
    elif controlnet:
        base = info["base_checkpoint"]
        text += [f"- base: `{base['path']}` (sha256 `{base['sha256']}`, {base['kind']}); the ControlNet was trained "
                 "on its EMA weights, which the bundle carries", f"- ControlNet: MONAI `ControlNet`, conditioning "
                 f"{controlnet['conditioning']!r}, scale {controlnet['conditioning_scale']}, embedding channels "
                 f"{controlnet['embedding_channels']}; training settings `{json.dumps(controlnet['training'])}`"]
    if first:
        text.append(f"- first stage: `{first['class']}` (`{first['path']}`, sha256 `{first['sha256']}`), latent "
                    f"shape {first['latent_shape']}, scale factor {first['scale_factor']:.6g}")
        text += ["  " + line for line in _bullets(first["settings"])]
        if first.get("decode_tile_size"):
            text.append(f"- msrl decoded tile by tile ({first['decode_tile_size']}³ latent tiles); the bundle "
                        "decodes each latent whole, which the tiling equals only within its blending")
    text += ["", "## Pretraining", ""] + _bullets(info["pretraining"])
    text += ["", "## Fine-tuning", ""]
    if tuned is None:
        text.append("None: this is the pretrained model.")
    else:
        text += [f"- algorithm: {tuned['algorithm']} (`{tuned['class_path']}`)"] + _bullets(tuned["settings"])
        text += [f"- sampler trained: `{json.dumps(tuned['rollout_sampler'])}`"]
        if tuned.get("lora"):
            lora = tuned["lora"]
            text.append(f"- LoRA: rank {lora.get('rank')}, α {lora.get('alpha')}, on {lora.get('targets')}, over "
                        f"`{lora.get('base_checkpoint')}` (sha256 `{lora.get('base_sha256')}`); merged into the "
                        "exported weights")
        reward = tuned["reward"] or {}
        weights_of = reward.get("weights") or [None] * len(reward.get("components", []))
        text.append(f"- reward: `{reward.get('class_path')}`" + (", components (weight):" if reward.get("components")
                                                                    else ""))
        text += [f"  - {c.get('name') or c['class_path']} (`{c['class_path']}`): {w}"
                 for c, w in zip(reward.get("components", []), weights_of, strict=False)]
        text += [f"  - network `{n.get('path')}` sha256 `{n.get('sha256')}`" for n in reward.get("networks", [])]
        if info.get("mask_finetuning"):
            masks = info["mask_finetuning"]
            source = (masks["mask_data"] or {}).get("class_path") or "mask_data (its config not recorded)"
            text.append(f"- masks: each rollout drawn from a lesion mask of the training split of `{source}` "
                        f"({masks['pool_size']} masks, sha256 `{masks['pool_sha256']}`) of its class, through the "
                        "ControlNet above; reward parts that read masks scored each volume against its own")
    drawn = ("a mask's volumes are those `msrl sample --mask` writes for it" if controlnet else
             "class c's volumes are `msrl sample --label c`'s")
    text += ["", "## Sampler", "", f"DDIM as `msrl sample` runs it ({drawn} at the same seed, steps, η, guidance and "
             "batch size); override any of these at run time:", ""]
    text += _bullets(sampler)
    text += ["", "## Evaluation", ""] + evaluation_section(metrics)
    text += ["", "## Files", ""] + [f"- `{name}`: sha256 `{digest}`" for name, digest in weights.items()]
    text += ["", f"Exported by msrl {info['msrl']['version']} (commit `{info['msrl']['commit']}`).", ""]
    return "\n".join(text)


def mask_finetuned_model(info: dict[str, Any]) -> list[str]:
    """The card's Model lines of a model fine-tuned under a frozen ControlNet: that ControlNet and its base."""
    masks, controlnet = info["mask_finetuning"], info["controlnet"]
    return [f"- mask-fine-tuned: this UNet was fine-tuned ({info['finetuning']['algorithm']}) with every rollout "
            f"drawn from a lesion mask through the frozen ControlNet `{masks['controlnet_checkpoint']}` (sha256 "
            f"`{masks['controlnet_sha256']}`), whose EMA weights the bundle carries and adds to every prediction as "
            "the rollouts did",
            f"- ControlNet: MONAI `ControlNet` trained on `{controlnet['base_checkpoint']}` (sha256 "
            f"`{controlnet['base_sha256']}`), conditioning {controlnet['conditioning']!r}, scale "
            f"{controlnet['conditioning_scale']}, embedding channels {controlnet['embedding_channels']}; training "
            f"settings `{json.dumps(controlnet['training'])}`"]


MASK_LIMITATION = ("A mask asks for a lesion where the training data's lesions were; the ControlNet follows it only as "
                   "well as it learned to: check the volumes against their masks (e.g. a segmenter's Dice) before "
                   "relying on a lesion's place or extent.")


def mask_usage(controlnet: dict[str, Any]) -> list[str]:
    """How to run a ControlNet bundle on masks, and what a mask must be (the label channels and their meaning)."""
    size, channels = controlnet["mask_size"], controlnet["label_channels"]
    codes = ", ".join(f"{c['label']} ({c['meaning']})" for c in channels)
    return ["python -m monai.bundle run --config_file <bundle>/configs/inference.json --mask seg.nii.gz \\",
            "    --num_samples 2 --seed 0", "```", "",
            "`--mask` takes a NIfTI lesion mask or a folder of them. Each mask gets `num_samples` volumes "
            "`<mask>_sample_<k>.nii.gz` beside it (or in `--output_dir`) with the mask's affine and header, listed "
            "in `samples.csv` (file, mask, mask_sha256, label, seed); existing volumes are kept unless "
            "`--overwrite true`.", "", "## Masks", "",
            f"- a mask is one 3-D integer label map of {size}×{size}×{size} voxels in RAS+ orientation, as the "
            "training data's masks after preprocessing (`msrl data masks` writes a data set's)",
            f"- labels: 0 background and {codes}; condition channel k holds the k-th label:"]  + \
        [f"  - channel {c['channel']}: label {c['label']}, {c['meaning']}" for c in channels] + \
        ["- a mask with other values, another size, more dimensions, non-integer values or another orientation is "
         "refused before anything is drawn, naming the file and what differs",
         "- class label: `--label k` for every volume; the default `auto` gives class 1 to a mask with any lesion "
         "voxel and 0 to an empty one (the template cohort's rule, where class 1 is a lesion; for BraTS, whose "
         "classes are grades, pass `--label`)", ""]


def metadata(info: dict[str, Any], sampler: dict[str, Any], weights: dict[str, str], metrics: dict[str, Any] | None
             ) -> dict[str, Any]:
    """`configs/metadata.json`: MONAI's bundle metadata fields plus msrl's provenance."""
    model = info["model"]
    size = model["spatial_size"]
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by msrl export from {Path(info['checkpoint']['path']).name}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__, "required_packages_version": {"nibabel": nibabel.__version__},
        "name": f"msrl {info['checkpoint']['kind']} brain MRI generator ({size}³)",
        "task": ("lesion-mask-conditioned " if info.get("controlnet") else "")
        + ("class-conditional 3D brain MRI synthesis" if model["num_classes"] else "3D brain MRI synthesis"),
        "description": "DDIM sampling of an msrl diffusion model" + (" in a first stage's latent space"
                                                                      if info["first_stage"] else ""),
        "authors": "msrl export", "copyright": "see the training data's licence",
        "data_source": (info["data"] or {}).get("class_path", "not recorded"),
        "data_type": "nibabel", "intended_use": INTENDED_USE, "limitations": LIMITATIONS,
        "image_classes": f"{model['in_channels']} channel(s), intensities in [-1, 1]",
        "network_data_format": {
            "inputs": {"latent": {"type": "noise", "format": "image", "num_channels": model["sample_shape"][0],
                                  "spatial_shape": model["sample_shape"][1:], "dtype": "float32",
                                  "value_range": [None, None], "is_patch_data": False}, **mask_input(info)},
            "outputs": {"pred": {"type": "image", "format": "image", "num_channels": model["in_channels"],
                                 "spatial_shape": [size] * 3, "dtype": "float32", "value_range": [-1, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}}},
        "eval_metrics": eval_metrics(metrics), "sampler": sampler, "weights_sha256": weights,
        "msrl": info,
    }


def mask_input(info: dict[str, Any]) -> dict[str, Any]:
    """metadata.json's `mask` input of a ControlNet bundle (none otherwise): a label map and its codes."""
    controlnet = info.get("controlnet")
    if controlnet is None:
        return {}
    channels = controlnet["label_channels"]
    return {"mask": {"type": "image", "format": "labels", "num_channels": 1,
                     "spatial_shape": [controlnet["mask_size"]] * 3, "dtype": "uint8",
                     "value_range": [0, max(c["label"] for c in channels)], "is_patch_data": False,
                     "channel_def": {"0": "background", **{str(c["label"]): c["meaning"] for c in channels}}}}
