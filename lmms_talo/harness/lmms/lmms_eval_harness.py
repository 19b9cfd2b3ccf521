"""lmms-eval behind the Harness interface (lmms_talo.harness.base)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from lmms_talo.harness import evaluation_scope
from lmms_talo.harness.base import Harness, remember_own_scoring
from lmms_talo.harness.lmms.fixes import loglikelihood_outputs_kept, unwrap_output
from lmms_talo.outputs.harness_annotations import with_probe_log


@contextlib.contextmanager
def _scope(lm, task_dict: dict, kwargs: dict):
    """One lmms-eval evaluation: its tasks and CLI args; for a TaLo model, lmms-eval's loglikelihood
    outputs kept as tuples (lmms_talo.harness.lmms.fixes) while it runs. A plain model's runs as lmms-eval's own."""
    from lmms_talo.harness.mixin import TaloMixin

    repairs = loglikelihood_outputs_kept() if isinstance(lm, TaloMixin) else contextlib.nullcontext()
    scope = evaluation_scope.evaluation(
        evaluation_scope.tasks_of(task_dict),
        kwargs.get("cli_args"),
        kwargs.get("limit"),
        kwargs.get("log_samples", True),
    )
    with scope, repairs:
        yield


class LmmsEval(Harness):
    name = "lmms-eval"
    model_packages = ("lmms_eval.models",)
    likelihood_is_loss = True  # its multiple_choice process_results takes the argmin

    def install(self) -> None:
        import lmms_eval.evaluator as evaluator
        from lmms_eval.api.task import Task
        from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

        evaluation_scope.wrap_evaluate(evaluator, _scope)
        remember_own_scoring(Task)
        EvaluationTracker.save_results_samples = with_probe_log(
            EvaluationTracker.save_results_samples,
            lambda date, task: (f"{date}_samples_{task}.jsonl", f"{date}_samples_{task}_talo_probe.jsonl"),
        )

    def unwrap(self, output: Any) -> Any:
        return unwrap_output(output)[0]

    def request(self, task: Any, request_type: str, arguments: Sequence[Any], idx: int, metadata: Any) -> Any:
        from lmms_eval.api.instance import Instance

        return Instance(request_type=request_type, arguments=tuple(arguments), idx=idx, metadata=metadata)


LMMS_EVAL = LmmsEval()
