"""Give the model the evaluator's Task objects.

lmms-eval hands a model only requests and raw datasets; scoring a probe doc needs the Task's own
filters and process_results. The evaluator's `evaluate()` receives the task dict, so TaLo wraps it
(once, when a TaLo model is built) to remember the Task objects and the CLI args of the run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class CapturedRun:
    tasks: dict[str, Any] = field(default_factory=dict)  # task name -> Task
    cli_args: Any = None


CAPTURED = CapturedRun()


def _flatten(task_dict: dict, into: dict) -> None:
    for name, task in task_dict.items():
        if isinstance(task, dict):
            _flatten(task, into)
        elif isinstance(task, tuple):
            if task[1] is not None:
                into[task[1].config.task] = task[1]
        elif task is not None:
            into[getattr(task.config, "task", name)] = task


def remember(task_dict: dict, cli_args: Any = None) -> None:
    CAPTURED.tasks.clear()
    _flatten(task_dict, CAPTURED.tasks)
    CAPTURED.cli_args = cli_args


def wrap_evaluate(evaluator: Any, record: Callable[[Any, dict], None]) -> None:
    """Wrap `evaluator.evaluate` (an lmms-eval or lm-eval evaluator module) so that every run first
    calls `record(task_dict, kwargs)`; idempotent."""
    if getattr(evaluator.evaluate, "__talo_wrapped__", False):
        return
    original = evaluator.evaluate

    @functools.wraps(original)
    def evaluate(lm, task_dict, *args, **kwargs):
        record(task_dict, kwargs)
        return original(lm, task_dict, *args, **kwargs)

    evaluate.__talo_wrapped__ = True
    evaluator.evaluate = evaluate


def install() -> None:
    """Remember each lmms-eval run's task dict and CLI args."""
    import lmms_eval.evaluator as evaluator

    wrap_evaluate(evaluator, lambda task_dict, kwargs: remember(task_dict, kwargs.get("cli_args")))


def task(name: str) -> Any:
    try:
        return CAPTURED.tasks[name]
    except KeyError:
        raise RuntimeError(
            f"lmms-talo has no Task object for {name!r}: TaLo models must run through lmms-eval's "
            f"evaluator (the lmms-eval CLI or lmms_eval.evaluator.simple_evaluate)"
        ) from None
