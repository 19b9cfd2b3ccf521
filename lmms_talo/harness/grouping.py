"""The harness's requests of one call, grouped into sub-tasks (a task, or one category value of it),
each with its probe split.

The harness sends all requests of one type in one call. A group's docs are all of the task's
instances of that type (not only those that reached the model: a response cache may have answered
some, and the split must not depend on that); under several processes every rank sees every rank's
requests, so all ranks probe the same groups in the same order.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from lmms_talo.harness import evaluation_scope
from lmms_talo.harness.base import Harness, scoring_replaced
from lmms_talo.harness.pool_exclusion import check_task_split
from lmms_talo.logs import log
from lmms_talo.method.config import TaloConfig
from lmms_talo.method.parallel import Ranks, SharedRequests
from lmms_talo.method.probe_split import ProbeSplit, split_subtask, unprobed_split
from lmms_talo.method.subtasks import TaskFields, field_value, resolve_fields, subtask_name


def fresh_copy(request):
    """A copy the base class may mutate (it pops `until`, adds max_new_tokens) without harm."""
    args = tuple(copy.deepcopy(a) if isinstance(a, (dict, list)) else a for a in request.args)
    # lm-eval's Instance has no raw_filtered_resps / token_counts: reset the fields this one has
    empty = {"resps": [], "filtered_resps": {}, "raw_filtered_resps": {}, "token_counts": []}
    fields = {f.name for f in dataclasses.fields(request) if f.init}
    return dataclasses.replace(request, arguments=args, **{k: v for k, v in empty.items() if k in fields})


class TaloGroup:
    """One sub-task's requests: its docs, their requests in idx order, and its probe split."""

    def __init__(self, task_name: str, category: Any, task: Any, reqtype: str, fields: TaskFields):
        self.task_name = task_name
        self.category = category
        self.name = subtask_name(task_name, category)
        self.task = task
        self.reqtype = reqtype
        self.fields = fields
        self.doc_requests: dict[Any, list] = defaultdict(list)  # every request of the doc on this rank
        self.positions: list[int] = []  # indices into the incoming request list
        self.split: ProbeSplit | None = None

    def docs(self) -> list:
        return sorted(self.doc_requests)

    def rows_of(self, unit, responses: Sequence) -> Iterator[tuple[Any, Sequence]]:
        """(doc, its responses) for each row of a probe unit, from the unit's responses in request order."""
        cursor = 0
        for doc in self.split.docs_of(unit):
            n = len(self.doc_requests[doc])
            yield doc, responses[cursor : cursor + n]
            cursor += n

    def unit_requests(self, units: Sequence) -> list:
        """The requests of these probe units' docs, unit by unit, each doc's in idx order."""
        return [r for unit in units for d in self.split.docs_of(unit) for r in self.doc_requests[d]]

    def by_unit(self, units: Sequence, outputs: Sequence) -> dict:
        """unit -> its slice of `outputs`, the answers of unit_requests(units) in that order."""
        sliced, cursor = {}, 0
        for unit in units:
            count = len(self.unit_requests([unit]))
            sliced[unit] = outputs[cursor : cursor + count]
            cursor += count
        return sliced

    def unit_score(self, scorer, unit, responses) -> float:
        """A unit's score: its worst row's (right only if every row is: MMBench's circular rule)."""
        return min(
            scorer.score(self.task.eval_docs[d], self.doc_requests[d], rows)
            for d, rows in self.rows_of(unit, responses)
        )

    def unit_margin(self, scorer, unit, responses, likelihood_is_loss: bool) -> float:
        """select_stat=margin: a unit's worst row margin, as its score is its worst row's."""
        return min(
            scorer.margin(self.task.eval_docs[d], rows, likelihood_is_loss) for d, rows in self.rows_of(unit, responses)
        )

    def split_docs(self, config: TaloConfig) -> ProbeSplit:
        """The probe split of this sub-task by the config's protocol; a forced layer needs none."""
        keys = self.docs()
        if config.force_layer is not None:
            why = f"force_layer={config.force_layer}: no probing"
            return unprobed_split(self.name, keys, config.probe_shots, config.seed, why)
        docs = self.task.eval_docs

        def values(field):
            return [field_value(docs[d], field, self.task_name) for d in keys] if field else None

        return split_subtask(
            self.name, keys, config.probe_shots, config.seed, values(self.fields.stratify), values(self.fields.unit)
        )


def group_requests(
    reqtype: str, requests: Sequence, config: TaloConfig, ranks: Ranks, harness: Harness
) -> tuple[list[TaloGroup], dict[str, TaskFields]]:
    """The sub-tasks of one harness call, each with its probe split published to the evaluation
    scope, and each task's resolved fields."""
    groups: dict[tuple, TaloGroup] = {}
    fields_by_task: dict[str, TaskFields] = {}
    first_doc: dict[tuple, Any] = {}
    scope = evaluation_scope.current()
    shared = SharedRequests(reqtype, requests, scope.tasks, ranks, harness.request)

    def group_of(task_name, doc_id) -> TaloGroup:
        task = scope.task(task_name)
        if task_name not in fields_by_task:
            fields_by_task[task_name] = resolve_fields(
                task_name, config.granularity, config.category_field, config.stratify_field, task
            )
        fields = fields_by_task[task_name]
        doc = task.eval_docs[doc_id]
        category = field_value(doc, fields.category, task_name) if fields.category else None
        key = (task_name, category)
        if key not in groups:
            groups[key] = TaloGroup(task_name, category, task, reqtype, fields)
        first_doc[key] = min(first_doc.get(key, doc_id), doc_id)
        return groups[key]

    for position, request in enumerate(requests):
        group_of(request.task_name, request.doc_id).positions.append(position)
    for task_name, doc_id in shared.remote_keys:
        group_of(task_name, doc_id)
    if ranks.distributed:
        groups = dict(sorted(groups.items(), key=lambda item: shared.group_order(item[0][0], first_doc[item[0]])))
    for (task_name, category), group in groups.items():
        category_field = group.fields.category
        docs = group.task.eval_docs
        for instance in shared.instances(task_name, group.task):  # of this request type only
            if category_field and field_value(docs[instance.doc_id], category_field, task_name) != category:
                continue
            group.doc_requests[instance.doc_id].append(instance)
        for reqs in group.doc_requests.values():
            reqs.sort(key=lambda r: r.idx)
        group.split = group.split_docs(config)
        check_task_split(group.task, group.split)  # talo_* tasks: same protocol as the task's, or stop here
        evaluation_scope.publish(group.split)
    return list(groups.values()), fields_by_task


def harness_run_args() -> dict:
    """The harness's --limit and --predict_only of this evaluation, as the report records them.
    --predict_only is read off the tasks (the harness replaced their scoring: lmms_talo.harness.base),
    so lm-eval's, which reaches no CLI args TaLo sees, is recorded too."""
    scope = evaluation_scope.current()
    limit = int(scope.limit) if isinstance(scope.limit, float) and scope.limit.is_integer() else scope.limit
    predict_only = bool(getattr(scope.cli_args, "predict_only", False)) or any(
        scoring_replaced(task) for task in scope.tasks.values()
    )
    return {"limit": limit, "predict_only": predict_only}


def log_pre_pass(reqtype: str, groups: list[TaloGroup], fields_by_task: dict, config: TaloConfig) -> None:
    """The lines that start the pre-pass (main rank): the granularity of each task, and why; what the
    harness's --limit and --predict_only mean for TaLo; the sub-tasks left unprobed."""
    run = harness_run_args()
    if run["limit"] is not None:
        log.info(
            f"TaLo ({reqtype}): --limit {run['limit']}: each probe split is drawn from the limited docs, "
            f"not the whole task"
        )
    if run["predict_only"]:
        log.info(
            f"TaLo ({reqtype}): --predict_only: TaLo still scores its probe docs (the selection needs them) "
            f"and answers the test docs under the knockout; the harness will not score them"
        )
    if config.force_layer is not None:
        log.info(
            f"TaLo ({reqtype}): force_layer={config.force_layer}: no probing, every doc answered under the knockout"
        )
        return
    parts = []
    for task_name, fields in fields_by_task.items():
        unit = f", unit {fields.unit}" if fields.unit else ""
        parts.append(f"{task_name}: granularity={fields.granularity}{unit} ({fields.why})")
    log.info(f"TaLo ({reqtype}): probe pre-pass, protocol={config.probe_protocol}; " + "; ".join(parts))
    unprobed = [f"{g.name} ({g.split.unprobed})" for g in groups if g.split.unprobed]
    if unprobed:
        log.warning(
            f"TaLo ({reqtype}): {len(unprobed)} sub-task(s) not probed, answered by the full model: "
            + "; ".join(unprobed)
        )
