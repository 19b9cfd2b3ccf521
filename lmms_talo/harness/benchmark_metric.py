"""The benchmark's own metric over a sub-task's test docs.

The harness scores a task by running its process_results on every doc (once per filter pipeline)
and handing the records of each metric to the task's aggregation function: MMStar averages over
`l2_category`, MMBench counts a question only if all its rotations are right, MMMU parses options.
This module does the same for the test docs of one sub-task (lmms-eval and lm-eval Task objects
both have `aggregation()` and `process_results`), keyed `metric,filter` as the harness's results
JSON keys them, so the report's figure for a bundled talo_* task equals lmms-eval's printed one.

Aggregations are called in doc-id order (the evaluator's order, so float sums agree bit for bit),
never when they would call a judge model or the network (the value then says "not computed: needs
a judge"), and with the current folder and lmms-eval's output_path pointed at a temporary folder:
aggregations that write result or submission files write them there, not over the harness's own.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import numbers
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from lmms_talo.logs import log

# Words in an aggregation's code (names it uses, string constants) that mean it asks a model or a
# server for its verdict, e.g. mmbench_en_dev's eval_result(..., eval_method="openai").
JUDGE_HINTS = ("openai", "judge", "get_chat_response", "api_key", "requests", "httpx", "urlopen", "anthropic")
NEEDS_JUDGE = "not computed: needs a judge"


def needs_judge(aggregate: Callable) -> bool:
    """Whether the aggregation function's own code (not its docstring) calls a judge model or the network."""
    func = inspect.unwrap(aggregate)
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    words = [*code.co_names, *(c for c in code.co_consts if isinstance(c, str) and c != func.__doc__)]
    return any(hint in word.lower() for word in words for hint in JUDGE_HINTS)


def declared_metrics(task: Any) -> list[str]:
    """The task's metric_list names, in order (the first is its primary metric)."""
    return [m["metric"] if isinstance(m, dict) else m for m in (task.config.metric_list or [])]


@contextlib.contextmanager
def _scratch_args(task: Any):
    """lmms-eval's run args with output_path (and the current folder) moved to a temporary folder."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="talo_metric_") as folder:
        args = copy.copy(getattr(task, "args", None))
        if args is not None and hasattr(args, "output_path"):
            args.output_path = folder
        os.chdir(folder)
        try:
            yield args
        finally:
            os.chdir(previous)


def _aggregate(task: Any, metric: str, records: list) -> Any:
    """The harness's aggregate of one metric's records: a float where it is a number, else as given,
    or a "not computed: ..." string saying why not."""
    aggregate = task.aggregation().get(metric)
    if aggregate is None:
        return "not computed: the task declares no aggregation for it"
    if needs_judge(aggregate):
        return NEEDS_JUDGE
    try:
        with _scratch_args(task) as args:
            if "args" in inspect.signature(aggregate).parameters and hasattr(task, "args"):  # as lmms-eval calls it
                value = aggregate(records, args=args)
            else:
                value = aggregate(records)
    except Exception as exc:  # one metric's failure must not lose the run's answers
        log.warning("lmms-talo: the aggregation of %s raised %s: %s", metric, type(exc).__name__, exc)
        return f"not computed: the aggregation raised {type(exc).__name__}: {exc}"
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def benchmark_metrics(task: Any, records_by_doc: Mapping[Any, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """`records_by_doc`: doc id -> filter -> process_results output. Returns 'metric,filter' -> the
    task's aggregate over those docs, for every metric the records hold (declared ones first)."""
    collected: dict[tuple[str, str], list] = {}
    order = declared_metrics(task)
    for doc_id in sorted(records_by_doc):
        for filter_key, sample in records_by_doc[doc_id].items():
            for metric, record in sample.items():
                collected.setdefault((metric, filter_key), []).append(record)
    keys = sorted(collected, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[0]))
    return {f"{metric},{key}": _aggregate(task, metric, collected[(metric, key)]) for metric, key in keys}


def primary(
    task: Any, metrics: Mapping[str, Any], records_by_doc: Mapping[Any, Mapping[str, Mapping[str, Any]]] | None = None
) -> tuple[str | None, float | None]:
    """The task's aggregate and its value where it is a number: the first declared metric (under the
    first filter) whose records cover every scored doc in `records_by_doc`. A metric that covers
    only some docs is a part of the task, not its aggregate: stock MMStar declares each category
    before `average`, and a category's records exist only for that category's docs."""
    complete = None
    if records_by_doc:
        counts = Counter(f"{m},{f}" for sample in records_by_doc.values() for f, rec in sample.items() for m in rec)
        complete = {key for key, count in counts.items() if count == len(records_by_doc)}
    for name in declared_metrics(task) + [k.split(",")[0] for k in metrics]:
        for key, value in metrics.items():
            if key.split(",")[0] == name and (complete is None or key in complete):
                return key, value if isinstance(value, float) else None
    return None, None
