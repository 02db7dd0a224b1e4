"""The report's figures: training curves from TensorBoard events, metric bars, slices, histograms, mask contours.

Every function writes one PNG and returns its path (None when the inputs hold nothing to draw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402

from datamodules.preprocessing import FOREGROUND_THRESHOLD, foreground_histogram  # noqa: E402
from lightning_modules.controlnet import BRATS_LABELS  # noqa: E402
from lightning_modules.slices import PLANES, plane_slices  # noqa: E402
from lightning_modules.visualize import orthogonal_slices  # noqa: E402
from msrl.evaluation.tables import find, main_view  # noqa: E402


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), …]} of every TensorBoard event file under `run_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(points) for tag, points in scalars.items()}


def curves_figure(runs: dict[str, dict[str, list[tuple[int, float]]]], prefixes: tuple[str, ...], title: str,
                  path: Path) -> Path | None:
    """One panel per tag starting with any of `prefixes`, one line per run (e.g. ppo/reward/* per component)."""
    tags = sorted({tag for scalars in runs.values() for tag in scalars if tag.startswith(prefixes)})
    if not tags:
        return None
    columns = min(3, len(tags))
    rows = -(-len(tags) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags, strict=False):
        for run, scalars in runs.items():
            if tag in scalars:
                steps, values = zip(*scalars[tag], strict=True)
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=run)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metric_bars(result: dict[str, Any], path: Path) -> Path | None:
    """FID and KID (95 % bootstrap intervals over volumes) per source against the held-out reference."""
    extractors = result["extractors"]
    if not result["entries"] or not extractors:
        return None
    fig, axes = plt.subplots(2, len(extractors), figsize=(4.5 * len(extractors), 6.5), squeeze=False)
    names = [entry["name"] for entry in result["entries"]]
    reference = result["data"]["real_split"]
    for column, extractor in enumerate(extractors):
        view = main_view(result, extractor)
        for row, metric in enumerate(("fid", "kid")):
            ax = axes[row][column]
            found = [find(e["records"], metric, extractor=extractor, view=view, reference=reference,
                          **{"class": "all"}) for e in result["entries"]]
            values = [r["value"] if r else float("nan") for r in found]
            pairs = list(zip(values, found, strict=True))
            errors = [[max(0.0, v - r["ci95"][0]) if r and r["ci95"] else 0.0 for v, r in pairs],
                      [max(0.0, r["ci95"][1] - v) if r and r["ci95"] else 0.0 for v, r in pairs]]
            ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=f"C{row}")
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
            ax.set_title(f"{metric.upper()} ({view}) — {extractor}", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"lower is better; against the {reference} split; bars: 95 % bootstrap intervals over volumes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def brightest_cluster(volume: torch.Tensor, size: int = 3, background: float = FOREGROUND_THRESHOLD
                      ) -> tuple[int, int, int]:
    """Voxel (d, h, w) at the centre of the brightest compact cluster inside the brain of volume [C, D, H, W].

    The first channel's brain voxels (above `background`) are averaged over a `size`³ box around
    each brain voxel whose box lies wholly in the brain (any brain voxel if none does), and the
    maximum wins: a lesion's rim, the brightest thing in a class-1 MS volume, rather than a single
    bright voxel of noise or the brain's edge. w is the axial slice (the last axis is inferior→superior).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the cluster's box side must be odd and >= 1, got {size}")
    image = volume[:1].float()[None]  # [1, 1, D, H, W]
    brain = (image > background).float()
    if not brain.any():
        raise ValueError(f"the volume has no voxel above the background {background}: no brain to search")
    box = {"kernel_size": size, "stride": 1, "padding": size // 2, "count_include_pad": True}
    share = F.avg_pool3d(brain, **box)
    smoothed = F.avg_pool3d(image * brain, **box) / share.clamp_min(1e-6)
    inside = share > 1 - 1e-6
    candidates = inside if inside.any() else brain.bool()
    index = int(torch.where(candidates, smoothed, torch.tensor(-torch.inf)).flatten().argmax())
    d, h, w = (int(i) for i in torch.unravel_index(torch.tensor(index), image.shape[2:]))
    return d, h, w


def slice_comparison(sources: dict[str, tuple[torch.Tensor, torch.Tensor]], label: int, path: Path,
                     per_source: int = 2, brightest: bool = False) -> Path | None:
    """Rows: real, then each model; columns: axial/coronal/sagittal middle slices of `per_source` volumes of a class.

    With `brightest`, each volume also shows the axial slice through its brightest compact cluster
    (`brightest_cluster`, circled) beside the middle one, so a reader sees whether a lesion is drawn.
    """
    rows = {name: volumes[labels == label][:per_source] for name, (volumes, labels) in sources.items()}
    rows = {name: volumes for name, volumes in rows.items() if len(volumes)}
    if not rows:
        return None
    titles = ["axial", "axial (brightest)", *PLANES[1:]] if brightest else list(PLANES)
    width = len(titles)
    fig, axes = plt.subplots(len(rows), width * per_source, figsize=(2.0 * width * per_source, 2.1 * len(rows)),
                             squeeze=False)
    for r, (name, volumes) in enumerate(rows.items()):
        for v in range(per_source):
            panels = _slice_panels(volumes[v], brightest) if v < len(volumes) else [(None, None)] * width
            for p, (image, caption) in enumerate(panels):
                ax = axes[r][width * v + p]
                if image is not None:
                    ax.imshow(image.numpy(), cmap="gray", vmin=-1, vmax=1)
                if caption is not None:
                    x, y, text = caption
                    radius = max(2.5, image.shape[0] / 8)  # around the cluster, not over it
                    ax.add_patch(Circle((x, y), radius, fill=False, edgecolor="red", linewidth=1))
                    ax.set_xlabel(text, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{titles[p]} #{v + 1}", fontsize=8)
                if width * v + p == 0:
                    ax.set_ylabel(name, fontsize=8)
    where = "middle slices; the brightest compact cluster's axial slice circled" if brightest else "middle slices"
    fig.suptitle(f"class {label}: real vs generated ({where})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slice_panels(volume: torch.Tensor, brightest: bool) -> list[tuple[torch.Tensor, tuple | None]]:
    """(image, marker) per column: the middle slices, with the brightest cluster's axial slice second."""
    slices = orthogonal_slices(volume)
    panels: list[tuple[torch.Tensor, tuple | None]] = [(image, None) for image in slices]
    if brightest:
        d, h, w = brightest_cluster(volume)
        image = plane_slices(volume[None, :1].float(), "axial", torch.tensor([w]))[0, 0, 0].T.flip(0)
        # as orthogonal_slices orients an axial slice: rows run anterior→posterior (flipped H), columns along D
        panels.insert(1, (image, (d, volume.shape[2] - 1 - h, f"z = {w} of {volume.shape[3]}")))
    return panels


def histogram_figure(sources: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, bins: int = 64,
                     background: float = FOREGROUND_THRESHOLD) -> Path | None:
    """Mean foreground intensity histogram of each source (real and every model) on one axis."""
    if not sources:
        return None
    centres = torch.linspace(-1, 1, bins + 1)[:-1] + 1 / bins
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (volumes, _) in sources.items():
        mean = torch.stack([foreground_histogram(v, bins, background) for v in volumes]).mean(0)
        ax.plot(centres.numpy(), mean.numpy(), label=name, linewidth=2 if name == "real" else 1)
    ax.set_xlabel("intensity (normalised to [-1, 1])")
    ax.set_ylabel("share of foreground voxels")
    ax.set_title("foreground intensity histograms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def paired_forest(result: dict[str, Any], path: Path) -> Path | None:
    """Forest plot of every paired difference (all classes): point, 95 % interval, zero line, coloured by verdict."""
    rows = [(comparison["candidate"], row) for comparison in result.get("comparisons", [])
            for row in comparison["records"] if row["class"] == "all"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    colours = {"better": "C2", "worse": "C3", "no difference": "0.5"}
    for y, (_, row) in enumerate(rows):
        scale = max(abs(row["ci95"][0]), abs(row["ci95"][1]), abs(row["difference"]), 1e-12)
        low, high = row["ci95"][0] / scale, row["ci95"][1] / scale
        ax.plot([low, high], [y, y], color=colours[row["verdict"]], lw=2)
        ax.plot(row["difference"] / scale, y, "o", color=colours[row["verdict"]])
    labels = [f"{c}: {r['metric']} ({r.get('extractor') or r.get('train_set') or '–'})"[:80] for c, r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("difference / max(|interval end|) (each row scaled to its own interval)")
    ax.set_title("candidate − baseline, paired; green: better, red: worse, grey: no difference", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CONTOUR_COLOURS = {1: "tab:red", 2: "tab:green", 4: "tab:orange"}  # necrotic core, oedema, enhancing tumour


def lesion_centre_slice(mask: torch.Tensor) -> int:
    """The axial slice (last axis, inferior→superior) through the centre of mass of a mask [1, D, H, W]'s lesion."""
    weights = (mask[0] > 0).float().sum((0, 1))
    if not weights.any():
        raise ValueError("the mask has no lesion voxel: no slice through its centre")
    return int(torch.round((weights * torch.arange(len(weights))).sum() / weights.sum()))


def mask_contours(rows: dict[str, torch.Tensor], masks: torch.Tensor, path: Path) -> Path:
    """One row per source (the real volumes first), one column per mask: the axial slice through the
    lesion's centre in grey, each label's contour drawn over it in its colour.

    Args:
        rows: {source name: volumes [K, C, S, S, S] in [-1, 1]}, volume k drawn from (or showing) masks[k].
        masks: [K, 1, S, S, S] label codes (BraTS: 1, 2, 4).
        path: the PNG written.
    """
    count = len(masks)
    fig, axes = plt.subplots(len(rows), count, figsize=(max(2.3 * count + 1.0, 6.0), 2.3 * len(rows) + 0.9),
                             squeeze=False)
    present = sorted(int(v) for v in masks.unique().tolist() if v)
    for c in range(count):
        w = lesion_centre_slice(masks[c])
        mask_slice = masks[c, 0, :, :, w].T.flip(0)  # as orthogonal_slices: rows anterior→posterior, columns along D
        for r, (name, volumes) in enumerate(rows.items()):
            ax = axes[r][c]
            ax.imshow(volumes[c, 0, :, :, w].T.flip(0).float().numpy(), cmap="gray", vmin=-1, vmax=1)
            for label in present:
                if (mask_slice == label).any():
                    ax.contour((mask_slice == label).float().numpy(), levels=[0.5],
                               colors=[CONTOUR_COLOURS.get(label, "tab:blue")], linewidths=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"mask #{c + 1}, z = {w}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    handles = [Line2D([], [], color=CONTOUR_COLOURS.get(label, "tab:blue"),
                      label=f"{BRATS_LABELS.get(label, 'label')} ({label})") for label in present]
    fig.legend(handles=handles, loc="lower center", ncol=max(len(handles), 1), fontsize=8)
    fig.suptitle("held-out masks (contours) over the volume each source drew from them\n"
                 "(axial slice through the lesion's centre; real: the volume the mask belongs to)", fontsize=9)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1 - 0.55 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
