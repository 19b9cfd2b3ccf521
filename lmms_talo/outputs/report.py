"""talo_report.json and the summary table in the log.

The report holds everything needed to recompute TaLo's statistics without the model: per sub-task
the candidate layers, per-unit probe scores of the baseline and of every layer, the interaction
vector, the selection and why, each probe round's units and why it was drawn, why the rounds
stopped (or why the sub-task was not probed), the pool doc ids, and the scores over test (non-pool)
docs. A probe unit is a doc, or all rows of one question where the task has a unit field (MMBench).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmms_talo.method.interventions import Knockout, VariantLabel
from lmms_talo.method.subtasks import paper_figure

if TYPE_CHECKING:
    from lmms_talo.harness.heldout import HeldOutScores
from lmms_talo.logs import log
from lmms_talo.outputs.model_identity import device_models, library_versions, weights_identity

SCHEMA_VERSION = 2  # 2: test.score is the benchmark metric; the per-doc mean moved to doc_mean


def model_identity(model) -> dict:
    """Name, class, and a digest of everything that makes the model's answers: every weight (its
    files' content, or its tensors), config, tokenizer, processor and chat template files
    (lmms_talo.outputs.model_identity); the dtypes, device types and device models its parameters
    actually have (what the model args asked for may differ)."""
    from lmms_talo.method.backbone import decoder_layers, unwrap

    model = unwrap(model)
    weights = weights_identity(model)
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(json.dumps([config, weights], sort_keys=True).encode())
    params = list(model.parameters())
    return {
        "name_or_path": getattr(model.config, "_name_or_path", ""),
        "class": type(model).__name__,
        "num_layers": len(decoder_layers(model)),
        "digest": digest.hexdigest()[:16],
        "weights": weights,
        "dtype": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "device_type": sorted({p.device.type for p in params}),
        "device_model": device_models(model),
    }


def harness_model(lmm, model_args: dict) -> dict:
    """The harness model's classes (TaLo's, any repair, the base class TaLo wraps), its form
    (lmms-eval: chat or simple) and the model args it was given (TaLo's own removed): each can change
    the prompt or the numerics of an answer."""
    classes = [c for c in type(lmm).__mro__ if c is not object]
    return {
        "harness": lmm.talo_harness.name,
        "classes": [f"{c.__module__}.{c.__qualname__}" for c in classes],
        "simple": getattr(lmm, "is_simple", None),
        "args": {k: model_args[k] for k in sorted(model_args)},
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def round_entry(index: int, drawn: str, outcome: Any, pruned: dict | None = None) -> dict:
    """One probe round as the report keeps it: its units and why they were drawn, and the rule's
    decision on them (a RoundOutcome) with its per-layer statistics."""
    o = outcome
    return {
        "round": index,
        "drawn": drawn,
        "size": len(o.probe_docs),
        "probe_docs": list(o.probe_docs),
        "baseline": o.baseline,
        "layer_scores": {str(k): v for k, v in o.layer_scores.items()},
        "selected": o.selected,
        "reason": o.reason,
        "evidence": {str(k): v for k, v in o.evidence.items()},
        "p_values": {str(k): v for k, v in o.p_values.items()},
        "holm_p": {str(k): v for k, v in o.holm.items()},
        "pruned": {str(k): p.to_dict() for k, p in (pruned or {}).items()},
    }


def decision_fields(final: Any) -> dict:
    """A sub-task's decision as the report keeps it, from the round the rounds ended on."""
    return {
        "selected_layer": final.selected,
        "selection_reason": final.reason,
        "tied_layers": list(final.tied_layers),
        "interaction_vector": {str(k): v for k, v in final.gains.items()},
        "interaction_holm_p": {str(k): v for k, v in final.holm.items()},
        "probe_docs": list(final.probe_docs),
    }


@dataclass
class GroupReport:
    task: str
    subtask: str
    category: Any
    request_type: str
    pool: list
    test_doc_count: int
    candidate_layers: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    selected_layer: int | None = None
    selection_reason: str = ""
    tied_layers: list = field(default_factory=list)
    interaction_vector: dict = field(default_factory=dict)
    interaction_holm_p: dict = field(
        default_factory=dict
    )  # per layer: its paired test's p on the deciding round, Holm-adjusted
    confirmation: dict = field(
        default_factory=dict
    )  # select_rule=confirm: docs, both scores, statistic, p, kept and why
    probe_docs: list = field(default_factory=list)
    probe_doc_scores: dict = field(default_factory=dict)
    forced: bool = False
    not_probed: str | None = None  # why the sub-task was answered without probing (too few docs, force_layer)
    unit_field: str | None = None  # probe units are the docs sharing this field's value (None: one doc each)
    unit_docs: dict = field(default_factory=dict)  # with a unit field: pool unit -> its doc ids
    probe_stopped: str = ""  # why the probe rounds ended
    sweep_seconds: float = 0.0
    eval_seconds: float = 0.0
    answers_from_cache: int = 0  # answers the harness's response cache served (lmms_talo.harness.answer_cache)
    paper_figure: dict | None = None  # the figure that compares with the paper's (lmms_talo.method.subtasks)
    probe_docs_computed: int = 0
    probe_docs_reused: int = 0
    sweep_mode: str = "full"  # full: every layer on every probe doc; select: pruned (see rounds[].pruned)
    sweep_replay: dict = field(
        default_factory=dict
    )  # prefix replay's counters and status: "on" / "disabled (reason)" (lmms_talo.method.prefix_replay)
    sweep_engine: dict = field(
        default_factory=dict
    )  # batched or sequential, why, and the batched engine's self-check (lmms_talo.method.batching)
    test: dict = field(default_factory=dict)  # "talo" / "base" -> test entry (see _test_entry)
    selected_layers: list = field(default_factory=list)  # the knockout evaluated: [selected_layer] or more
    layer_stages: list = field(default_factory=list)  # multi-layer search steps (lmms_talo.method.greedy_search)
    test_variants: dict = field(default_factory=dict)  # variant label -> test entry (transfer modes)
    memory: dict = field(default_factory=dict)  # process memory once the sub-task is done (lmms_talo.memory)
    screen: list = field(default_factory=list)  # sweep=screen, per screened round: estimates, exact layers, spearman

    @classmethod
    def start(cls, group) -> GroupReport:
        return cls(
            task=group.task_name,
            subtask=group.name,
            category=group.category,
            request_type=group.reqtype,
            pool=list(group.split.pool),
            test_doc_count=len(group.split.test),
            paper_figure=paper_figure(group.task_name),
            unit_field=group.fields.unit,
            unit_docs={str(u): list(group.split.docs_of(u)) for u in group.split.pool_units}
            if group.split.unit_docs
            else {},
        )

    def decided(self, selection) -> None:
        """Record a Selection (lmms_talo.method.selection): forced, not probed, or swept and searched."""
        if selection.forced:
            layer = selection.layers[0]
            self.forced = True
            self.selected_layer = layer
            self.selected_layers = [layer]
            self.selection_reason = f"force_layer={layer}: no probing"
            self.not_probed = self.selection_reason
        elif selection.not_probed is not None:
            self.not_probed = selection.not_probed
            self.selection_reason = f"not probed: {selection.not_probed}"
        else:
            self._swept(selection.sweep)
            self.probe_doc_scores = selection.probe_doc_scores
            self.selected_layers = list(selection.layers)
            self.layer_stages = [stage.to_dict() for stage in selection.stages]
            self.record_confirmation(selection.confirmation)

    def record_confirmation(self, confirmation) -> None:
        """select_rule=confirm: the confirmation record; a dropped knockout leaves no selected layer."""
        if confirmation is None:
            return
        self.confirmation = confirmation.to_dict()
        if confirmation.kept:
            self.selection_reason += f"; {confirmation.reason}"
        else:
            self.selected_layer = None
            self.tied_layers = []
            self.selection_reason = confirmation.reason

    def _swept(self, result) -> None:
        final = result.final
        self.candidate_layers = list(result.candidate_layers)
        self.rounds = [
            round_entry(drawn.index, drawn.why, o, pruned)
            for drawn, o, pruned in zip(result.probe_rounds, result.rounds, result.pruned_by_round())
        ]
        self.probe_stopped = result.stopped
        for name, value in decision_fields(final).items():
            setattr(self, name, value)
        self.sweep_seconds = result.seconds
        self.probe_docs_computed = result.docs_computed
        self.probe_docs_reused = result.docs_reused
        self.sweep_mode = result.mode
        self.sweep_replay = result.replay
        self.sweep_engine = result.engine
        self.screen = result.screen

    def evaluated(self, seconds: float) -> None:
        self.eval_seconds = seconds

    def scored(self, which: str, scores: HeldOutScores) -> None:
        """`which`: "talo" (the selected knockout) or "base" (compare_base)."""
        self.test[which] = self._test_entry(*scores)

    def scored_variant(self, label: VariantLabel, scores: HeldOutScores) -> None:
        self.test_variants[label] = self._test_entry(*scores)

    @staticmethod
    def _test_entry(doc_scores: dict, pool: set, metrics: dict, metric: str | None) -> dict:
        """`metrics`: 'metric,filter' -> the task's own aggregate over the test docs
        (lmms_talo.harness.benchmark_metric); `metric`: its primary key. `score` is that metric, in the
        benchmark's own scale (MMBench: %); `doc_mean` the plain mean of the per-doc scores in [0, 1]."""
        test_scores = {d: s for d, s in doc_scores.items() if d not in pool}
        value = metrics.get(metric) if metric else None
        return {
            "score": value if isinstance(value, float) else None,
            "metric": metric,
            "metrics": metrics,
            "doc_mean": _mean(test_scores.values()),
            "n": len(test_scores),
            "pool_doc_mean": _mean(s for d, s in doc_scores.items() if d in pool),
            "doc_scores": {str(d): s for d, s in doc_scores.items()},
        }

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        talo, base = self.test.get("talo"), self.test.get("base")
        if talo and base:
            data["test_difference"] = _difference(talo["score"], base["score"])
            data["test_difference_doc_mean"] = _difference(talo["doc_mean"], base["doc_mean"])
        return data


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@dataclass
class TaloReport:
    model_identity: dict
    config: dict
    model_class: str
    harness_model: dict = field(default_factory=dict)  # harness_model(): classes, form, model args
    versions: dict = field(default_factory=dict)  # lmms_talo.outputs.model_identity.library_versions
    harness_run: dict = field(default_factory=dict)  # the harness's --limit and --predict_only
    started: float = field(default_factory=time.time)
    groups: list = field(default_factory=list)
    path: Path | None = None

    @classmethod
    def start(cls, lmm, config, model_args: dict) -> TaloReport:
        """`model_args`: the args the harness model class got, TaLo's removed. The config records
        the probe store's folder actually used (or "none")."""
        from lmms_talo.outputs.probe_store import store_folder

        harness = harness_model(lmm, model_args)
        return cls(
            model_identity(lmm.model),
            {**config.to_dict(), "state_dir": store_folder(config.state_dir)},
            type(lmm).__name__,
            harness,
            library_versions(harness["harness"]),
        )

    def add(self, group: GroupReport) -> None:
        self.groups.append(group)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model_identity,
            "model_class": self.model_class,
            "harness_model": self.harness_model,
            "versions": self.versions,
            "harness_run": self.harness_run,
            "config": self.config,
            "note": (
                "lmms-eval's own aggregate counts every evaluated doc, the probe pool included, unless "
                "the task excludes its pool (the bundled talo_* tasks do). 'test.talo.score' is the "
                "task's own metric (its aggregation, 'test.talo.metric') over test (non-pool) docs only, in "
                "the benchmark's scale; 'test.talo.metrics' has every metric and filter; 'test.talo.doc_mean' "
                "is the plain mean of the per-doc scores in [0, 1]."
            ),
            "subtasks": [g.to_dict() for g in self.groups],
        }

    def resolve_path(self, cli_args: Any) -> Path:
        if self.config.get("report"):
            return Path(self.config["report"])
        output = getattr(cli_args, "output_path", None) if cli_args is not None else None
        return Path(output or ".") / "talo_report.json"

    def write(self, cli_args: Any = None) -> Path | None:
        path = self.resolve_path(cli_args)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
            tmp.replace(path)
        except OSError as exc:
            log.error("lmms-talo: cannot write the report to %s (%s); the evaluation goes on", path, exc)
            return None
        self.path = path
        return path


def summary_table(report: dict) -> str:
    """A fixed-width table: one row per sub-task. TaLo / base / diff are the task's own metric over the
    test docs (named in `metric`; "(judge)": not computed, it needs a judge); the doc-mean columns are
    the plain means of the per-doc scores. `holm p`: the paired test's Holm-adjusted p-value of the
    selected layer (else of the layer with the best probe gain): above 0.05, its gain could be noise."""
    head = (
        f"{'sub-task':40} {'layer':>5} {'gain':>7} {'holm p':>6} {'probe':>6} {'test n':>6} {'metric':>22} {'TaLo':>7} "
        f"{'base':>7} {'diff':>7} {'mean T':>7} {'mean B':>7}"
    )
    lines = [head, "-" * len(head)]
    for g in report["subtasks"]:
        layer = Knockout(tuple(g["selected_layers"])).label if g["selected_layers"] else "-"
        gain = g["interaction_vector"].get(str(g["selected_layer"])) if g["selected_layer"] is not None else None
        base_probe = g["rounds"][-1]["baseline"] if g["rounds"] else None
        talo = g["test"].get("talo", {})
        base = g["test"].get("base", {})

        def fmt(x, spec=".3f"):
            return "-" if x is None else format(x, spec)

        lines.append(
            f"{g['subtask'][:40]:40} {layer:>5} {fmt(gain, '+.3f'):>7} {fmt(_holm_p(g), '.3f'):>6} "
            f"{fmt(base_probe):>6} {talo.get('n', 0):>6} {_metric_label(talo)[:22]:>22} {fmt(talo.get('score')):>7} "
            f"{fmt(base.get('score')):>7} {fmt(g.get('test_difference'), '+.3f'):>7} "
            f"{fmt(talo.get('doc_mean')):>7} {fmt(base.get('doc_mean')):>7}"
        )
    figures = {g["task"]: g["paper_figure"] for g in report["subtasks"] if g.get("paper_figure")}
    lines += [f"compare with the paper: {task}: {f['field']} ({f['why']})" for task, f in figures.items()]
    statuses = [g.get("sweep_replay", {}).get("status", "on") for g in report["subtasks"]]
    lines += [f"prefix replay: {status}" for status in dict.fromkeys(statuses) if status != "on"]
    fallbacks = [g.get("sweep_engine", {}).get("why", "") for g in report["subtasks"]]
    lines += [f"batched sweep: {why}" for why in dict.fromkeys(fallbacks) if why.startswith("fell back")]
    return "\n".join(lines)


def _holm_p(group: dict) -> float | None:
    """The Holm-adjusted p of the selected layer, else of the best probe gain (lowest layer on ties)."""
    holm, gains = group.get("interaction_holm_p") or {}, group.get("interaction_vector") or {}
    layer = group.get("selected_layer")
    if layer is None and gains:
        layer = min(gains, key=lambda k: (-gains[k], int(k)))
    return holm.get(str(layer))


def _metric_label(entry: dict) -> str:
    """'average' for 'average,none'; 'name (judge)' where the metric needs a judge."""
    metric = entry.get("metric")
    if not metric:
        return "-"
    name, _, filter_key = metric.partition(",")
    label = name if filter_key in ("none", "") else metric
    value = entry.get("metrics", {}).get(metric)
    return f"{label} (judge)" if isinstance(value, str) and "judge" in value else label
