"""Give the TaLo model lm-eval's Task objects and the run's output folder.

lm-eval, like lmms-eval, hands a model only its requests; scoring a probe doc needs the Task's
filters and process_results. lm-eval's `evaluate()` receives the task dict, so this wraps it and
fills the same registry the lmms-eval side uses (lmms_talo.lmms.task_capture), so that the TaLo
mixin finds its tasks the same way under both harnesses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..lmms import task_capture


@dataclass(frozen=True)
class RunArgs:
    """The one CLI arg the report needs: where lm-eval writes its results (None: the current folder)."""

    output_path: str | None = None


RUN = {"args": RunArgs()}


def set_output_path(path: str | None) -> None:
    """lm-eval takes a folder or a results-file path; the report goes into the folder."""
    if path and path.endswith(".json"):
        path = str(Path(path).parent)
    RUN["args"] = RunArgs(path)


def _record(task_dict, kwargs) -> None:
    # lm-eval 0.4.13 passes {"tasks": {name: Task}, "groups": ..., "group_map": ...}; older ones a nested dict
    nested = isinstance(task_dict, dict) and isinstance(task_dict.get("tasks"), dict)
    task_capture.remember(task_dict["tasks"] if nested else task_dict, RUN["args"])


def install() -> None:
    """Remember each lm-eval run's tasks (and the output folder set_output_path was given)."""
    import lm_eval.evaluator as evaluator

    task_capture.wrap_evaluate(evaluator, _record)
