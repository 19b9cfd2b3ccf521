"""The demo's result table and heatmap, read from the TaLo report of the run.

Per task: the chance level over its test docs, the base model's test accuracy with a 95% Wilson
interval, the selected layer and its probe gain, TaLo's test accuracy, the difference, and the
seconds TaLo spent (sweep + evaluation under the selected knockout), and its process's peak
resident memory once the task was done.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmms_talo.outputs.report_reader import Run

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound at small n and near 0 or 1."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class TaskRow:
    task: str
    request_type: str
    test_n: int
    chance: float
    base: float | None
    base_ci: tuple[float, float]
    layer: int | None
    probe_gain: float | None
    probe_base: float | None
    talo: float | None
    difference: float | None
    seconds: float
    peak_rss_mb: float | None
    reason: str


def rows_of(run: Run, chances: dict[str, dict[str, float]]) -> list[TaskRow]:
    """One row per sub-task; `chances[task][doc id]` is the chance level of each doc (1 / options)."""
    rows = []
    for sub in run.subtasks:
        pool = set(sub.pool)
        base, talo = sub.test("base"), sub.test("talo")
        test_docs = [d for d in (base.get("doc_scores") or talo.get("doc_scores") or {}) if d not in pool]
        per_doc = chances.get(sub.task, {})
        chance = float(np.mean([per_doc[d] for d in test_docs])) if test_docs and per_doc else math.nan
        n = base.get("n") or 0
        base_score = base.get("doc_mean")  # a proportion (the demo's tasks aggregate by mean: the same as score)
        layer = sub.selected_layer
        rows.append(
            TaskRow(
                task=sub.name,
                request_type=sub.request_type,
                test_n=n,
                chance=chance,
                base=base_score,
                base_ci=wilson_interval(base_score * n, n) if base_score is not None else (math.nan, math.nan),
                layer=layer,
                probe_gain=sub.interaction_vector.get(layer) if layer is not None else None,
                probe_base=sub.final_baseline,
                talo=talo.get("doc_mean"),
                difference=sub.test_difference_doc_mean,
                seconds=sub.seconds,
                peak_rss_mb=sub.memory.get("peak_rss_mb"),
                reason=sub.selection_reason,
            )
        )
    return rows


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[TaskRow]) -> str:
    """A fixed-width text table (also valid inside a Markdown code block)."""
    head = (
        "task",
        "scored by",
        "test n",
        "chance",
        "base [95% CI]",
        "layer",
        "probe gain",
        "TaLo",
        "diff",
        "seconds",
        "peak MB",
    )
    lines = []
    for r in rows:
        ci = f"{_fmt(r.base)} [{_fmt(r.base_ci[0], '.2f')}, {_fmt(r.base_ci[1], '.2f')}]"
        lines.append(
            (
                r.task,
                "likelihood" if r.request_type == "loglikelihood" else "generation",
                str(r.test_n),
                _fmt(r.chance),
                ci,
                "-" if r.layer is None else str(r.layer),
                _fmt(r.probe_gain, "+.3f"),
                _fmt(r.talo),
                _fmt(r.difference, "+.3f"),
                f"{r.seconds:.0f}",
                _fmt(r.peak_rss_mb, ".0f"),
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(line) for line in lines)])


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
