"""The TaLo mixin: turns a harness's model class into a TaLo model, for lmms-eval and lm-eval alike.

The harness sends all requests of one type in one call. The mixin groups them by task (and by
category value), runs the probe pre-pass of each group on copies of its requests, selects a layer,
answers the group's real requests with that layer knocked out, and returns the answers in the
harness's order. The base class's own generate_until / loglikelihood do every forward pass.
The report scores each group's test docs with the task's own aggregation (lmms_talo.harness.benchmark_metric).
Any other request type (generate_until_multi_round, generate_until_agentic, generate_visual_cot,
lm-eval's loglikelihood_rolling) stops the run with UnsupportedRequestType, naming the task.
A failure the base class swallows during a probe pass (generate() raising, or an error it logs while
decoding or preprocessing) stops the run with lmms_talo.harness.failures.GenerationFailed: a probe
answer is real or an error. Grouping is lmms_talo.harness.grouping's, scoring of the test docs
lmms_talo.harness.heldout's.
The decision of each group is lmms_talo.method.selection's; what differs between the harnesses is asked of
the class's `talo_harness` (lmms_talo.harness.base), so this module imports neither harness.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

from lmms_talo.harness import evaluation_scope
from lmms_talo.harness.answer_cache import AnswerCache, variant_key
from lmms_talo.harness.base import Harness, own_scoring
from lmms_talo.harness.failures import raise_on_failure, watch_failures, watched_modules
from lmms_talo.harness.grouping import TaloGroup, fresh_copy, group_requests, harness_run_args, log_pre_pass
from lmms_talo.harness.heldout import heldout_scores, score_test_variants, transfer_variants
from lmms_talo.harness.scoring import TaskScorer
from lmms_talo.harness.sweep_engine import choose_engine
from lmms_talo.logs import log
from lmms_talo.memory import process_memory
from lmms_talo.method.backbone import decoder_layers, unwrap
from lmms_talo.method.config import TaloArgumentError, TaloConfig
from lmms_talo.method.interventions import BASE, Knockout, check_layers, knocked_out
from lmms_talo.method.parallel import current_ranks
from lmms_talo.method.prefix_replay import PrefixReplay
from lmms_talo.method.screen import task_screen
from lmms_talo.method.selection import select_knockout
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.harness_annotations import annotate, log_to_wandb, results_block
from lmms_talo.outputs.probe_log import probe_log_rows
from lmms_talo.outputs.probe_store import group_store
from lmms_talo.outputs.progress import ProbeProgress
from lmms_talo.outputs.report import GroupReport, TaloReport, summary_table


class UnsupportedRequestType(RuntimeError):
    """A task sent a request type TaLo cannot probe or score (see TaloMixin.generate_until_multi_round)."""


class TaloMixin:
    """Mixed in before a harness's model class: `class TaloLlava(TaloMixin, LlavaHf)`, with the
    class's harness in `talo_harness`."""

    talo_harness: Harness
    talo_answer_cache: AnswerCache | None = None  # the harness's response cache, during a cached call

    def set_cache_hook(self, cache_hook) -> None:
        """A harness's cache hook is not taken: it would file knocked-out answers under the full
        model's key. TaLo's answers are cached under its own (lmms_talo.harness.answer_cache)."""

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

    def _talo_run_base(
        self, base_method: Callable, requests: Sequence, knockout: Knockout | None, strict: bool
    ) -> list:
        """The base class answers copies of `requests` under `knockout`; `strict` (probe passes):
        a failure it swallows stops the run (lmms_talo.harness.failures)."""
        copies = [fresh_copy(r) for r in requests]
        model = self._talo_model()
        with knocked_out(model, knockout), watch_failures(model, watched_modules(self, TaloMixin)) as failures:
            outputs = base_method(copies)
        if strict:
            raise_on_failure(failures, knockout)
        return [self.talo_harness.unwrap(o) for o in outputs]

    def _talo_groups(self, reqtype: str, requests: Sequence) -> list[TaloGroup]:
        groups, fields_by_task = group_requests(reqtype, requests, self.talo, self.talo_ranks, self.talo_harness)
        self.talo_report.harness_run.update(harness_run_args())
        if self.talo_ranks.is_main:
            log_pre_pass(reqtype, groups, fields_by_task, self.talo)
        return groups

    def _talo_answer(self, reqtype: str, requests: Sequence, base_method: Callable) -> list:
        self.talo_ranks = current_ranks()
        results: list = [None] * len(requests)
        answered = []
        groups = self._talo_groups(reqtype, requests)
        probed = [g for g in groups if not g.split.unprobed]
        variants = len(self.talo_candidate_layers) + 1
        self._talo_progress = ProbeProgress.start(
            reqtype,
            len(probed),
            len(groups) - len(probed),
            variants,
            variants * sum(len(g.split.first_round().docs) for g in probed),
            main=self.talo_ranks.is_main,
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
            log.info(
                f"TaLo: {self.talo_harness.name}'s aggregate below counts probe-pool docs too "
                "(unless the task excludes them); the report's TaLo column is the test (non-pool) score"
            )
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

    def _talo_sweep(self, group: TaloGroup, base_method: Callable, scorer: TaskScorer) -> LayerSweep:
        """The group's layer sweep: the base class answers the probe units' requests (a unit: one doc,
        or all rows of one question), the task's own scoring scores each row, and a unit scores its
        worst row (right only if every row is: MMBench's circular rule). The config picks the sweep
        mode and prefix replay."""

        def answer(knockout: Knockout | None, units: Sequence) -> dict:
            with self._talo_progress.timed(len(units)):
                outputs = self._talo_run_base(base_method, group.unit_requests(units), knockout, strict=True)
            return group.by_unit(units, outputs)

        loss = self.talo_harness.likelihood_is_loss
        if self.talo.select_stat == "margin":
            scorer.check_margin()
        replay = PrefixReplay(self._talo_model(), max(self.talo_candidate_layers)) if self.talo.replay else None
        return LayerSweep(
            answer,
            lambda unit, responses: group.unit_score(scorer, unit, responses),
            group_store(group, self.talo, self.talo_report),
            mode=self.talo.sweep,
            replay=replay,
            ranks=self.talo_ranks,
            rule=self.talo_rule,
            statistic=(lambda unit, responses: group.unit_margin(scorer, unit, responses, loss))
            if self.talo.select_stat == "margin"
            else None,
            screen=task_screen(self, self._talo_model(), group, lambda r: base_method([fresh_copy(r)]), self.talo)
            if self.talo.sweep == "screen"
            else None,
            engine=choose_engine(self, self._talo_model(), group, self.talo.sweep_batch),
        )

    def _talo_answer_group(
        self, group: TaloGroup, group_requests: list, base_method: Callable
    ) -> tuple[list, GroupReport]:
        scorer = TaskScorer(group.task, group.task_name)
        report = GroupReport.start(group)
        sweeps: list[LayerSweep] = []

        def make_sweep() -> LayerSweep:
            sweeps.append(self._talo_sweep(group, base_method, scorer))
            return sweeps[-1]

        selection = select_knockout(group.split, self.talo, self.talo_candidate_layers, make_sweep)
        report.decided(selection)
        if sweeps and evaluation_scope.current().log_samples:  # the probe log goes beside the sample rows
            rows = probe_log_rows(
                report, selection, sweeps[0], group.split, self.talo_report.config, self.talo_report.model_identity
            )
            self.talo_probe_rows.setdefault(group.task_name, []).extend(rows)
        knockout = selection.knockout(self.talo.intervention)
        pool = set(group.split.pool)
        self.talo_doc_info.update(
            {(group.task_name, doc): (selection.layers, doc in pool) for doc in group.doc_requests}
        )
        self.talo_report.add(report)
        self._talo_write_report()  # a crash later keeps the selection

        started = time.perf_counter()
        answers = self._talo_answers(base_method, group_requests, knockout, report)
        report.evaluated(time.perf_counter() - started)
        self._talo_score_test(group, group_requests, answers, report, scorer, "talo")
        if self.talo.compare_base:
            test_docs = set(group.split.test)
            base_requests = [r for r in group_requests if r.doc_id in test_docs]
            base_answers = (
                self._talo_answers(base_method, base_requests, None, report)
                if knockout
                else [a for r, a in zip(group_requests, answers) if r.doc_id in test_docs]
            )
            self._talo_score_test(group, base_requests, base_answers, report, scorer, "base")
        report.memory = process_memory()
        return answers, report

    def _talo_score_test(self, group, group_requests, answers, report, scorer, which: str) -> None:
        """Score the answered docs; the report keeps per-doc scores, the task's own metrics over the
        test set and the mean of the per-doc scores."""
        report.scored(which, heldout_scores(group, group_requests, answers, scorer, self.talo_ranks))

    def _talo_score_test_variants(self, answered: list, base_method: Callable) -> None:
        """transfer / test_all_layers: each sub-task's test docs under the other sub-tasks' selections
        and/or every candidate layer, for offline analysis (lmms_talo.harness.heldout)."""

        def run_pass(requests, knockout, report):
            return self._talo_answers(base_method, requests, knockout, report)

        variants = transfer_variants(answered, self.talo, self.talo_candidate_layers, self.talo_ranks.is_main)
        score_test_variants(answered, variants, self.talo.intervention, run_pass, self.talo_ranks)

    def _talo_answers(self, base_method: Callable, requests: Sequence, knockout: Knockout | None, report) -> list:
        """Answers of real (not probe) requests under `knockout`: from the harness's response cache
        under TaLo's key where one serves this call, else from the base class."""

        def compute(todo: Sequence) -> list:
            return self._talo_run_base(base_method, todo, knockout, strict=False)

        if self.talo_answer_cache is None:
            return compute(requests)
        report_run = self.talo_report
        key = variant_key(
            report_run.model_identity,
            report_run.harness_model,
            report_run.versions,
            knockout.label if knockout else BASE,
            self.talo.intervention,
        )
        answers, served = self.talo_answer_cache.answers(requests, key, compute)
        report.answers_from_cache += sum(self.talo_ranks.all_gather(served))  # every rank answers its own share
        return answers
