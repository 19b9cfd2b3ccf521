"""The TaLo mixin: turns any lmms-eval model class into a TaLo model.

lmms-eval sends all requests of one type in one call. The mixin groups them by task (and by
category value), runs the probe pre-pass of each group on copies of its requests, selects a layer,
answers the group's real requests with that layer knocked out, and returns the answers in the
harness's order. The base class's own generate_until / loglikelihood do every forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

from loguru import logger as log

from ..backbone import decoder_layers, unwrap
from ..config import TaloArgumentError, TaloConfig
from ..interventions import Knockout, check_layers, knocked_out
from ..memory import process_memory
from ..pairwise import search_more_layers
from ..parallel import SharedRequests, current_ranks
from ..replay import PrefixReplay
from ..probe import ProbeSplit, split_subtask
from ..report import GroupReport, TaloReport, summary_table
from ..scoring import TaskScorer
from ..store import ProbeStore, default_state_dir, task_config_identity
from ..subtasks import field_value, resolve_fields, subtask_name
from ..sweep import LayerSweep
from ..taskpool import check_task_split
from .. import run_state
from . import task_capture
from .fixes import keep_loglikelihood_outputs


class GenerationFailed(RuntimeError):
    """The base model raised inside generate() during a probe pass and answered "" instead."""


def _fresh_copy(request):
    """A copy the base class may mutate (it pops `until`, adds max_new_tokens) without harm."""
    args = tuple(copy.deepcopy(a) if isinstance(a, (dict, list)) else a for a in request.args)
    # lm-eval's Instance has no raw_filtered_resps / token_counts: reset the fields this one has
    empty = {"resps": [], "filtered_resps": {}, "raw_filtered_resps": {}, "token_counts": []}
    fields = {f.name for f in dataclasses.fields(request) if f.init}
    return dataclasses.replace(request, arguments=args, **{k: v for k, v in empty.items() if k in fields})


def _unwrap_output(output):
    import lmms_eval.evaluator

    return lmms_eval.evaluator.unwrap_generation_output(output)[0]


@contextlib.contextmanager
def _watch_generate(model) -> Any:
    """Record exceptions raised by model.generate, which base classes swallow into ""."""
    failures: list[BaseException] = []
    original = model.generate

    def generate(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            failures.append(exc)
            raise

    model.generate = generate
    try:
        yield failures
    finally:
        del model.generate


class TaloGroup:
    """One sub-task's requests: its docs, their requests in idx order, and its probe split."""

    def __init__(self, task_name: str, category: Any, task: Any, reqtype: str):
        self.task_name = task_name
        self.category = category
        self.name = subtask_name(task_name, category)
        self.task = task
        self.reqtype = reqtype
        self.doc_requests: dict[Any, list] = defaultdict(list)  # every request of the doc on this rank
        self.positions: list[int] = []  # indices into the incoming request list
        self.split: ProbeSplit | None = None

    def docs(self) -> list:
        return sorted(self.doc_requests)


class TaloMixin:
    """Mixed in before an lmms-eval model class: `class TaloLlava(TaloMixin, LlavaHf)`."""

    def __init__(self, **kwargs):
        self.talo = TaloConfig.pop_from(kwargs)
        super().__init__(**kwargs)
        task_capture.install()
        keep_loglikelihood_outputs()
        num_layers = len(decoder_layers(self._talo_model()))
        layers = self.talo.layers if self.talo.layers is not None else tuple(range(1, num_layers))
        if not layers:
            raise TaloArgumentError(f"the model has {num_layers} decoder layer(s): no candidate layer is left")
        self.talo_candidate_layers = check_layers(layers, num_layers)
        if self.talo.force_layer is not None:
            check_layers([self.talo.force_layer], num_layers)
        if self.talo.max_layers > len(self.talo_candidate_layers):
            raise TaloArgumentError(
                f"max_layers={self.talo.max_layers} exceeds the {len(self.talo_candidate_layers)} candidate layer(s): "
                f"lower max_layers or widen layers"
            )
        self.talo_rule = self.talo.selection_rule()
        self.talo_report = TaloReport.start(self, self.talo)
        self.talo_ranks = current_ranks()

    # --- the harness entry points ---

    def generate_until(self, requests):
        return self._talo_answer("generate_until", requests, super().generate_until)

    def loglikelihood(self, requests):
        return self._talo_answer("loglikelihood", requests, super().loglikelihood)

    # --- internals ---

    def _talo_model(self):
        return unwrap(self.model)

    def _talo_run_base(self, base_method: Callable, requests: Sequence, knockout: Knockout | None, strict: bool) -> list:
        copies = [_fresh_copy(r) for r in requests]
        model = self._talo_model()
        with knocked_out(model, knockout), _watch_generate(model) as failures:
            outputs = base_method(copies)
        if strict and failures:
            raise GenerationFailed(
                f"generation raised {type(failures[0]).__name__}: {failures[0]} during a TaLo probe pass "
                f"({knockout.label if knockout else 'base'}); a probe is never scored on a failed answer"
            ) from failures[0]
        return [_unwrap_output(o) for o in outputs]

    def _talo_groups(self, reqtype: str, requests: Sequence) -> list[TaloGroup]:
        groups: dict[tuple, TaloGroup] = {}
        fields_by_task = {}
        first_doc: dict[tuple, Any] = {}
        # Under several processes every rank sees every rank's requests, so all ranks probe the same groups.
        shared = SharedRequests(reqtype, requests, task_capture.CAPTURED.tasks, self.talo_ranks)

        def group_of(task_name, doc_id) -> TaloGroup:
            task = task_capture.task(task_name)
            if task_name not in fields_by_task:
                fields_by_task[task_name] = resolve_fields(
                    task_name, self.talo.granularity, self.talo.category_field, self.talo.stratify_field, task
                )
            category_field, _ = fields_by_task[task_name]
            doc = task.eval_docs[doc_id]
            category = field_value(doc, category_field, task_name) if category_field else None
            key = (task_name, category)
            if key not in groups:
                groups[key] = TaloGroup(task_name, category, task, reqtype)
            first_doc[key] = min(first_doc.get(key, doc_id), doc_id)
            return groups[key]

        for position, request in enumerate(requests):
            group_of(request.task_name, request.doc_id).positions.append(position)
        for task_name, doc_id in shared.remote_keys:
            group_of(task_name, doc_id)
        if self.talo_ranks.distributed:
            groups = dict(sorted(groups.items(), key=lambda item: shared.group_order(item[0][0], first_doc[item[0]])))
        # Probe candidates come from all of the task's instances, not only the requests that reached
        # the model: a response cache may have answered some, and the split must not depend on that.
        for (task_name, category), group in groups.items():
            category_field, stratify_field = fields_by_task[task_name]
            docs = group.task.eval_docs
            for instance in shared.instances(task_name, group.task):  # of this request type only
                if category_field and field_value(docs[instance.doc_id], category_field, task_name) != category:
                    continue
                group.doc_requests[instance.doc_id].append(instance)
            for reqs in group.doc_requests.values():
                reqs.sort(key=lambda r: r.idx)
            keys = group.docs()
            strata = [field_value(docs[d], stratify_field, task_name) for d in keys] if stratify_field else None
            group.split = split_subtask(group.name, keys, self.talo.probe_shots, self.talo.seed, strata)
            check_task_split(group.task, group.split)  # talo_* tasks: same protocol as the task's, or stop here
            run_state.publish(group.split)
        return list(groups.values())

    def _talo_answer(self, reqtype: str, requests: Sequence, base_method: Callable) -> list:
        self.talo_ranks = current_ranks()
        results: list = [None] * len(requests)
        answered = []
        for group in self._talo_groups(reqtype, requests):
            group_requests = [requests[p] for p in group.positions]
            answers, report = self._talo_answer_group(group, group_requests, base_method)
            answered.append((group, group_requests, report))
            for position, answer in zip(group.positions, answers):
                results[position] = answer
        if self.talo.transfer or self.talo.test_all_layers:
            self._talo_score_test_variants(answered, base_method)
        path = self._talo_write_report()
        if self.talo_ranks.is_main:
            log.info(f"TaLo ({reqtype}): report written to {path}\n{summary_table(self.talo_report.to_dict())}")
            log.info("TaLo: lmms-eval's aggregate below counts probe-pool docs too (unless the task excludes them); the report's TaLo column is the test (non-pool) score")
        return results

    def _talo_write_report(self):
        """The report is the merged view of all ranks: only the main rank writes it."""
        return self.talo_report.write(task_capture.CAPTURED.cli_args) if self.talo_ranks.is_main else None

    def _talo_store(self, group: TaloGroup) -> ProbeStore:
        state_dir = self.talo.state_dir or default_state_dir()
        fingerprint = {
            "model": self.talo_report.model_identity,
            "task": group.name,
            "task_config": task_config_identity(group.task, TaloConfig.arg_names()),
            "intervention": self.talo.intervention,
            "seed": self.talo.seed,
            "shots": self.talo.probe_shots,
            "reqtype": group.reqtype,
        }
        return ProbeStore(None if state_dir == "none" else state_dir, fingerprint)

    def _talo_sweep(self, group: TaloGroup, base_method: Callable, scorer: TaskScorer) -> LayerSweep:
        """The group's layer sweep: the base class answers the probe docs' requests, the task's own
        scoring scores them, and the config picks the sweep mode and prefix replay."""

        def answer(knockout: Knockout | None, docs: Sequence) -> dict:
            flat = [r for d in docs for r in group.doc_requests[d]]
            outputs = self._talo_run_base(base_method, flat, knockout, strict=True)
            by_doc, cursor = {}, 0
            for d in docs:
                n = len(group.doc_requests[d])
                by_doc[d] = outputs[cursor : cursor + n]
                cursor += n
            return by_doc

        def score(doc_id, responses) -> float:
            return scorer.score(group.task.eval_docs[doc_id], group.doc_requests[doc_id], responses)

        replay = PrefixReplay(self._talo_model(), max(self.talo_candidate_layers)) if self.talo.replay else None
        return LayerSweep(answer, score, self._talo_store(group), mode=self.talo.sweep, replay=replay, ranks=self.talo_ranks)

    def _talo_answer_group(self, group: TaloGroup, group_requests: list, base_method: Callable) -> list:
        scorer = TaskScorer(group.task, group.task_name)
        report = GroupReport.start(group)
        if self.talo.force_layer is not None:
            knockout = Knockout((self.talo.force_layer,), self.talo.intervention)
            report.mark_forced(self.talo.force_layer)
        else:
            sweep = self._talo_sweep(group, base_method, scorer)
            result = sweep.run(
                group.split, self.talo_candidate_layers, self.talo.intervention,
                self.talo.threshold, self.talo.resample_rounds,
            )
            self.talo_rule.apply(result, group.name)
            layers, stages = search_more_layers(
                sweep, result, self.talo_rule, self.talo.intervention, self.talo.max_layers, group.name
            )
            report.swept(result)
            report.extended(layers, stages)
            knockout = Knockout(layers, self.talo.intervention) if layers else None
        self.talo_report.add(report)
        self._talo_write_report()  # a crash later keeps the selection

        started = time.perf_counter()
        answers = self._talo_run_base(base_method, group_requests, knockout, strict=False)
        report.evaluated(time.perf_counter() - started)
        self._talo_score_test(group, group_requests, answers, report, scorer, "talo")
        if self.talo.compare_base:
            test_docs = set(group.split.test)
            base_requests = [r for r in group_requests if r.doc_id in test_docs]
            base_answers = self._talo_run_base(base_method, base_requests, None, strict=False) if knockout else [
                a for r, a in zip(group_requests, answers) if r.doc_id in test_docs
            ]
            self._talo_score_test(group, base_requests, base_answers, report, scorer, "base")
        report.memory = process_memory()
        return answers, report

    def _talo_score_test(self, group, group_requests, answers, report, scorer, which: str) -> None:
        """Score the answered docs; the report keeps per-doc scores and the mean over the test set."""
        scores = self.talo_ranks.merged(self._talo_doc_scores(group, group_requests, answers, scorer))
        report.scored(which, scores, set(group.split.pool))

    def _talo_score_test_variants(self, answered: list, base_method: Callable) -> None:
        """transfer / test_all_layers: score each sub-task's test docs under the knockouts selected
        for the other sub-tasks of this call and/or under every candidate layer, for offline analysis."""
        wanted = {()}
        if self.talo.transfer:
            wanted |= {tuple(report.selected_layers) for _, _, report in answered}
        if self.talo.test_all_layers:
            wanted |= {(layer,) for layer in self.talo_candidate_layers}
        for group, group_requests, report in answered:
            scorer = TaskScorer(group.task, group.task_name)
            test_docs = set(group.split.test)
            test_requests = [r for r in group_requests if r.doc_id in test_docs]
            done = {Knockout(tuple(report.selected_layers)).label: report.test.get("talo"), "base": report.test.get("base")}
            for layers in sorted(wanted):
                label = Knockout(layers).label
                if done.get(label) is not None:
                    report.test_variants[label] = done[label]
                    continue
                knockout = Knockout(layers, self.talo.intervention) if layers else None
                answers = self._talo_run_base(base_method, test_requests, knockout, strict=False)
                scores = self.talo_ranks.merged(self._talo_doc_scores(group, test_requests, answers, scorer))
                report.scored_variant(label, scores, set(group.split.pool))
        self._talo_write_report()

    @staticmethod
    def _talo_doc_scores(group, group_requests, answers, scorer) -> dict:
        by_doc: dict = defaultdict(dict)
        for request, answer in zip(group_requests, answers):
            by_doc[request.doc_id][request.idx] = answer
        scores = {}
        for doc_id, answered in by_doc.items():
            requests = group.doc_requests[doc_id]
            if len(answered) != len(requests):
                continue  # some of this doc's requests were served by a response cache
            responses = [answered[r.idx] for r in requests]
            scores[doc_id] = scorer.score(group.task.eval_docs[doc_id], requests, responses)
        return scores
