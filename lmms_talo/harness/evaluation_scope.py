"""The process-global state of TaLo, in one place, with one lifetime: one harness evaluation.

A harness evaluation (one call of lmms-eval's or lm-eval's `evaluate()`) opens an `Evaluation`:
each harness (lmms_talo.harness.base) wraps `evaluate()` with `wrap_evaluate` once, and every call then
runs inside `evaluation(...)`, holding the run's Task objects (the adapter needs their filters and
process_results: the harnesses hand a model only requests), its CLI args and the probe splits the
adapter published. Tasks that exclude the probe pool from their own aggregate (the bundled talo_*
configs) read the pool from here, so the task and the adapter cannot disagree about which docs were
probed. When `evaluate()` returns or raises, the state is gone: a second evaluation in the same
process (a plain model after a TaLo one, another --limit) never sees the first one's tasks or splits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmms_talo.method.probe_split import ProbeSplit


@dataclass
class Evaluation:
    tasks: dict[str, Any]  # task name -> Task
    cli_args: Any = None
    limit: Any = None  # the harness's --limit: the docs TaLo sees (and splits) are the limited ones
    log_samples: bool = True  # the harness keeps sample rows: TaLo's probe log goes beside them
    splits: dict[str, ProbeSplit] = field(default_factory=dict)  # sub-task name -> its probe split

    def task(self, name: str) -> Any:
        try:
            return self.tasks[name]
        except KeyError:
            raise RuntimeError(f"lmms-talo has no Task object for {name!r} in this evaluation") from None


_current: Evaluation | None = None


@contextlib.contextmanager
def evaluation(
    tasks: dict[str, Any], cli_args: Any = None, limit: Any = None, log_samples: bool = True
) -> Iterator[Evaluation]:
    """The state of one evaluation; an evaluation opened inside another gets its own, and the outer
    one's is back when it ends."""
    global _current
    outer, _current = _current, Evaluation(dict(tasks), cli_args, limit, log_samples)
    try:
        yield _current
    finally:
        _current = outer


def current() -> Evaluation:
    if _current is None:
        raise RuntimeError(
            "lmms-talo found no evaluation in progress: TaLo models must run through the harness's "
            "evaluator (the lmms-eval / lm-eval CLI, or their evaluator's simple_evaluate)"
        )
    return _current


def publish(split: ProbeSplit) -> None:
    current().splits[split.name] = split


def published(name: str) -> ProbeSplit | None:
    return _current.splits.get(name) if _current is not None else None


def published_names() -> list[str]:
    """The sub-tasks that have a published split in the current evaluation."""
    return sorted(_current.splits) if _current is not None else []


def tasks_of(task_dict: dict) -> dict[str, Any]:
    """task name -> Task, from an evaluator's (possibly nested, grouped) task dict."""
    found: dict[str, Any] = {}
    _flatten(task_dict, found)
    return found


def _flatten(task_dict: dict, into: dict) -> None:
    for name, task in task_dict.items():
        if isinstance(task, dict):
            _flatten(task, into)
        elif isinstance(task, tuple):
            if task[1] is not None:
                into[task[1].config.task] = task[1]
        elif task is not None:
            into[getattr(task.config, "task", name)] = task


def wrap_evaluate(evaluator: Any, scope: Callable[[Any, dict, dict], contextlib.AbstractContextManager]) -> None:
    """Wrap `evaluator.evaluate` (an lmms-eval or lm-eval evaluator module) so that every call runs
    inside `scope(lm, task_dict, kwargs)`, and a TaLo model then annotates the results the harness
    writes out (`talo_annotate_results`, lmms_talo.outputs.harness_annotations; None on ranks > 0); idempotent."""
    if getattr(evaluator.evaluate, "__talo_wrapped__", False):
        return
    original = evaluator.evaluate

    @functools.wraps(original)
    def evaluate(lm, task_dict, *args, **kwargs):
        with scope(lm, task_dict, kwargs):
            results = original(lm, task_dict, *args, **kwargs)
        annotate = getattr(lm, "talo_annotate_results", None)
        if annotate is not None and results is not None:
            annotate(results)
        return results

    evaluate.__talo_wrapped__ = True
    evaluator.evaluate = evaluate
