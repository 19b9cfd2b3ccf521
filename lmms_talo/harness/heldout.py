"""Scores on the docs the probe never saw: each sub-task's test docs under TaLo's knockout, the full
model's (compare_base), and, for offline analysis, other sub-tasks' knockouts (transfer) or every
candidate layer (test_all_layers). Each is the task's own metric over the test docs
(lmms_talo.harness.benchmark_metric), with the per-doc scores kept beside it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from lmms_talo.harness.benchmark_metric import benchmark_metrics, primary
from lmms_talo.harness.scoring import TaskScorer
from lmms_talo.logs import log
from lmms_talo.method.interventions import BASE, Knockout
from lmms_talo.method.parallel import Ranks

if TYPE_CHECKING:
    from lmms_talo.harness.grouping import TaloGroup
    from lmms_talo.outputs.report import GroupReport

# Answers the requests under a knockout (None: the full model) for the group's report.
RunPass = Callable[[Sequence, "Knockout | None", "GroupReport"], list]


class HeldOutScores(NamedTuple):
    """What one scoring of a sub-task's answers gives the report (GroupReport.scored)."""

    doc_scores: dict  # doc id -> score in [0, 1], every answered doc, all ranks
    pool: set  # the probe pool's docs, left out of the test metrics
    metrics: dict  # 'metric,filter' -> the task's own aggregate over the test docs
    metric: str | None  # the primary metric's key


def doc_scores(group: TaloGroup, requests: Sequence, answers: Sequence, scorer: TaskScorer) -> dict:
    """doc id -> (its score in [0, 1], its records per filter) for every fully answered doc."""
    by_doc: dict = defaultdict(dict)
    for request, answer in zip(requests, answers):
        by_doc[request.doc_id][request.idx] = answer
    scores = {}
    for doc_id, answered in by_doc.items():
        doc_requests = group.doc_requests[doc_id]
        if len(answered) != len(doc_requests):
            continue  # some of this doc's requests were served by a response cache
        responses = [answered[r.idx] for r in doc_requests]
        records = scorer.records(group.task.eval_docs[doc_id], doc_requests, responses)
        scores[doc_id] = (scorer.score_of(records), records)
    return scores


def heldout_scores(
    group: TaloGroup, requests: Sequence, answers: Sequence, scorer: TaskScorer, ranks: Ranks
) -> HeldOutScores:
    """The answered docs scored, over all ranks: per doc, and by the task's own metrics on the test docs."""
    per_doc = ranks.merged(doc_scores(group, requests, answers, scorer))
    pool = set(group.split.pool)
    test_records = {d: records for d, (_, records) in per_doc.items() if d not in pool}
    metrics = benchmark_metrics(group.task, test_records)
    return HeldOutScores(
        {d: score for d, (score, _) in per_doc.items()}, pool, metrics, primary(group.task, metrics, test_records)[0]
    )


def transfer_variants(answered: list, config, candidate_layers, log_it: bool) -> set[tuple[int, ...]]:
    """The variants transfer / test_all_layers score: () the full model, each sub-task's selection
    (transfer), each candidate layer (test_all_layers). Transfer stays within the call's request
    type: the harness answers generation and likelihood tasks in separate calls."""
    variants: set[tuple[int, ...]] = {()}
    if config.transfer:
        variants |= {tuple(report.selected_layers) for _, _, report in answered}
        if log_it and answered:
            log.info(
                f"TaLo ({answered[0][0].reqtype}): transfer applies each selection to the sub-tasks of this "
                f"request type only; the harness answers generation and likelihood tasks in separate calls"
            )
    if config.test_all_layers:
        variants |= {(layer,) for layer in candidate_layers}
    return variants


def score_test_variants(
    answered: list[tuple[TaloGroup, list, GroupReport]],
    variants: set[tuple[int, ...]],
    intervention: str,
    run_pass: RunPass,
    ranks: Ranks,
) -> None:
    """transfer / test_all_layers: each sub-task's test docs under every variant (layer tuples, () the
    full model); a variant already scored (TaLo's own selection, the base) is not answered again."""
    for group, group_requests, report in answered:
        scorer = TaskScorer(group.task, group.task_name)
        test_docs = set(group.split.test)
        test_requests = [r for r in group_requests if r.doc_id in test_docs]
        done = {Knockout(tuple(report.selected_layers)).label: report.test.get("talo"), BASE: report.test.get("base")}
        for layers in sorted(variants):
            label = Knockout(layers).label
            if done.get(label) is not None:
                report.test_variants[label] = done[label]
                continue
            knockout = Knockout(layers, intervention) if layers else None
            answers = run_pass(test_requests, knockout, report)
            report.scored_variant(label, heldout_scores(group, test_requests, answers, scorer, ranks))
