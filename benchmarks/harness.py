"""The measuring machinery: alternate A and B, keep every sample, report medians and spreads.

A benchmark row is a `PairResult`: A (msrl) against B (the baseline), measured the same number of
times. `compare(key, a, b)` is the hook for a new row: two zero-argument callables, run one
warm-up each, then `repeats` times in alternating order (A B, B A, A B, …) so that load from
other processes on a shared machine falls on both alike. The row's value is the median of the
paired ratios A_i / B_i, its spread their minimum and maximum.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A callable of a pair: runs one repetition; returns None to be timed by the wall clock around the
# call, or the seconds it measured itself (e.g. only the steady-state steps inside a Trainer fit).
Workload = Callable[[], float | None]


@dataclass
class PairResult:
    """One row: A against B.

    Attributes:
        key: the row's name in results.json (`pretrain_step_ratio`, …).
        a: A's measurements (seconds, or `unit`), one per repetition.
        b: B's measurements, paired with `a` by index.
        goal: the row holds when the median ratio is ≤ goal (None: no goal).
        a_label: what A is.
        b_label: what B is.
        unit: unit of `a` and `b`.
    """

    key: str
    a: list[float]
    b: list[float]
    goal: float | None
    a_label: str
    b_label: str
    unit: str = "s"

    def __post_init__(self) -> None:
        if len(self.a) != len(self.b) or not self.a:
            raise ValueError(f"{self.key}: A and B need the same, non-zero number of measurements, "
                             f"got {len(self.a)} and {len(self.b)}")

    @property
    def ratios(self) -> list[float]:
        """A_i / B_i for every repetition."""
        return [x / y for x, y in zip(self.a, self.b, strict=True)]

    @property
    def value(self) -> float:
        """Median of the paired ratios."""
        return statistics.median(self.ratios)

    @property
    def holds(self) -> bool | None:
        """Whether the median ratio meets the goal (None without a goal)."""
        return None if self.goal is None else self.value <= self.goal

    def to_json(self) -> dict[str, Any]:
        """The row as results.json stores it."""
        return {"value": self.value, "ratio_min": min(self.ratios), "ratio_max": max(self.ratios),
                "goal": self.goal, "holds": self.holds, "a_median": statistics.median(self.a),
                "b_median": statistics.median(self.b), "unit": self.unit, "a": self.a, "b": self.b,
                "a_label": self.a_label, "b_label": self.b_label, "repeats": len(self.a)}


def _no_sync() -> None:
    """Nothing to wait for on the CPU."""


def measure(workload: Workload, sync: Callable[[], None] = _no_sync) -> float:
    """Seconds of one call of `workload` (or what it reports itself)."""
    sync()
    start = time.perf_counter()
    reported = workload()
    sync()
    elapsed = time.perf_counter() - start
    return elapsed if reported is None else float(reported)


def compare(key: str, a: Workload, b: Workload, *, goal: float | None, repeats: int, a_label: str, b_label: str,
            warmup: int = 1, sync: Callable[[], None] = _no_sync) -> PairResult:
    """Time A and B alternately: `warmup` untimed calls of each, then `repeats` timed pairs.

    Args:
        key: the row's name, e.g. "latent_rollout_ratio".
        a: msrl's workload (one repetition per call).
        b: the baseline's workload.
        goal: the ratio A/B the row should stay under.
        repeats: timed repetitions of each.
        a_label: what A is, for the table.
        b_label: what B is.
        warmup: untimed calls of each before timing (allocations, oneDNN primitive caches).
        sync: waits for queued device work (torch.cuda.synchronize on a GPU).

    Returns:
        The `PairResult`, seconds per call (or per whatever unit the workloads report).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        a()
        b()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for repetition in range(repeats):
        order = ("a", "b") if repetition % 2 == 0 else ("b", "a")
        for side in order:
            times[side].append(measure(a if side == "a" else b, sync))
        log.info("  %s %d/%d: A %.3f s, B %.3f s", key, repetition + 1, repeats, times["a"][-1], times["b"][-1])
    return PairResult(key, times["a"], times["b"], goal, a_label, b_label)


@dataclass
class Table:
    """A plain table of measurements (the PPO split, the scaling tables, the GPU throughput)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """GitHub markdown, numbers with 3 significant digits."""
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3g}"
    return "n/a" if value is None else str(value)


@dataclass
class Report:
    """Everything a run measured: the ratio rows, further tables, notes and the run's context."""

    meta: dict[str, Any]
    pairs: dict[str, PairResult] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_pair(self, result: PairResult) -> None:
        """Keep a row (one per key)."""
        if result.key in self.pairs:
            raise ValueError(f"row {result.key} was measured twice")
        self.pairs[result.key] = result
        log.info("%s = %.3f (%.3f–%.3f)", result.key, result.value, min(result.ratios), max(result.ratios))

    def pair_table(self) -> Table:
        """The ratio table: key, A and B medians, ratio median [min–max], goal, holds."""
        rows = []
        for r in self.pairs.values():
            spread = f"{r.value:.3f} [{min(r.ratios):.3f}–{max(r.ratios):.3f}]"
            verdict = "—" if r.holds is None else ("yes" if r.holds else "**no**")
            rows.append([f"`{r.key}`", f"{statistics.median(r.a):.4g} {r.unit} ({r.a_label})",
                         f"{statistics.median(r.b):.4g} {r.unit} ({r.b_label})", spread,
                         "—" if r.goal is None else f"≤ {r.goal:.2f}", verdict])
        return Table("A/B ratios (median of paired ratios [min–max])",
                     ["key", "A median (msrl)", "B median (baseline)", "ratio", "goal", "holds"], rows)

    def markdown(self) -> str:
        """The whole report as markdown: context, the ratio table, the other tables, notes."""
        meta = self.meta
        parts = [f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ",
                 f"Machine: {meta['machine']}  ", f"Sizes: preset `{meta['preset']}`, {meta['repeats']} "
                 f"repetitions per pair after one warm-up, A/B alternating; {meta['threads']}", "",
                 self.pair_table().markdown()]
        parts += ["\n" + table.markdown() for table in self.tables.values()]
        if self.notes:
            parts += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        """What results.json holds."""
        return {"meta": self.meta, "ratios": {key: r.to_json() for key, r in self.pairs.items()},
                "tables": {key: {"title": t.title, "columns": t.columns, "rows": t.rows}
                           for key, t in self.tables.items()},
                "notes": self.notes}

    def write_json(self, path: Path) -> None:
        """Write results.json (numbers as plain floats)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, default=float) + "\n")


def update_markdown_block(path: Path, block: str, text: str) -> None:
    """Replace the text between `<!-- bench:<block>:start -->` and its end marker (append it if missing)."""
    start, end = f"<!-- bench:{block}:start -->", f"<!-- bench:{block}:end -->"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    new_block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + new_block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + new_block + "\n"
    path.write_text(new)


def medians(samples: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Per-key median over a list of measurement dicts."""
    return {key: statistics.median(sample[key] for sample in samples) for key in keys}
