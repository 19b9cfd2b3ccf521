"""talo_report.json and the summary table in the log.

The report holds everything needed to recompute TaLo's statistics without the model: per sub-task
the candidate layers, per-doc probe scores of the baseline and of every layer, the interaction
vector, the selection and why, the probe and pool doc ids, and the scores over test (non-pool) docs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lmms_talo")

SCHEMA_VERSION = 1


def model_identity(model) -> dict:
    """Name, class and a digest of a few weights: enough to tell two checkpoints apart cheaply."""
    from .backbone import decoder_layers, unwrap

    model = unwrap(model)
    sites = decoder_layers(model)
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for site in (sites[0], sites[-1]):
        for param in site.attention_parameters():
            digest.update(param.detach().float().cpu().numpy().tobytes()[:65536])
    return {
        "name_or_path": getattr(model.config, "_name_or_path", ""),
        "class": type(model).__name__,
        "num_layers": len(sites),
        "digest": digest.hexdigest()[:16],
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


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
    probe_docs: list = field(default_factory=list)
    probe_doc_scores: dict = field(default_factory=dict)
    forced: bool = False
    sweep_seconds: float = 0.0
    eval_seconds: float = 0.0
    probe_docs_computed: int = 0
    probe_docs_reused: int = 0
    sweep_mode: str = "full"  # full: every layer on every probe doc; select: pruned (see rounds[].pruned)
    sweep_replay: dict = field(default_factory=dict)  # prefix replay's work counters (lmms_talo.replay)
    test: dict = field(default_factory=dict)  # "talo" / "base" -> {score, n, doc_scores}
    selected_layers: list = field(default_factory=list)  # the knockout evaluated: [selected_layer] or more
    layer_stages: list = field(default_factory=list)  # multi-layer search steps (lmms_talo.pairwise)
    test_variants: dict = field(default_factory=dict)  # variant label -> {score, n, doc_scores} (transfer modes)
    memory: dict = field(default_factory=dict)  # process memory once the sub-task is done (lmms_talo.memory)

    @classmethod
    def start(cls, group) -> "GroupReport":
        return cls(
            task=group.task_name, subtask=group.name, category=group.category, request_type=group.reqtype,
            pool=list(group.split.pool), test_doc_count=len(group.split.test),
        )

    def mark_forced(self, layer: int) -> None:
        self.forced = True
        self.selected_layer = layer
        self.selected_layers = [layer]
        self.selection_reason = f"force_layer={layer}: no probing"

    def swept(self, result) -> None:
        final = result.final
        self.candidate_layers = list(result.candidate_layers)
        self.rounds = [
            {"probe_docs": list(o.probe_docs), "baseline": o.baseline,
             "layer_scores": {str(k): v for k, v in o.layer_scores.items()},
             "selected": o.selected, "reason": o.reason,
             "evidence": {str(k): v for k, v in o.evidence.items()},
             "pruned": {str(k): p.to_dict() for k, p in pruned.items()}}
            for o, pruned in zip(result.rounds, result.pruned_by_round())
        ]
        self.selected_layer = final.selected
        self.selected_layers = [] if final.selected is None else [final.selected]
        self.selection_reason = final.reason
        self.tied_layers = list(final.tied_layers)
        self.interaction_vector = {str(k): v for k, v in final.gains.items()}
        self.probe_docs = list(final.probe_docs)
        self.probe_doc_scores = result.doc_scores
        self.sweep_seconds = result.seconds
        self.probe_docs_computed = result.docs_computed
        self.probe_docs_reused = result.docs_reused
        self.sweep_mode = result.mode
        self.sweep_replay = result.replay

    def extended(self, layers, stages) -> None:
        """The multi-layer search's result (lmms_talo.pairwise)."""
        self.selected_layers = list(layers)
        self.layer_stages = [stage.to_dict() for stage in stages]

    def evaluated(self, seconds: float) -> None:
        self.eval_seconds = seconds

    def scored(self, which: str, doc_scores: dict, pool: set) -> None:
        self.test[which] = self._test_entry(doc_scores, pool)

    def scored_variant(self, label: str, doc_scores: dict, pool: set) -> None:
        self.test_variants[label] = self._test_entry(doc_scores, pool)

    @staticmethod
    def _test_entry(doc_scores: dict, pool: set) -> dict:
        test_scores = {d: s for d, s in doc_scores.items() if d not in pool}
        return {
            "score": _mean(test_scores.values()),
            "n": len(test_scores),
            "pool_score": _mean(s for d, s in doc_scores.items() if d in pool),
            "doc_scores": {str(d): s for d, s in doc_scores.items()},
        }

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        if "talo" in self.test and "base" in self.test and self.test["base"]["score"] is not None:
            data["test_difference"] = self.test["talo"]["score"] - self.test["base"]["score"]
        return data


@dataclass
class TaloReport:
    model_identity: dict
    config: dict
    model_class: str
    started: float = field(default_factory=time.time)
    groups: list = field(default_factory=list)
    path: Path | None = None

    @classmethod
    def start(cls, lmm, config) -> "TaloReport":
        return cls(model_identity(lmm.model), config.to_dict(), type(lmm).__name__)

    def add(self, group: GroupReport) -> None:
        self.groups.append(group)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model_identity,
            "model_class": self.model_class,
            "config": self.config,
            "note": (
                "lmms-eval's own aggregate counts every evaluated doc, the probe pool included, unless "
                "the task excludes its pool (the bundled talo_* tasks do). 'test.talo.score' is the "
                "score over test (non-pool) docs only."
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
    """A fixed-width table: one row per sub-task."""
    head = f"{'sub-task':40} {'layer':>5} {'gain':>7} {'probe':>6} {'test n':>6} {'TaLo':>7} {'base':>7} {'diff':>7}"
    lines = [head, "-" * len(head)]
    for g in report["subtasks"]:
        layer = "+".join(map(str, g["selected_layers"])) or "-"
        gain = g["interaction_vector"].get(str(g["selected_layer"])) if g["selected_layer"] is not None else None
        base_probe = g["rounds"][-1]["baseline"] if g["rounds"] else None
        talo = g["test"].get("talo", {})
        base = g["test"].get("base", {})
        diff = g.get("test_difference")

        def fmt(x, spec=".3f"):
            return "-" if x is None else format(x, spec)

        lines.append(
            f"{g['subtask'][:40]:40} {layer:>5} {fmt(gain, '+.3f'):>7} {fmt(base_probe):>6} "
            f"{talo.get('n', 0):>6} {fmt(talo.get('score')):>7} {fmt(base.get('score')):>7} {fmt(diff, '+.3f'):>7}"
        )
    return "\n".join(lines)
