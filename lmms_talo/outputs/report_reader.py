"""talo_report.json read back: the one typed reader, beside its writer (lmms_talo.outputs.report).

Everything that reads a report (the analysis, `lmms-talo export --from-report`, the demo's table,
the benchmarks) goes through `load_run` / `Run` / `Subtask`, never through raw dictionary keys, so a
schema change is made here once. Every statistic is recomputed from the per-doc records
(probe_doc_scores, test doc scores), never from the model: a `Subtask` turns those records into
gains, test scores and rule decisions.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmms_talo.method.interventions import Knockout
from lmms_talo.method.rules import RoundOutcome, SelectionRule, make_rule
from lmms_talo.outputs.probe_log import ProbeLogError, is_probe_log, report_from_probe_log

REPORT_NAME = "talo_report.json"
SPLIT_KEYS = ("probe_shots", "seed", "granularity", "category_field", "stratify_field")


def doc_mean(entry: dict | None) -> float | None:
    """A test entry's mean per-doc score in [0, 1]: the analyses pool sub-tasks and count docs, which
    the benchmark's own metric (`score`, e.g. MMBench's circular % or MMStar's l2 macro mean) does not
    allow. Reports of schema 1 kept that mean under `score`."""
    if not entry:
        return None
    return entry["doc_mean"] if "doc_mean" in entry else entry.get("score")


class ReportError(ValueError):
    """A path is not a TaLo report, or the report lacks what an analysis needs."""


def find_reports(paths: Iterable[str | Path]) -> list[Path]:
    """Report files named on the command line: a file as is (a report or a probe log), a folder
    searched for talo_report.json."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(path.rglob(REPORT_NAME))
            if not inside:
                raise ReportError(
                    f"{path} holds no {REPORT_NAME}: pass the report file or the --output_path of a TaLo run"
                )
            found.extend(inside)
        else:
            raise ReportError(f"{path} does not exist: pass a {REPORT_NAME} or a folder that contains one")
    return list(dict.fromkeys(p.resolve() for p in found))


def label_of(layers: Iterable[int]) -> str:
    """The variant label the sweep files per-doc scores under ('base', '7', '3+7'): Knockout's own."""
    return Knockout(tuple(sorted(layers))).label


@dataclass
class Subtask:
    """One sub-task of a report, with its per-doc records."""

    data: dict
    config: dict

    @property
    def name(self) -> str:
        return self.data["subtask"]

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def request_type(self) -> str:
        return self.data["request_type"]

    @property
    def pool(self) -> list[str]:
        return [str(d) for d in self.data.get("pool", [])]

    @property
    def selected_layer(self) -> int | None:
        return self.data.get("selected_layer")

    @property
    def selected_layers(self) -> list[int]:
        """Every knocked-out layer of the selection (max_layers > 1 may select several)."""
        layers = self.data.get("selected_layers")
        if layers is None and self.selected_layer is not None:
            layers = [self.selected_layer]
        return list(layers or [])

    @property
    def selection_reason(self) -> str:
        return self.data.get("selection_reason", "")

    @property
    def interaction_vector(self) -> dict[int, float]:
        return {int(layer): gain for layer, gain in (self.data.get("interaction_vector") or {}).items()}

    @property
    def final_baseline(self) -> float | None:
        """The base model's probe score on the round the sweep ended on (None when not probed)."""
        rounds = self.data.get("rounds") or []
        return rounds[-1]["baseline"] if rounds else None

    def test(self, which: str) -> dict:
        """The test-doc entry of "talo" or "base" (empty when the run did not score it)."""
        return (self.data.get("test") or {}).get(which) or {}

    @property
    def test_difference_doc_mean(self) -> float | None:
        return self.data.get("test_difference_doc_mean")

    @property
    def seconds(self) -> float:
        """Time in the probe pre-pass and the real evaluation."""
        return self.data.get("sweep_seconds", 0.0) + self.data.get("eval_seconds", 0.0)

    @property
    def memory(self) -> dict:
        return self.data.get("memory") or {}

    @property
    def probe_docs(self) -> list[str]:
        """The probe docs of the round the sweep ended on (the one the selection used)."""
        return [str(d) for d in self.data.get("probe_docs", [])]

    @property
    def layers(self) -> list[int]:
        """Candidate layers with per-doc scores on the final probe set (none if the baseline was perfect)."""
        rounds = self.data.get("rounds") or []
        if not rounds:
            return []
        swept = {int(k) for k in rounds[-1]["layer_scores"]}
        return [layer for layer in self.data["candidate_layers"] if layer in swept]

    @property
    def swept(self) -> bool:
        return bool(self.layers)

    @property
    def selected_label(self) -> str:
        return label_of(
            self.data.get("selected_layers")
            or ([] if self.data.get("selected_layer") is None else [self.data["selected_layer"]])
        )

    def probe_scores(self, label: str) -> dict[str, float]:
        return self.data["probe_doc_scores"][label]

    def layer_doc_scores(self) -> dict[int, dict[str, float]]:
        return {layer: self.probe_scores(str(layer)) for layer in self.layers}

    def decide(self, rule: SelectionRule, docs: list[str] | None = None) -> RoundOutcome:
        """The rule's decision on the final probe docs (or on `docs`, e.g. a bootstrap resample)."""
        docs = self.probe_docs if docs is None else docs
        return rule.decide(docs, self.probe_scores("base"), self.layer_doc_scores(), stream=self.name)

    def gains(self) -> dict[int, float]:
        """The interaction vector, recomputed from the per-doc probe records."""
        return self.decide(make_rule("gain")).gains

    def differences(self) -> np.ndarray:
        """layers x probe docs: knocked-out score minus base score, per doc."""
        base = self.probe_scores("base")
        return np.array([[scores[d] - base[d] for d in self.probe_docs] for scores in self.layer_doc_scores().values()])

    def test_score(self, label: str) -> float | None:
        """Mean per-doc score over the test (non-pool) docs with `label` knocked out, where the run computed it."""
        entry = (self.data.get("test_variants") or {}).get(label)
        if entry is None and label == "base":
            entry = self.data.get("test", {}).get("base")
        if entry is None and label == self.selected_label:
            entry = self.data.get("test", {}).get("talo")
        return doc_mean(entry)

    def test_gain(self, label: str) -> float | None:
        if label == "base":
            return 0.0 if self.test_score("base") is not None else None
        score, base = self.test_score(label), self.test_score("base")
        return None if score is None or base is None else score - base

    def sweep_passes(self) -> int:
        """Passes over the probe set spent by the single-layer sweep: baseline + each layer, per round."""
        return sum(1 + len(r["layer_scores"]) for r in self.data.get("rounds", []))


@dataclass
class Run:
    """One TaLo report."""

    path: Path
    data: dict
    label: str = ""
    key: str = ""  # a short name for file names: run1, run2, ...
    subtasks: list[Subtask] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.data.get("config", {})

    @property
    def intervention(self) -> str:
        return self.config.get("intervention", "zero")

    @property
    def from_probe_log(self) -> bool:
        """Re-decided from a probe log, which holds probe passes only: no test scores."""
        return str(self.data.get("source", "")).startswith("probe log")

    def subtask(self, name: str) -> Subtask:
        """The sub-task named `name` (a sub-task or a task name)."""
        for sub in self.subtasks:
            if name in (sub.name, sub.task):
                return sub
        raise ReportError(f"{name!r} is not in {self.path}; it holds: {', '.join(s.name for s in self.subtasks)}")

    @property
    def model_name(self) -> str:
        name = str(self.data.get("model", {}).get("name_or_path") or self.data.get("model_class") or "model")
        return Path(name.rstrip("/")).name or name

    def rule(self, name: str | None = None) -> SelectionRule:
        """The run's selection rule (or the rule `name` with the run's parameters), on the per-doc
        scores: a report keeps no per-doc margins, so select_stat=margin is not re-applied."""
        c = self.config
        name = name or c.get("select_rule", "gain")
        confirming = {"base_rule": c.get("select_base_rule", "gain")} if name == "confirm" else {}
        return make_rule(
            name,
            threshold=c.get("threshold", 0.0),
            alpha=c.get("select_alpha", 0.05),
            resamples=c.get("select_resamples", 1000),
            seed=c.get("seed", 0),
            **confirming,
        )

    @property
    def probe_rule_name(self) -> str:
        """The rule that decided the run's probe rounds: a confirming rule's base rule."""
        rule = self.rule()
        return rule.base.name if rule.confirms else rule.name

    def split_identity(self) -> tuple:
        """What fixes the model and the probe docs: two runs that share it differ only in what they did with them."""
        return (self.data.get("model", {}).get("digest"),) + tuple(str(self.config.get(k)) for k in SPLIT_KEYS)

    def swept_subtasks(self) -> list[Subtask]:
        return [s for s in self.subtasks if s.swept]


def _default_label(run: Run) -> str:
    c = run.config
    parts = [run.model_name, c.get("intervention", "zero"), f"k={c.get('probe_shots')}"]
    if c.get("select_rule", "gain") != "gain":
        parts.append(c["select_rule"])
    if c.get("max_layers", 1) > 1:
        parts.append(f"max_layers={c['max_layers']}")
    return " · ".join(str(p) for p in parts)


def load_run(path: Path) -> Run:
    """A talo_report.json, or a probe log re-decided into one (lmms_talo.outputs.probe_log)."""
    if is_probe_log(Path(path)):
        try:
            return run_of(report_from_probe_log(path), Path(path))
        except ProbeLogError as exc:
            raise ReportError(str(exc)) from exc
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path} as JSON ({exc}): pass a talo_report.json written by a TaLo run") from exc
    return run_of(data, Path(path))


def run_of(data: dict, path: Path) -> Run:
    """A report already in memory (`path`: where it was or will be written)."""
    if not isinstance(data, dict) or "subtasks" not in data or "config" not in data:
        raise ReportError(f"{path} is not a TaLo report (no 'subtasks' / 'config'): pass a talo_report.json")
    run = Run(Path(path), data)
    run.subtasks = [Subtask(s, run.config) for s in data["subtasks"]]
    return run


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in find_reports(paths)]
    counts = Counter(_default_label(r) for r in runs)
    seen: Counter = Counter()
    for index, run in enumerate(runs, 1):
        label = _default_label(run)
        seen[label] += 1
        run.label = f"{label} #{seen[label]}" if counts[label] > 1 else label
        run.key = f"run{index}"
    return runs
