"""The TaLo mixin: turns a harness's model class into a TaLo model, for lmms-eval and lm-eval alike.

The harness sends all requests of one type in one call. The mixin groups them by task (and by
category value), runs the probe pre-pass of each group on copies of its requests, selects a layer,
answers the group's real requests with that layer knocked out, and returns the answers in the
harness's order. The base class's own generate_until / loglikelihood do every forward pass.
The report scores each group's test docs with the task's own aggregation (lmms_talo.harness.benchmark_metric).
Any other request type (generate_until_multi_round, generate_until_agentic, generate_visual_cot,
lm-eval's loglikelihood_rolling) stops the run with UnsupportedRequestType, naming the task.
A failure the base class swallows during a probe pass (generate() raising, or an error it logs while
decoding or preprocessing) stops the run with GenerationFailed: a probe answer is real or an error.
The decision of each group is lmms_talo.method.selection's; what differs between the harnesses is asked of
the class's `talo_harness` (lmms_talo.harness.base), so this module imports neither harness.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

from loguru import logger as loguru  # lmms-eval's model classes log through loguru

from lmms_talo.harness import evaluation_scope
from lmms_talo.method.backbone import decoder_layers, unwrap
from lmms_talo.method.config import TaloArgumentError, TaloConfig
from lmms_talo.harness.base import Harness, own_scoring
from lmms_talo.outputs.harness_annotations import annotate, log_to_wandb, results_block
from lmms_talo.method.interventions import Knockout, check_layers, knocked_out
from lmms_talo.logs import log
from lmms_talo.memory import process_memory
from lmms_talo.method.parallel import SharedRequests, current_ranks
from lmms_talo.harness.pool_exclusion import check_task_split
from lmms_talo.outputs.probe_log import probe_log_rows
from lmms_talo.method.probe_split import ProbeSplit, split_subtask, unprobed_split
from lmms_talo.outputs.progress import ProbeProgress
from lmms_talo.method.prefix_replay import PrefixReplay
from lmms_talo.outputs.report import GroupReport, TaloReport, summary_table
from lmms_talo.harness.scoring import TaskScorer
from lmms_talo.method.screen import task_screen
from lmms_talo.method.selection import select_knockout
from lmms_talo.outputs.probe_store import ProbeStore, default_state_dir, pool_content, request_kwargs, task_config_identity
from lmms_talo.method.subtasks import TaskFields, field_value, resolve_fields, subtask_name
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.harness.benchmark_metric import benchmark_metrics, primary


class UnsupportedRequestType(RuntimeError):
    """A task sent a request type TaLo cannot probe or score (see TaloMixin.generate_until_multi_round)."""


class GenerationFailed(RuntimeError):
    """The base class swallowed a failure during a probe pass (generate() raised, or it logged an
    error: decoding, image or video preprocessing) and answered "" or without its input instead."""


def _fresh_copy(request):
    """A copy the base class may mutate (it pops `until`, adds max_new_tokens) without harm."""
    args = tuple(copy.deepcopy(a) if isinstance(a, (dict, list)) else a for a in request.args)
    # lm-eval's Instance has no raw_filtered_resps / token_counts: reset the fields this one has
    empty = {"resps": [], "filtered_resps": {}, "raw_filtered_resps": {}, "token_counts": []}
    fields = {f.name for f in dataclasses.fields(request) if f.init}
    return dataclasses.replace(request, arguments=args, **{k: v for k, v in empty.items() if k in fields})


# Where base classes report the failures they swallow: lmms-eval's model classes catch exceptions in
# generation, decoding, image and video preprocessing and log them at ERROR (loguru) before answering
# "" or dropping the input; lm-eval's log through `logging`. Watching those logs covers every such
# site, present and future, without patching each call the classes make.
def _watched_modules(lmm) -> tuple[str, ...]:
    """The harness's model packages and the modules of the base classes (TaLo's own and the
    standard library's excluded)."""
    own = {
        c.__module__ for c in type(lmm).__mro__
        if not issubclass(c, TaloMixin) and c.__module__.split(".")[0] not in sys.stdlib_module_names
    }
    return tuple(sorted(own | set(lmm.talo_harness.model_packages)))


class _FailureLog(logging.Handler):
    def __init__(self, failures: list):
        super().__init__(level=logging.ERROR)
        self.failures = failures

    def emit(self, record: logging.LogRecord) -> None:
        self.failures.append(record.getMessage())


@contextlib.contextmanager
def _watch_failures(lmm, model) -> Iterator[list]:
    """Record what the base class swallows during a pass: exceptions raised by model.generate, and
    the messages its modules log at ERROR or above (loguru and logging alike)."""
    failures: list = []
    modules = _watched_modules(lmm)
    original = model.generate

    def generate(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            failures.append(exc)
            raise

    def watched(record) -> bool:
        name = record["name"] or ""
        return any(name == m or name.startswith(m + ".") for m in modules)

    handler = _FailureLog(failures)
    loggers = [logging.getLogger(m) for m in modules]
    model.generate = generate
    sink = loguru.add(lambda message: failures.append(message.record["message"]), level="ERROR", filter=watched, format="{message}")
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield failures
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        loguru.remove(sink)
        del model.generate


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

    def split_docs(self, config: TaloConfig) -> ProbeSplit:
        """The probe split of this sub-task by the config's protocol; a forced layer needs none."""
        keys = self.docs()
        if config.force_layer is not None:
            return unprobed_split(self.name, keys, config.probe_shots, config.seed, f"force_layer={config.force_layer}: no probing")
        docs = self.task.eval_docs

        def values(field):
            return [field_value(docs[d], field, self.task_name) for d in keys] if field else None

        return split_subtask(
            self.name, keys, config.probe_shots, config.seed, values(self.fields.stratify), values(self.fields.unit)
        )


class TaloMixin:
    """Mixed in before a harness's model class: `class TaloLlava(TaloMixin, LlavaHf)`, with the
    class's harness in `talo_harness`."""

    talo_harness: Harness

    def __init__(self, **kwargs):
        self.talo = TaloConfig.pop_from(kwargs)
        model_args = dict(kwargs)  # what the base class gets: part of the probe store's fingerprint
        super().__init__(**kwargs)
        self.talo_harness.install()
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
        self.talo_report = TaloReport.start(self, self.talo, model_args)
        self.talo_ranks = current_ranks()
        self.talo_doc_info: dict[tuple, tuple] = {}  # (task, doc id) -> (knocked-out layers, in the probe pool)
        self.talo_probe_rows: dict[str, list] = {}  # task -> every probe pass, kept only while the harness logs samples
        self._talo_progress = ProbeProgress("", 0, enabled=False)  # replaced for each harness call

    # --- the harness entry points ---

    def generate_until(self, requests):
        return self._talo_answer("generate_until", requests, super().generate_until)

    def loglikelihood(self, requests):
        return self._talo_answer("loglikelihood", requests, super().loglikelihood)

    # Request types TaLo cannot probe (no per-doc score of a multi-round dialogue, an agent's trace, a
    # perplexity): they stop the run instead of silently running on the full model.
    def generate_until_multi_round(self, requests):
        self._talo_refuse("generate_until_multi_round", requests)

    def generate_until_agentic(self, requests):
        self._talo_refuse("generate_until_agentic", requests)

    def generate_visual_cot(self, requests):
        self._talo_refuse("generate_visual_cot", requests)

    def loglikelihood_rolling(self, requests):  # lm-eval's perplexity tasks
        self._talo_refuse("loglikelihood_rolling", requests)

    @staticmethod
    def _talo_refuse(reqtype: str, requests: Sequence) -> None:
        tasks = sorted({r.task_name for r in requests}) or ["(no request)"]
        raise UnsupportedRequestType(
            f"task {', '.join(tasks)} sends {reqtype} requests, which TaLo does not handle: it probes and "
            f"answers only generate_until and loglikelihood requests, and will not run {reqtype} on the full "
            f"model as if it were TaLo. Evaluate this task with the plain model (e.g. --model llava_hf), or "
            f"leave it out of --tasks."
        )

    # --- internals ---

    def _talo_model(self):
        return unwrap(self.model)

    def _talo_run_base(self, base_method: Callable, requests: Sequence, knockout: Knockout | None, strict: bool) -> list:
        copies = [_fresh_copy(r) for r in requests]
        model = self._talo_model()
        with knocked_out(model, knockout), _watch_failures(self, model) as failures:
            outputs = base_method(copies)
        if strict and failures:
            first = failures[0]
            cause = first if isinstance(first, BaseException) else None
            what = f"generate() raised {type(first).__name__}: {first}" if cause else f"it logged the error {first!r}"
            raise GenerationFailed(
                f"the base model class failed during a TaLo probe pass ({knockout.label if knockout else 'base'}): "
                f"{what} ({len(failures)} failure(s) in the pass); a probe is never scored on a failed answer"
            ) from cause
        return [self.talo_harness.unwrap(o) for o in outputs]

    def _talo_groups(self, reqtype: str, requests: Sequence) -> list[TaloGroup]:
        groups: dict[tuple, TaloGroup] = {}
        fields_by_task: dict[str, TaskFields] = {}
        first_doc: dict[tuple, Any] = {}
        # Under several processes every rank sees every rank's requests, so all ranks probe the same groups.
        shared = SharedRequests(reqtype, requests, evaluation_scope.current().tasks, self.talo_ranks, self.talo_harness.request)

        def group_of(task_name, doc_id) -> TaloGroup:
            task = evaluation_scope.current().task(task_name)
            if task_name not in fields_by_task:
                fields_by_task[task_name] = resolve_fields(
                    task_name, self.talo.granularity, self.talo.category_field, self.talo.stratify_field, task
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
        if self.talo_ranks.distributed:
            groups = dict(sorted(groups.items(), key=lambda item: shared.group_order(item[0][0], first_doc[item[0]])))
        self._talo_log_groups(reqtype, fields_by_task)
        # Probe candidates come from all of the task's instances, not only the requests that reached
        # the model: a response cache may have answered some, and the split must not depend on that.
        for (task_name, category), group in groups.items():
            category_field = group.fields.category
            docs = group.task.eval_docs
            for instance in shared.instances(task_name, group.task):  # of this request type only
                if category_field and field_value(docs[instance.doc_id], category_field, task_name) != category:
                    continue
                group.doc_requests[instance.doc_id].append(instance)
            for reqs in group.doc_requests.values():
                reqs.sort(key=lambda r: r.idx)
            group.split = group.split_docs(self.talo)
            check_task_split(group.task, group.split)  # talo_* tasks: same protocol as the task's, or stop here
            evaluation_scope.publish(group.split)
        unprobed = [f"{g.name} ({g.split.unprobed})" for g in groups.values() if g.split.unprobed and self.talo.force_layer is None]
        if unprobed and self.talo_ranks.is_main:
            log.warning(f"TaLo ({reqtype}): {len(unprobed)} sub-task(s) not probed, answered by the full model: " + "; ".join(unprobed))
        return list(groups.values())

    def _talo_log_groups(self, reqtype: str, fields_by_task: dict) -> None:
        """The line that starts the pre-pass: the granularity of each task, and why; and what the
        harness's --limit and --predict_only mean for TaLo (the report records both)."""
        scope = evaluation_scope.current()
        predict_only = bool(getattr(scope.cli_args, "predict_only", False))
        limit = int(scope.limit) if isinstance(scope.limit, float) and scope.limit.is_integer() else scope.limit
        self.talo_report.harness_run.update(limit=limit, predict_only=predict_only)
        if not self.talo_ranks.is_main:
            return
        if limit is not None:
            log.info(f"TaLo ({reqtype}): --limit {limit}: each probe split is drawn from the limited docs, not the whole task")
        if predict_only:
            log.info(f"TaLo ({reqtype}): --predict_only: TaLo still scores its probe docs (the selection needs them) and "
                     f"answers the test docs under the knockout; the harness will not score them")
        if self.talo.force_layer is not None:
            log.info(f"TaLo ({reqtype}): force_layer={self.talo.force_layer}: no probing, every doc answered under the knockout")
            return
        parts = []
        for task_name, fields in fields_by_task.items():
            unit = f", unit {fields.unit}" if fields.unit else ""
            parts.append(f"{task_name}: granularity={fields.granularity}{unit} ({fields.why})")
        log.info(f"TaLo ({reqtype}): probe pre-pass, protocol={self.talo.probe_protocol}; " + "; ".join(parts))

    def _talo_answer(self, reqtype: str, requests: Sequence, base_method: Callable) -> list:
        self.talo_ranks = current_ranks()
        results: list = [None] * len(requests)
        answered = []
        groups = self._talo_groups(reqtype, requests)
        probed = [g for g in groups if not g.split.unprobed]
        variants = len(self.talo_candidate_layers) + 1
        self._talo_progress = ProbeProgress.start(
            reqtype, len(probed), len(groups) - len(probed), variants,
            variants * sum(len(g.split.first_round().docs) for g in probed), main=self.talo_ranks.is_main,
            verbose=getattr(evaluation_scope.current().cli_args, "verbosity", "") == "DEBUG",
        )
        with contextlib.ExitStack() as scoring:  # each task's own scoring, also under --predict_only
            scoring.callback(self._talo_progress.close)
            for task in {id(g.task): g.task for g in groups}.values():
                scoring.enter_context(own_scoring(task))
            for group in groups:
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
            log.info(f"TaLo: {self.talo_harness.name}'s aggregate below counts probe-pool docs too (unless the task excludes them); the report's TaLo column is the test (non-pool) score")
        return results

    def talo_annotate_results(self, results: dict) -> None:
        """The results dict the harness writes out carries TaLo's decision (lmms_talo.outputs.harness_annotations)."""
        if self.talo_ranks.is_main:
            report = self.talo_report.to_dict()
            annotate(results, results_block(report, self.talo_report.path), self.talo_doc_info, self.talo_probe_rows)
            log_to_wandb(report, self.talo_report.path)

    def _talo_write_report(self):
        """The report is the merged view of all ranks: only the main rank writes it."""
        return self.talo_report.write(evaluation_scope.current().cli_args) if self.talo_ranks.is_main else None

    def _talo_store(self, group: TaloGroup) -> ProbeStore:
        """The group's probe store, keyed by everything that can change a probe answer; results
        written under other library versions are not reused."""
        state_dir = self.talo.state_dir or default_state_dir()
        fingerprint = {
            "model": self.talo_report.model_identity,
            "harness_model": self.talo_report.harness_model,
            "task": group.name,
            "task_config": task_config_identity(group.task, TaloConfig.arg_names()),
            "gen_kwargs": request_kwargs(r for reqs in group.doc_requests.values() for r in reqs),
            "pool_content": pool_content(group.task, group.split.pool, group.doc_requests.__getitem__),
            "intervention": self.talo.intervention,
            "seed": self.talo.seed,
            "shots": self.talo.probe_shots,
            "reqtype": group.reqtype,
        }
        return ProbeStore(None if state_dir == "none" else state_dir, fingerprint, self.talo_report.versions)

    def _talo_sweep(self, group: TaloGroup, base_method: Callable, scorer: TaskScorer) -> LayerSweep:
        """The group's layer sweep: the base class answers the probe units' requests (a unit: one doc,
        or all rows of one question), the task's own scoring scores each row, and a unit scores its
        worst row (right only if every row is: MMBench's circular rule). The config picks the sweep
        mode and prefix replay."""
        split = group.split

        def requests_of(unit) -> list:
            return [r for d in split.docs_of(unit) for r in group.doc_requests[d]]

        def answer(knockout: Knockout | None, units: Sequence) -> dict:
            flat = [r for u in units for r in requests_of(u)]
            with self._talo_progress.timed(len(units)):
                outputs = self._talo_run_base(base_method, flat, knockout, strict=True)
            by_unit, cursor = {}, 0
            for u in units:
                n = len(requests_of(u))
                by_unit[u] = outputs[cursor : cursor + n]
                cursor += n
            return by_unit

        def score(unit, responses) -> float:
            return min(scorer.score(group.task.eval_docs[d], group.doc_requests[d], rows) for d, rows in group.rows_of(unit, responses))

        def margin(unit, responses) -> float:
            """select_stat=margin: a unit's worst row margin, as its score is its worst row's."""
            loss = self.talo_harness.likelihood_is_loss
            return min(scorer.margin(group.task.eval_docs[d], rows, loss) for d, rows in group.rows_of(unit, responses))

        if self.talo.select_stat == "margin":
            scorer.check_margin()
        replay = PrefixReplay(self._talo_model(), max(self.talo_candidate_layers)) if self.talo.replay else None
        return LayerSweep(
            answer, score, self._talo_store(group), mode=self.talo.sweep, replay=replay, ranks=self.talo_ranks,
            rule=self.talo_rule, statistic=margin if self.talo.select_stat == "margin" else None,
            screen=task_screen(self, self._talo_model(), group, lambda r: base_method([_fresh_copy(r)]), self.talo)
            if self.talo.sweep == "screen" else None,
        )

    def _talo_answer_group(self, group: TaloGroup, group_requests: list, base_method: Callable) -> tuple[list, GroupReport]:
        scorer = TaskScorer(group.task, group.task_name)
        report = GroupReport.start(group)
        sweeps: list[LayerSweep] = []

        def make_sweep() -> LayerSweep:
            sweeps.append(self._talo_sweep(group, base_method, scorer))
            return sweeps[-1]

        selection = select_knockout(group.split, self.talo, self.talo_candidate_layers, make_sweep)
        report.decided(selection)
        if sweeps and evaluation_scope.current().log_samples:  # the probe log goes beside the sample rows
            rows = probe_log_rows(report, selection, sweeps[0], group.split, self.talo_report.config, self.talo_report.model_identity)
            self.talo_probe_rows.setdefault(group.task_name, []).extend(rows)
        knockout = selection.knockout(self.talo.intervention)
        pool = set(group.split.pool)
        self.talo_doc_info.update({(group.task_name, doc): (selection.layers, doc in pool) for doc in group.doc_requests})
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
        """Score the answered docs; the report keeps per-doc scores, the task's own metrics over the
        test set and the mean of the per-doc scores."""
        report.scored(which, *self._talo_test_scores(group, group_requests, answers, scorer))

    def _talo_test_scores(self, group, group_requests, answers, scorer) -> tuple:
        """(per-doc scores of every answered doc, the pool, 'metric,filter' -> the task's aggregate over
        the test docs, the primary metric's key): what GroupReport.scored takes. All ranks' docs."""
        per_doc = self.talo_ranks.merged(self._talo_doc_scores(group, group_requests, answers, scorer))
        pool = set(group.split.pool)
        metrics = benchmark_metrics(group.task, {d: records for d, (_, records) in per_doc.items() if d not in pool})
        return {d: score for d, (score, _) in per_doc.items()}, pool, metrics, primary(group.task, metrics)[0]

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
                report.scored_variant(label, *self._talo_test_scores(group, test_requests, answers, scorer))
        self._talo_write_report()

    @staticmethod
    def _talo_doc_scores(group, group_requests, answers, scorer) -> dict:
        """doc id -> (its score in [0, 1], its records per filter) for every fully answered doc."""
        by_doc: dict = defaultdict(dict)
        for request, answer in zip(group_requests, answers):
            by_doc[request.doc_id][request.idx] = answer
        scores = {}
        for doc_id, answered in by_doc.items():
            requests = group.doc_requests[doc_id]
            if len(answered) != len(requests):
                continue  # some of this doc's requests were served by a response cache
            responses = [answered[r.idx] for r in requests]
            records = scorer.records(group.task.eval_docs[doc_id], requests, responses)
            scores[doc_id] = (scorer.score_of(records), records)
        return scores
