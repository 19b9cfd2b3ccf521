"""The analysis report of one or more TaLo runs: report.md, a self-contained report.html, the PNG
figures, and analysis.json with every number shown (all recomputed from the reports' per-doc records)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmms_talo.analysis import figures
from lmms_talo.analysis.agreement import between_runs, intervention_pairs, probe_vs_test
from lmms_talo.analysis.clustering import bootstrap_stability, cluster
from lmms_talo.analysis.document import Document
from lmms_talo.analysis.robustness import selection_distribution
from lmms_talo.analysis.rule_comparison import rule_choices, summarize
from lmms_talo.analysis.tables import paper_table
from lmms_talo.analysis.transfer import transfer_matrix
from lmms_talo.method.rules import probe_only_rules
from lmms_talo.outputs.report_reader import Run, doc_mean, label_of, load_runs


@dataclass(frozen=True)
class AnalysisOptions:
    clusters: int = 3  # flat clusters cut from the dendrogram
    resamples: int = 200  # bootstrap resamples of the probe docs (cluster stability, selection robustness)
    seed: int = 0


def missing(value) -> bool:
    """No value, or an undefined statistic (NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(value: float | None) -> str:
    return "-" if missing(value) else f"{100 * value:.1f}"


def pp(value: float | None) -> str:
    return "-" if missing(value) else f"{100 * value:+.1f}"


def num(value: float | None, spec: str = ".3f") -> str:
    return "-" if missing(value) else format(value, spec)


def mean_of(values: list) -> float | None:
    """The mean, or None when a value is missing (a partial mean would compare unlike things)."""
    return None if not values or any(missing(v) for v in values) else sum(values) / len(values)


def nanmean_of(values: list) -> float | None:
    """The mean of the values that are there."""
    present = [v for v in values if not missing(v)]
    return sum(present) / len(present) if present else None


class AnalysisBuilder:
    def __init__(self, runs: list[Run], out: Path, options: AnalysisOptions):
        self.runs = runs
        self.out = out
        self.options = options
        self.doc = Document("TaLo analysis")
        self.numbers: dict = {"runs": {}, "agreement": []}

    def figure(self, name: str, caption: str, draw, *args) -> None:
        """Draw a figure (a function of lmms_talo.analysis.figures, whose last argument is the path)."""
        self.doc.figure(draw(*args, self.out / f"{name}.png"), caption)

    def build(self) -> None:
        self.overview()
        for run in self.runs:
            self.numbers["runs"][run.key] = {"label": run.label, "path": str(run.path)}
            self.doc.heading(f"{run.key}: {run.label}", 2)
            self.results(run)
            self.heatmap(run)
            self.clusters(run)
            self.robustness(run)
            self.multi_layer(run)
            self.transfer(run)
            self.rules(run)
        self.agreement()

    # --- sections ---

    def overview(self) -> None:
        self.doc.paragraph(
            "Scores are accuracies in % on each sub-task's test docs (the docs outside its probe pool); "
            "differences are in percentage points (pp). Every statistic below is recomputed from the per-doc "
            "records in the reports, without the model."
        )
        rows = []
        for run in self.runs:
            subs = run.subtasks
            base = [s.test_score("base") for s in subs]
            talo = [doc_mean(s.data.get("test", {}).get("talo")) for s in subs]
            difference = None if missing(mean_of(base)) or missing(mean_of(talo)) else mean_of(talo) - mean_of(base)
            rows.append(
                [
                    run.key,
                    run.label,
                    str(run.path),
                    str(len(subs)),
                    str(sum(1 for s in subs if s.selected_label != "base")),
                    pct(mean_of(base)),
                    pct(mean_of(talo)),
                    pp(difference),
                    str(sum(s.sweep_passes() for s in subs)),
                ]
            )
        self.doc.table(
            [
                "run",
                "model · intervention · shots",
                "report",
                "sub-tasks",
                "knocked out",
                "base (mean)",
                "TaLo (mean)",
                "Δ pp",
                "sweep passes",
            ],
            rows,
        )

    def results(self, run: Run) -> None:
        self.doc.heading("Results on the test docs", 3)
        rows, numbers = [], []
        for row in paper_table(run):
            rows.append([row.subtask, str(row.n), pct(row.base), pct(row.talo), pp(row.difference), row.layers])
            numbers.append(asdict(row) | {"difference": row.difference})
        self.doc.table(["sub-task", "test docs", "base %", "TaLo %", "Δ pp", "layer(s)"], rows)
        if any(s.test_score("base") is None for s in run.subtasks):
            self.doc.paragraph("Base scores missing: " + _why_unscored(run, "compare_base"))
        self.numbers["runs"][run.key]["table"] = numbers

    def heatmap(self, run: Run) -> None:
        self.doc.heading("Task-layer interaction vectors", 3)
        layers = sorted({l for s in run.subtasks for l in s.data.get("candidate_layers", [])})
        gains = np.full((len(run.subtasks), len(layers)), np.nan)
        selected, drift = [], 0.0
        for row, sub in enumerate(run.subtasks):
            recomputed = sub.gains() if sub.swept else {}
            for layer, gain in recomputed.items():
                gains[row, layers.index(layer)] = gain
                drift = max(drift, abs(gain - sub.data["interaction_vector"][str(layer)]))
            first = sub.data.get("selected_layer")
            selected.append(layers.index(first) if first in layers else None)
        self.figure(
            f"{run.key}_interaction_heatmap",
            f"Probe gain of the {run.config.get('intervention', 'zero')} knockout of each layer ({run.label}); "
            "black box: the selected layer.",
            figures.interaction_heatmap,
            gains,
            [s.name for s in run.subtasks],
            layers,
            selected,
            run.label,
        )
        unswept = [s.name for s in run.subtasks if not s.swept]
        text = f"Recomputed from the per-doc probe records: largest difference from the stored vectors {drift:.1e}."
        if unswept:
            text += f" Not swept (baseline already perfect on the probe set): {', '.join(unswept)}."
        self.doc.paragraph(text)
        self.numbers["runs"][run.key]["interaction_vectors"] = {
            s.name: {str(l): g for l, g in zip(layers, gains[i]) if not missing(float(g))}
            for i, s in enumerate(run.subtasks)
        }

    def _clusterable(self, run: Run) -> list:
        swept = run.swept_subtasks()
        common = swept[0].layers if swept else []
        return [s for s in swept if s.layers == common and np.ptp(s.differences().mean(axis=1)) > 0]

    def clusters(self, run: Run) -> None:
        self.doc.heading("Clusters of interaction vectors", 3)
        subs = self._clusterable(run)
        left_out = [s.name for s in run.subtasks if s not in subs]
        if len(subs) < 3:
            self.doc.paragraph(
                f"Not enough sub-tasks to cluster: {len(subs)} have a non-constant interaction vector over the same "
                "layers (3 are needed)."
            )
            return
        count = min(self.options.clusters, len(subs) - 1)
        differences = [s.differences() for s in subs]
        result = cluster([s.name for s in subs], np.stack([d.mean(axis=1) for d in differences]), count)
        stability = bootstrap_stability(differences, result, self.options.resamples, self.options.seed)
        self.figure(
            f"{run.key}_correlation",
            f"Pearson correlation between interaction vectors, dendrogram-ordered, {count} clusters ({run.label}).",
            figures.correlation_dendrogram,
            result,
            run.label,
        )
        self.figure(
            f"{run.key}_cluster_stability",
            "Cluster stability over bootstrap resamples of each sub-task's probe docs.",
            figures.cluster_stability,
            result,
            stability,
            run.label,
        )
        summary = stability.summary()
        rows = []
        for label, members in result.members().items():
            index = [result.names.index(m) for m in members]
            pairs = [(i, j) for i in index for j in index if i < j]
            cohesion = np.mean([stability.co_clustered[i, j] for i, j in pairs]) if pairs else None
            rows.append([f"c{label}", ", ".join(members), num(cohesion, ".2f")])
        self.doc.table(["cluster", "sub-tasks (dendrogram order)", "pairs kept together"], rows)
        self.doc.paragraph(
            f"Adjusted Rand index between the clusters of {summary['resamples']} bootstrap resamples and the clusters "
            f"above: mean {summary['mean']:.3f} (sd {summary['sd']:.3f}), median {summary['median']:.3f}, "
            f"5-95% range {summary['p05']:.3f} to {summary['p95']:.3f}. 1 means the same partition every time; "
            "about 0 means no more agreement than chance."
            + (f" Left out (constant vector or not swept): {', '.join(left_out)}." if left_out else "")
        )
        self.numbers["runs"][run.key]["clusters"] = {
            "count": count,
            "members": {f"c{k}": v for k, v in result.members().items()},
            "ari": summary,
            "correlation": {a: dict(zip(result.names, map(float, result.corr[i]))) for i, a in enumerate(result.names)},
        }

    def robustness(self, run: Run) -> None:
        self.doc.heading("Robustness of the selection", 3)
        subs = run.swept_subtasks()
        if not subs:
            self.doc.paragraph("No sub-task was swept.")
            return
        resamples = self.options.resamples
        by_rule = {
            name: [selection_distribution(s, run.rule(name), resamples, self.options.seed) for s in subs]
            for name in probe_only_rules()
        }
        own = run.probe_rule_name
        layers = sorted({l for s in subs for l in s.layers})
        self.figure(
            f"{run.key}_selection_robustness",
            f"How often each layer wins when the probe docs are resampled ({own} rule); "
            "red box: the choice on the actual probe docs.",
            figures.selection_robustness,
            by_rule[own],
            layers,
            f"{run.label}\nlayer chosen by the {own} rule on {resamples} bootstrap resamples of the probe docs",
        )
        rows = [
            [s.name] + [f"{d.chosen} ({d.win_rate:.0%})" for d in (by_rule[n][i] for n in probe_only_rules())]
            for i, s in enumerate(subs)
        ]
        self.doc.table(["sub-task"] + [f"{n}: choice (resamples agreeing)" for n in probe_only_rules()], rows)
        self.doc.paragraph(
            "Each rule's choice on the final probe set, and the share of bootstrap resamples of those probe docs on "
            "which the same rule makes the same choice ('none' keeps the full model)."
        )
        self.numbers["runs"][run.key]["robustness"] = {
            n: {
                d.subtask: {
                    "chosen": d.chosen,
                    "win_rate": d.win_rate,
                    "counts": {str(k): v for k, v in d.counts.items()},
                }
                for d in by_rule[n]
            }
            for n in probe_only_rules()
        }

    def multi_layer(self, run: Run) -> None:
        subs = [s for s in run.subtasks if s.data.get("layer_stages")]
        if not subs:
            return
        self.doc.heading("Multi-layer search", 3)
        rows = []
        for sub in subs:
            for stage in sub.data["layer_stages"]:
                best = stage["tied_layers"][0] if stage["tied_layers"] else None
                rows.append(
                    [
                        sub.name,
                        label_of(stage["base_layers"]),
                        num(stage["reference_score"]),
                        "-" if best is None else label_of(stage["base_layers"] + [best]),
                        "-" if best is None else num(stage["layer_scores"][str(best)]),
                        "-" if best is None else pp(stage["gains"][str(best)]),
                        "yes" if stage["selected"] is not None else "no",
                        str(stage["passes"]),
                        str(sub.sweep_passes()),
                        sub.selected_label,
                    ]
                )
        self.doc.table(
            [
                "sub-task",
                "layers",
                "probe score",
                "best addition",
                "probe score",
                "gain pp",
                "kept",
                "passes (this step)",
                "passes (single-layer sweep)",
                "final knockout",
            ],
            rows,
        )
        self.doc.paragraph(
            "A step adds the best further layer when it beats the layers already chosen by more than the "
            "threshold under the run's selection rule; each pass is one variant over the probe docs."
        )

    def transfer(self, run: Run) -> None:
        self.doc.heading("Cross-task transfer", 3)
        matrix = transfer_matrix(run)
        if not matrix.sources or np.isnan(matrix.gains).all():
            self.doc.paragraph("Not computed: " + _why_unscored(run, "transfer"))
            return
        self.figure(
            f"{run.key}_transfer",
            "Test gain (knocked out − full model) of applying the row's selected layer to the column's sub-task.",
            figures.transfer_heatmap,
            matrix,
            run.label,
        )
        own = [float(matrix.gains[i, matrix.targets.index(s)]) for i, s in enumerate(matrix.sources)]
        others = [
            float(matrix.gains[i, j])
            for i, s in enumerate(matrix.sources)
            for j, t in enumerate(matrix.targets)
            if t != s
        ]
        rows = [
            [f"{s} (layer {l})"] + [pp(g) for g in matrix.gains[i]]
            for i, (s, l) in enumerate(zip(matrix.sources, matrix.source_labels))
        ]
        self.doc.table(["selected on \\ applied to"] + matrix.targets, rows)
        text = (
            f"Mean test gain of a sub-task's own selection {pp(nanmean_of(own))} pp; of another sub-task's selection "
            + (f"{pp(nanmean_of(others))} pp." if nanmean_of(others) is not None else "not scored.")
        )
        if matrix.unselected:
            text += f" Kept the full model (no row): {', '.join(matrix.unselected)}."
        if np.isnan(matrix.gains).any():
            text += " Cells marked - were not scored: " + _why_unscored(run, "transfer")
        self.doc.paragraph(text)
        self.numbers["runs"][run.key]["transfer"] = {
            "sources": matrix.sources,
            "layers": matrix.source_labels,
            "targets": matrix.targets,
            "gains": matrix.gains.tolist(),
            "mean_own": nanmean_of(own),
            "mean_other": nanmean_of(others),
        }

    def rules(self, run: Run) -> None:
        self.doc.heading("Selection rules on the test docs", 3)
        choices = rule_choices(run)
        if not choices:
            self.doc.paragraph("No sub-task was swept.")
            return
        summaries = summarize(choices)
        self.doc.table(
            [
                "rule",
                "sub-tasks",
                "knocked out",
                "helped",
                "hurt",
                "unchanged",
                "not scored on test",
                "mean test gain pp",
            ],
            [
                [
                    s.rule,
                    str(s.subtasks),
                    str(s.knocked_out),
                    str(s.helped),
                    str(s.hurt),
                    str(s.unchanged),
                    str(s.unknown),
                    pp(s.mean_test_gain),
                ]
                for s in summaries
            ],
        )
        rule = run.rule()
        self.doc.paragraph(
            f"Each rule decides offline on the final probe set of every sub-task (threshold {rule.threshold:g}, "
            f"alpha {rule.alpha:g}, {rule.resamples} bootstrap resamples, seed {rule.seed}); "
            "its choice is then looked up in the test scores. Keeping the full model counts as a gain of 0. "
            "'Not scored' needs `test_all_layers=true`. "
            "A confirming rule (select_rule=confirm) is not re-decided offline: it needs docs no probe round used; a "
            "run of it records its own confirmation."
        )
        per_sub: dict[str, dict] = {}
        for c in choices:
            per_sub.setdefault(c.subtask, {})[c.rule] = c
        rows = []
        for name, by_rule in per_sub.items():
            rows.append(
                [name]
                + [
                    "none" if c.layer is None else f"{c.layer} (probe {pp(c.probe_gain)}, test {pp(c.test_gain)})"
                    for c in (by_rule[r] for r in probe_only_rules())
                ]
            )
        self.doc.table(["sub-task"] + probe_only_rules(), rows)
        scatter = probe_vs_test(run)
        if self._all_layers_scored(run) and len(scatter.x) >= 3:
            self.figure(
                f"{run.key}_probe_vs_test",
                "Does the probe gain predict the test gain? One point per (sub-task, layer) scored on the test docs "
                "(coinciding pairs share a marker, labelled with their number).",
                figures.agreement_scatter,
                scatter,
                "probe gain",
                "test gain",
                f"{run.label}\nprobe gain vs test gain",
            )
            self.doc.paragraph(
                f"Probe vs test gain over {len(scatter.x)} task-layer pairs: Pearson r {num(scatter.pearson)}, "
                f"Spearman ρ {num(scatter.spearman)}."
            )
        self.numbers["runs"][run.key]["rules"] = {
            "summary": [asdict(s) for s in summaries],
            "choices": [asdict(c) for c in choices],
            "probe_vs_test": {"n": len(scatter.x), "pearson": scatter.pearson, "spearman": scatter.spearman},
        }

    @staticmethod
    def _all_layers_scored(run: Run) -> bool:
        """Probe vs test gain over every layer, not only the layers some selection picked (a biased sample)."""
        return all(str(l) in s.data.get("test_variants", {}) for s in run.swept_subtasks() for l in s.layers)

    def agreement(self) -> None:
        pairs = intervention_pairs(self.runs)
        if not pairs:
            return
        self.doc.heading("Agreement between interventions", 2)
        for a, b in pairs:
            result = between_runs(a, b)
            ia, ib = a.config.get("intervention"), b.config.get("intervention")
            if len(result.x) < 3:
                self.doc.paragraph(
                    f"{a.key} ({ia}) and {b.key} ({ib}) share fewer than 3 task-layer pairs: no comparison."
                )
                continue
            self.figure(
                f"agreement_{a.key}_{b.key}",
                f"Probe gain of every task-layer pair under {ia} ({a.key}) and {ib} ({b.key}), on the same probe docs "
                "(coinciding pairs share a marker, labelled with their number).",
                figures.agreement_scatter,
                result,
                f"probe gain, {ia} ({a.key})",
                f"probe gain, {ib} ({b.key})",
                f"{a.model_name}: {ia} vs {ib} knockout",
            )
            self.doc.paragraph(
                f"{ia} vs {ib}: Pearson r {num(result.pearson)}, Spearman ρ {num(result.spearman)} "
                f"over {len(result.x)} task-layer pairs."
            )
            self.numbers["agreement"].append(
                {
                    "runs": [a.key, b.key],
                    "interventions": [ia, ib],
                    "n": len(result.x),
                    "pearson": result.pearson,
                    "spearman": result.spearman,
                }
            )


def write_analysis(paths: list, out: Path, options: AnalysisOptions = AnalysisOptions()) -> Path:
    """Analyse the TaLo reports at `paths` into the folder `out`; returns the Markdown file."""
    runs = load_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_figures(out)
    builder = AnalysisBuilder(runs, out, options)
    builder.build()
    builder.numbers["figures"] = [block[1].name for block in builder.doc.blocks if block[0] == "figure"]
    (out / "report.md").write_text(builder.doc.to_markdown())
    (out / "report.html").write_text(builder.doc.to_html())
    (out / "analysis.json").write_text(json.dumps(_plain(builder.numbers), indent=2, allow_nan=False))
    return out / "report.md"


def _remove_previous_figures(out: Path) -> None:
    """Figures an earlier report wrote into `out` (listed in its analysis.json), so that none is left
    stale beside the new report; nothing else in the folder is touched."""
    try:
        listed = json.loads((out / "analysis.json").read_text()).get("figures", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in listed:
        path = out / Path(str(name)).name
        if path.suffix == ".png" and path.is_file():
            path.unlink()


def _plain(value):
    """JSON-ready: numpy scalars as Python numbers, NaN (an undefined statistic) as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if missing(value) else value


def _why_unscored(run: Run, arg: str) -> str:
    """Why test scores a section needs are missing, and what would give them: never advice to use
    an arg the run already used."""
    if run.from_probe_log:
        return "a probe log holds the probe passes only, no test scores; analyze the run's talo_report.json for them."
    if arg == "transfer" and run.config.get("transfer"):
        return (
            "the run had `transfer=true`, and transfer stays within one request type: the harness answers "
            "generation and likelihood tasks in separate calls, so a selection is applied to the sub-tasks of "
            "its own request type only."
        )
    if run.config.get(arg):
        return f"the run had `{arg}=true`; the task's metric gave no score for these docs (e.g. a judge metric)."
    if arg == "transfer":
        return (
            "run TaLo with `transfer=true` (or `test_all_layers=true`) to score each sub-task's test docs "
            "under the other sub-tasks' selected layers."
        )
    return "run TaLo with `compare_base=true` to score the full model on the test docs."
