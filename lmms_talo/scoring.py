"""Per-doc probe scores in [0, 1], computed with the task's own filters and process_results.

Most tasks' process_results return the metric value itself (exact_match, acc). Some return records
for an aggregator instead (MMStar, MMBench, SEED-Bench, MMMU); for those a per-benchmark scorer
turns one record into the doc's correctness, the way that benchmark's aggregator would.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence


class ScoringError(RuntimeError):
    """A probe doc could not be scored."""


def _seedbench_record(record: dict) -> float:
    return float(str(record["pred"]).lower().strip() == str(record["answer"]).lower().strip())


def _mmstar_record(record: dict) -> float:
    return float(record["score"])


def _mmmu_record(record: dict) -> float:
    from lmms_eval.tasks.mmmu.utils import eval_multi_choice, eval_open

    judge = eval_multi_choice if record["question_type"] == "multiple-choice" else eval_open
    return float(bool(judge(record["answer"], record["parsed_pred"][0])))


def _mmbench_record(record: dict) -> float:
    """Rule-based MMBench extraction (as mmbench_en_dev_static does), for one doc without circular variants."""
    import pandas as pd
    from lmms_eval.tasks.mmbench.en_utils import mmbench_evaluator

    row = {key.lower() if key not in "ABCDE" else key: value for key, value in record.items()}
    row["prediction"] = str(row["prediction"])
    return float(mmbench_evaluator.eval_sub_data(pd.DataFrame([row]), {row["index"]: row["answer"]}, static_only=True))


# Metric name -> scorer of one aggregator record. Keys are the metric names those tasks declare.
RECORD_SCORERS: dict[str, Callable[[dict], float]] = {
    "seed_all": _seedbench_record,
    "average": _mmstar_record,
    "mmmu_acc": _mmmu_record,
    "gpt_eval_score": _mmbench_record,
}


def _as_score(metric: str, value: Any) -> float | None:
    if isinstance(value, bool) or isinstance(value, numbers.Real):
        score = float(value)
    elif isinstance(value, dict) and metric in RECORD_SCORERS:
        score = RECORD_SCORERS[metric](value)
    else:
        return None
    if score > 1.0 and score <= 100.0:  # percent-scaled metrics
        score /= 100.0
    if not 0.0 <= score <= 1.0:
        raise ScoringError(f"metric {metric!r} gave {score}, outside [0, 1]: TaLo needs per-doc scores in [0, 1]")
    return score


def _apply_filters(ensemble: Any, instances: list, doc: dict) -> None:
    """lmms-eval's FilterEnsemble.apply takes (instances, docs); lm-eval's takes instances (each carries its doc)."""
    if len(inspect.signature(ensemble.apply).parameters) >= 2:
        ensemble.apply(instances, [doc] * len(instances))
    else:
        ensemble.apply(instances)


@dataclass
class TaskScorer:
    """Scores one doc's raw responses the way the evaluator would, on copies of its requests."""

    task: Any  # lmms-eval / lm-eval Task
    task_name: str

    def primary_metric(self, sample: dict) -> str:
        declared = [m["metric"] if isinstance(m, dict) else m for m in (self.task.config.metric_list or [])]
        for metric in declared + list(sample):
            if metric in sample and _as_score(metric, sample[metric]) is not None:
                return metric
        raise ScoringError(
            f"task {self.task_name!r} has no metric TaLo can score per doc: process_results gave "
            f"{sorted(sample)}; add a scorer to lmms_talo.scoring.RECORD_SCORERS for its records, or "
            f"use a task whose process_results returns numbers in [0, 1]"
        )

    def score(self, doc: dict, requests: Sequence[Any], responses: Sequence[Any]) -> float:
        """`requests` are the doc's Instances in idx order; `responses` the raw model outputs."""
        instances = []
        for request, response in zip(requests, responses):
            instance = copy.copy(request)
            instance.resps = [response]
            instance.filtered_resps = {}
            instances.append(instance)
        filters = getattr(self.task, "_filters", None) or []
        key = "none"
        for ensemble in filters[:1]:  # the evaluator's first filter pipeline is the primary one
            _apply_filters(ensemble, instances, doc)
            key = ensemble.name
        filtered = [inst.filtered_resps.get(key, inst.resps) for inst in instances]
        if not filters:
            filtered = [inst.resps[0] for inst in instances]
        sample = self.task.process_results(doc, filtered)
        metric = self.primary_metric(sample)
        return _as_score(metric, sample[metric])
