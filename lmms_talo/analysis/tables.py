"""The paper-style results table: per sub-task base and TaLo scores on the test docs, the difference,
the selected layer(s); per task (and over all tasks) the mean over the sub-tasks (macro) and over all
their test docs (micro). Scores are per-doc means (runs.doc_mean), so that docs can be pooled; the
benchmark's own metric per sub-task is the report's test.*.score."""

from __future__ import annotations

from dataclasses import dataclass

from lmms_talo.outputs.report_reader import Run, Subtask, doc_mean


@dataclass
class Row:
    task: str
    subtask: str
    n: int
    base: float | None
    talo: float | None
    layers: str  # '7', '3+7', or '-' for the full model

    @property
    def difference(self) -> float | None:
        return None if self.base is None or self.talo is None else self.talo - self.base


def _test_entry(sub: Subtask, which: str) -> dict:
    return sub.data.get("test", {}).get(which) or {}


def _micro(subs: list[Subtask], which: str) -> float | None:
    """Mean over all test docs of the sub-tasks (what a task-level aggregate over test docs gives)."""
    total = weight = 0.0
    for sub in subs:
        entry = _test_entry(sub, which)
        if doc_mean(entry) is None:
            return None
        total += doc_mean(entry) * entry["n"]
        weight += entry["n"]
    return total / weight if weight else None


def _macro(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def subtask_row(sub: Subtask) -> Row:
    talo = _test_entry(sub, "talo")
    label = sub.selected_label
    return Row(
        sub.task,
        sub.name,
        talo.get("n", 0),
        doc_mean(_test_entry(sub, "base")),
        doc_mean(talo),
        "-" if label == "base" else label,
    )


def mean_rows(name: str, subs: list[Subtask]) -> list[Row]:
    """The mean over the sub-tasks (macro) and over all their test docs (micro)."""
    rows = [subtask_row(s) for s in subs]
    n = sum(r.n for r in rows)
    return [
        Row(
            name,
            f"{name}: mean of {len(rows)} sub-tasks",
            n,
            _macro([r.base for r in rows]),
            _macro([r.talo for r in rows]),
            "",
        ),
        Row(name, f"{name}: all test docs", n, _micro(subs, "base"), _micro(subs, "talo"), ""),
    ]


def paper_table(run: Run) -> list[Row]:
    """Sub-task rows grouped by task, each task followed by its means when it has several sub-tasks,
    and the means over everything when the run has several tasks."""
    tasks: dict[str, list[Subtask]] = {}
    for sub in run.subtasks:
        tasks.setdefault(sub.task, []).append(sub)
    table = []
    for task, subs in tasks.items():
        table += [subtask_row(s) for s in subs]
        if len(subs) > 1:
            table += mean_rows(task, subs)
    if len(tasks) > 1:
        table += mean_rows("all tasks", run.subtasks)
    return table
