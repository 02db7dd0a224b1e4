"""Figures of `msrl study`: a forest plot of the paired differences per arm, fine-tuning curves per arm over seeds.

Every function writes one PNG and returns its path (None when there is nothing to draw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lightning_modules import finetune_tags  # noqa: E402
from lightning_modules.finetune.base import metric_prefixes  # noqa: E402
from msrl.evaluation.figures import read_scalars  # noqa: E402
from msrl.study.tables import paper_rows  # noqa: E402
from msrl.study.units import find_row, pretrained_arms  # noqa: E402

COLOURS = {"better": "C2", "worse": "C3", "no difference": "0.4", "lower": "C0", "higher": "C1"}
# each a tag per fine-tuner (ppo/…, backprop/…): a unit's run logs under its algorithm's prefix
REWARD, HELDOUT_FID, ITERATION = "reward_raw/total", "heldout_fid", "iteration"


def forest_figure(results: dict[str, Any], path: Path) -> Path | None:
    """One panel per table row: each arm's mean paired difference to pretrained, its t-interval, the seeds' points
    (the arms compared with the pretrained model; a mask arm's baseline is another model)."""
    arms = pretrained_arms(results["study"])
    panels = [(label, fields) for label, fields in paper_rows(results)
              if any("paired" in (find_row(results["arms"][a]["rows"], **fields) or {}) for a in arms)]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 0.45 * len(arms) * rows + 1.4 * rows),
                             squeeze=False)
    for ax, (label, fields) in zip(axes.flat, panels, strict=False):
        for y, arm in enumerate(arms):
            row = find_row(results["arms"][arm]["rows"], **fields)
            if row is None or "paired" not in row:
                continue
            paired = row["paired"]
            colour = COLOURS.get(paired["verdict"], "0.4")
            if paired["ci95"]:
                ax.plot(paired["ci95"], [y, y], color=colour, lw=2)
            ax.plot(paired["mean"], y, "o", color=colour)
            points = [p["difference"] for p in paired["per_seed"]]
            ax.plot(points, y + np.linspace(-0.15, 0.15, len(points)), "x", color="k", ms=4, alpha=0.7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(arms)), arms, fontsize=8)
        ax.set_ylim(len(arms) - 0.5, -0.5)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("arm − pretrained", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("arm − pretrained, paired per seed: mean over seeds (dot) with 95 % t-interval, seeds (×); "
                 "green better, red worse, grey no difference", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def iteration_axis(scalars: dict[str, list[tuple[int, float]]], tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(iteration, value) of a tag: from its own `<tag>_iteration` scalar where logged (the held-out FID),
    else steps become iterations through the logged `<prefix>/iteration` (else steps).

    `tag` is a full tag (`ppo/heldout_fid`) or one without its prefix (`heldout_fid`), then read under
    whichever fine-tuner's prefix the run logged it (`finetune_tags`).
    """
    tag = next((t for t in (tag, *finetune_tags(tag)) if scalars.get(t)), tag)
    points = scalars.get(tag)
    if not points:
        return None
    steps, values = (np.asarray(v, dtype=np.float64) for v in zip(*points, strict=True))
    own = dict(scalars.get(f"{tag}_iteration", []))  # the held-out FID logs its iteration beside it
    if own and all(step in own for step in steps.tolist()):
        return np.array([own[step] for step in steps.tolist()]), values
    logged = scalars.get(f"{tag.split('/', 1)[0]}/{ITERATION}")
    if not logged:
        return steps, values
    at, iteration = (np.asarray(v, dtype=np.float64) for v in zip(*logged, strict=True))
    x = np.interp(steps, at, iteration)
    if len(at) >= 2:  # e.g. the held-out FID before the first iteration: extend the step → iteration line
        slope, intercept = np.polyfit(at, iteration, 1)
        outside = (steps < at.min()) | (steps > at.max())
        x[outside] = slope * steps[outside] + intercept
    return np.round(x, 6), values


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """x, mean, min, max over seeds at every x any seed has (each x averages the seeds that have it)."""
    by_x: dict[float, list[float]] = {}
    for x, y in curves:
        for a, b in zip(x.tolist(), y.tolist(), strict=True):
            by_x.setdefault(a, []).append(b)
    xs = np.array(sorted(by_x))
    stacked = [np.asarray(by_x[x]) for x in xs]
    return (xs, np.array([v.mean() for v in stacked]), np.array([v.min() for v in stacked]),
            np.array([v.max() for v in stacked]))


def unit_tag(results: dict[str, Any], arm: str, tag: str) -> str:
    """The tag as the arm's run logs it: a tag without a prefix gets the arm's algorithm's (`backprop/heldout_fid`);
    for a study.json that does not record the algorithm, `iteration_axis` finds whichever prefix was logged."""
    prefix = (results["study"].get("algorithms") or {}).get(arm)
    if prefix is None or tag.split("/", 1)[0] in metric_prefixes():
        return tag
    return f"{prefix}/{tag}"


def unit_curves(out_dir: Path, results: dict[str, Any], tag: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """{arm: [(iterations, values) per finished seed]} of one tag from the units' fine-tuning events, each
    unit's read under its own algorithm's prefix (`unit_tag`)."""
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for unit in results["units"]["finished"]:
        folder = out_dir / unit["folder"] / "finetune"
        curve = iteration_axis(read_scalars(folder), unit_tag(results, unit["arm"], tag)) if folder.is_dir() else None
        if curve is not None:
            curves.setdefault(unit["arm"], []).append(curve)
    return curves


def curves_figure(curves: dict[str, list[tuple[np.ndarray, np.ndarray]]], title: str, path: Path,
                  shared: bool) -> Path | None:
    """Mean over seeds with a min–max band, per arm: all arms on one axis (`shared`) or a panel each."""
    if not curves:
        return None
    arms = list(curves)
    panels = 1 if shared else len(arms)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels if not shared else 6.5, 3.4), squeeze=False)
    for index, arm in enumerate(arms):
        ax = axes[0][0 if shared else index]
        x, mean, low, high = band(curves[arm])
        colour = f"C{index}"
        ax.plot(x, mean, color=colour, marker="." if len(x) < 30 else None, label=f"{arm} ({len(curves[arm])} seeds)")
        ax.fill_between(x, low, high, color=colour, alpha=0.2, lw=0)
        ax.set_xlabel("fine-tuning iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: mean over seeds, band min–max", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_figures(results: dict[str, Any], out_dir: Path, folder: Path) -> dict[str, str]:
    """Every figure into `folder`; {name: path relative to the study folder} of those drawn."""
    drawn = {
        "forest": forest_figure(results, folder / "forest.png"),
        "reward_curves": curves_figure(unit_curves(out_dir, results, REWARD),
                                       f"{REWARD} (raw; each arm its own reward)", folder / "reward_curves.png",
                                       shared=False),
        "heldout_fid_curves": curves_figure(unit_curves(out_dir, results, HELDOUT_FID), HELDOUT_FID,
                                            folder / "heldout_fid_curves.png", shared=True),
    }
    return {name: f"figures/{path.name}" for name, path in drawn.items() if path is not None}
