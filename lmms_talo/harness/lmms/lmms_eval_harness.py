"""lmms-eval behind the Harness interface (lmms_talo.harness.base)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from lmms_talo.harness import evaluation_scope
from lmms_talo.harness.answer_cache import as_answer, serving
from lmms_talo.harness.base import Harness, remember_own_scoring
from lmms_talo.harness.lmms.fixes import loglikelihood_outputs_kept, unwrap_output
from lmms_talo.logs import log
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


class ResponseCacheAnswers:
    """lmms-eval's response cache (`--use_cache`) under TaLo's keys (lmms_talo.harness.answer_cache):
    its own lookup and store, with TaLo's variant key in place of the model-args fingerprint."""

    def __init__(self, cache, reqtype: str, execute):
        self.cache, self.reqtype, self.execute = cache, reqtype, execute

    def answers(self, requests, variant_key, compute):
        if not hasattr(self.cache, "_model_fingerprint_hash"):  # another lmms-eval: never serve unkeyed answers
            log.warning(
                "lmms-talo: this lmms-eval's response cache cannot be keyed by TaLo's knockout: "
                "TaLo's answers are computed, not cached"
            )
            return compute(requests), 0
        model = SimpleNamespace(**{self.reqtype: compute})
        saved, hits = self.cache._model_fingerprint_hash, self.cache._hits
        self.cache._model_fingerprint_hash = f"talo-{variant_key}"
        try:
            answers = self.execute(self.cache, model, self.reqtype, requests)
        finally:
            self.cache._model_fingerprint_hash = saved
        return [as_answer(self.reqtype, a) for a in answers], self.cache._hits - hits


def _talo_response_cache(execute):
    """Wrap ResponseCache.execute: a TaLo model gets every request, and caches only its own answers."""
    if getattr(execute, "__talo_wrapped__", False):
        return execute

    @functools.wraps(execute)
    def talo_execute(cache, lm, reqtype, requests):
        from lmms_talo.harness.mixin import TaloMixin

        if not isinstance(lm, TaloMixin) or reqtype not in ("generate_until", "loglikelihood"):
            return execute(cache, lm, reqtype, requests)
        with serving(lm, ResponseCacheAnswers(cache, reqtype, execute)):
            return getattr(lm, reqtype)(requests)

    talo_execute.__talo_wrapped__ = True
    return talo_execute


class LmmsEval(Harness):
    name = "lmms-eval"
    model_packages = ("lmms_eval.models",)
    likelihood_is_loss = True  # its multiple_choice process_results takes the argmin

    def install(self) -> None:
        import lmms_eval.evaluator as evaluator
        from lmms_eval.api.task import Task
        from lmms_eval.caching.response_cache import ResponseCache
        from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

        evaluation_scope.wrap_evaluate(evaluator, _scope)
        remember_own_scoring(Task)
        ResponseCache.execute = _talo_response_cache(ResponseCache.execute)
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
