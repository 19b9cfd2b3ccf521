"""Per-doc probe scores in [0, 1], computed with the task's own filters and process_results.

Most tasks' process_results return the metric value itself (exact_match, acc). Some return records
for an aggregator instead (MMStar, MMBench, SEED-Bench, MMMU); for those a per-benchmark scorer
turns one record into the doc's correctness, the way that benchmark's aggregator would.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmms_talo.method.option_logprobs import gold_option
from lmms_talo.method.subtasks import declared_fields


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


def _as_score(metric: str, value: Any, percent: frozenset = frozenset()) -> float | None:
    """A per-doc score in [0, 1]; a metric the task declares a percentage (`percent`) is divided by
    100. Any other value outside [0, 1] (a 1-10 rating, a CIDEr above 1) is an error, never rescaled."""
    if isinstance(value, (bool, numbers.Real)):
        score = float(value)
    elif isinstance(value, dict) and metric in RECORD_SCORERS:
        score = RECORD_SCORERS[metric](value)
    else:
        return None
    if metric in percent:
        score /= 100.0
    if not 0.0 <= score <= 1.0:
        raise ScoringError(
            f"metric {metric!r} gave {score:g} for a doc, outside [0, 1]: TaLo compares per-doc scores in [0, 1]. "
            f"If {metric!r} is a percentage, declare it in the task's config: "
            f"`metadata: {{talo: {{percent_metrics: [{metric}]}}}}`; otherwise use a task whose "
            f"process_results scores each doc in [0, 1]"
        )
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

    @property
    def percent_metrics(self) -> frozenset:
        """Metrics the task config declares percentages: `metadata: {talo: {percent_metrics: [...]}}`."""
        return frozenset(declared_fields(self.task).get("percent_metrics") or ())

    def primary_metric(self, sample: dict) -> str:
        declared = [m["metric"] if isinstance(m, dict) else m for m in (self.task.config.metric_list or [])]
        for metric in declared + list(sample):
            if metric in sample and _as_score(metric, sample[metric], self.percent_metrics) is not None:
                return metric
        raise ScoringError(
            f"task {self.task_name!r} has no metric TaLo can score per doc: process_results gave "
            f"{sorted(sample)}; add a scorer to lmms_talo.harness.scoring.RECORD_SCORERS for its records, or "
            f"use a task whose process_results returns numbers in [0, 1]"
        )

    def score(self, doc: dict, requests: Sequence[Any], responses: Sequence[Any]) -> float:
        """`requests` are the doc's Instances in idx order; `responses` the raw model outputs."""
        filters = getattr(self.task, "_filters", None) or []
        return self.score_of(self.records(doc, requests, responses, filters[:1]))

    def score_of(self, records: dict[str, dict]) -> float:
        """The doc's score from its records: the first filter pipeline's (the evaluator's primary one)."""
        sample = next(iter(records.values()))
        metric = self.primary_metric(sample)
        return _as_score(metric, sample[metric], self.percent_metrics)

    def records(
        self, doc: dict, requests: Sequence[Any], responses: Sequence[Any], filters: Sequence | None = None
    ) -> dict[str, dict]:
        """filter name -> the doc's process_results output under that filter pipeline (default: every
        pipeline of the task): the records the evaluator hands the task's aggregations."""
        if filters is None:
            filters = getattr(self.task, "_filters", None) or []
        filtered = self._filtered(doc, requests, responses, filters)
        return {key: self.task.process_results(doc, values) for key, values in filtered.items()}

    def check_margin(self) -> None:
        """select_stat=margin reads option log-likelihoods: only multiple-choice likelihood tasks have them."""
        kind = getattr(self.task, "OUTPUT_TYPE", None)
        if kind != "multiple_choice":
            raise ScoringError(
                f"select_stat=margin needs a likelihood-scored multiple-choice task; {self.task_name!r} is "
                f"{kind}: use select_stat=score for it"
            )

    def margin(self, doc: dict, responses: Sequence[Any], losses: bool) -> float:
        """The gold option's log-likelihood minus the best wrong option's, from the doc's raw
        (log-likelihood, is_greedy) responses, one per option, the gold as the task's multiple-choice
        process_results reads it (doc_to_target: an index or the option text). `losses`: the harness
        returns negated log-likelihoods (lmms-eval: its process_results takes the argmin)."""
        choices = self.task.doc_to_choice(doc)
        lls = [float(r[0]) for r in responses][: len(choices)]  # mutual-information tasks append unconditional ones
        lls = [-ll for ll in lls] if losses else lls
        gold = gold_option(self.task, doc)
        if gold is None or len(choices) < 2:
            raise ScoringError(
                f"select_stat=margin needs one gold option among at least two in {self.task_name!r}; doc_to_target "
                f"gave {self.task.doc_to_target(doc)!r} for {len(choices)} options: use select_stat=score"
            )
        return lls[gold] - max(ll for i, ll in enumerate(lls) if i != gold)

    def _filtered(self, doc: dict, requests: Sequence[Any], responses: Sequence[Any], filters: Sequence) -> dict:
        """filter name -> the doc's filtered responses, one per request, as the evaluator passes them
        to process_results (lmms-eval also strips reasoning tags, e.g. <think>...</think>)."""
        if not filters:
            return {"none": [self._strip(r) for r in responses]}
        out = {}
        for ensemble in filters:
            instances = []
            for request, response in zip(requests, responses):
                instance = copy.copy(request)
                instance.resps = [response]
                instance.filtered_resps = {}
                instances.append(instance)
            _apply_filters(ensemble, instances, doc)
            out[ensemble.name] = [self._strip(inst.filtered_resps.get(ensemble.name, inst.resps)) for inst in instances]
        return out

    def _strip(self, response: Any) -> Any:
        tags = reasoning_tags(self.task)
        if tags is None:
            return response
        from lmms_eval.api.reasoning import strip_reasoning_tags

        if isinstance(response, str):
            return strip_reasoning_tags(response, tags)
        if isinstance(response, list):
            return [strip_reasoning_tags(r, tags) if isinstance(r, str) else r for r in response]
        return response


def reasoning_tags(task: Any) -> list | None:
    """The reasoning tags lmms-eval strips before process_results (the task's, else the CLI's
    --reasoning_tags, whose default strips <think> and <analysis> blocks); None under lm-eval."""
    if not type(task).__module__.startswith("lmms_eval."):
        return None
    from lmms_eval.api.reasoning import parse_reasoning_tags_config

    cli_value = getattr(getattr(task, "args", None), "reasoning_tags", None)  # the evaluator sets task.args = cli_args
    return parse_reasoning_tags_config(cli_value=cli_value, task_value=getattr(task.config, "reasoning_tags", None))
