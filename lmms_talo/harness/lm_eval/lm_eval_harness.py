"""lm-eval (lm-evaluation-harness) behind the Harness interface (lmms_talo.harness.base).

lm-eval, like lmms-eval, hands a model only its requests; scoring a probe doc needs the Task's
filters and process_results. lm-eval's `evaluate()` receives the task dict, so `install()` wraps it:
each call runs inside its own evaluation scope (lmms_talo.harness.evaluation_scope), as on the lmms-eval side.
Nothing here imports lmms-eval.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_talo.harness import evaluation_scope
from lmms_talo.harness.answer_cache import as_answer, serving
from lmms_talo.harness.base import Harness, remember_own_scoring
from lmms_talo.outputs.harness_annotations import with_probe_log


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


def _scope(lm, task_dict, kwargs):
    # lm-eval 0.4.13 passes {"tasks": {name: Task}, "groups": ..., "group_map": ...}; older ones a nested dict
    nested = isinstance(task_dict, dict) and isinstance(task_dict.get("tasks"), dict)
    tasks = evaluation_scope.tasks_of(task_dict["tasks"] if nested else task_dict)
    return evaluation_scope.evaluation(tasks, RUN["args"], kwargs.get("limit"), kwargs.get("log_samples", True))


class CachingLMAnswers:
    """lm-eval's response cache (`--use_cache`, its CachingLM) under TaLo's keys
    (lmms_talo.harness.answer_cache): the request's args and TaLo's variant key."""

    def __init__(self, caching_lm, attr: str):
        self.caching_lm, self.attr = caching_lm, attr

    def answers(self, requests, variant_key, compute):
        from lm_eval.api.model import hash_args

        db = self.caching_lm.dbdict
        keys = [hash_args(self.attr, (*r.args, f"talo-{variant_key}")) for r in requests]
        sampled = [self.attr == "generate_until" and r.args[1].get("do_sample", False) for r in requests]
        misses = [i for i, key in enumerate(keys) if sampled[i] or key not in db]
        missing = set(misses)
        answers = [None if i in missing else db[key] for i, key in enumerate(keys)]
        for i, answer in zip(misses, compute([requests[i] for i in misses]) if misses else []):
            answers[i] = answer
            if not sampled[i]:
                db[keys[i]] = answer
        db.commit()
        return [as_answer(self.attr, a) for a in answers], len(requests) - len(misses)


def _talo_caching_lm(getattr_):
    """Wrap CachingLM.__getattr__: a TaLo model gets every request, and caches only its own answers."""
    if getattr(getattr_, "__talo_wrapped__", False):
        return getattr_

    @functools.wraps(getattr_)
    def talo_getattr(caching_lm, attr):
        from lmms_talo.harness.mixin import TaloMixin

        lm = caching_lm.__dict__.get("lm")
        if not isinstance(lm, TaloMixin) or attr not in ("generate_until", "loglikelihood"):
            return getattr_(caching_lm, attr)

        def answer(requests):
            with serving(lm, CachingLMAnswers(caching_lm, attr)):
                return getattr(lm, attr)(requests)

        return answer

    talo_getattr.__talo_wrapped__ = True
    return talo_getattr


class LmEval(Harness):
    name = "lm-eval"
    model_packages = ("lm_eval.models",)
    likelihood_is_loss = False  # log-likelihoods: its multiple_choice process_results takes the argmax

    def install(self) -> None:
        import lm_eval.evaluator as evaluator
        from lm_eval.api.model import CachingLM
        from lm_eval.api.task import Task
        from lm_eval.loggers.evaluation_tracker import EvaluationTracker

        evaluation_scope.wrap_evaluate(evaluator, _scope)
        remember_own_scoring(Task)
        CachingLM.__getattr__ = _talo_caching_lm(CachingLM.__getattr__)
        EvaluationTracker.save_results_samples = with_probe_log(
            EvaluationTracker.save_results_samples,
            lambda date, task: (f"samples_{task}_{date}.jsonl", f"samples_{task}_talo_probe_{date}.jsonl"),
        )

    def request(self, task: Any, request_type: str, arguments: Sequence[Any], idx: int, metadata: Any) -> Any:
        from lm_eval.api.instance import Instance

        doc = task.eval_docs[metadata[1]]  # lm-eval's filters read the doc from the instance
        return Instance(request_type=request_type, doc=doc, arguments=tuple(arguments), idx=idx, metadata=metadata)


LM_EVAL = LmEval()
