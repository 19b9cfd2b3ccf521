"""Agreement of interaction vectors over all task-layer pairs (the paper's Figure 4): between two
interventions on the same model and probe docs, and between probe gains and test gains.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.stats import pearsonr, spearmanr

from lmms_talo.outputs.report_reader import Run


@dataclass
class Agreement:
    x: np.ndarray
    y: np.ndarray
    layers: np.ndarray  # the layer of each point
    subtasks: list[str]  # the sub-task of each point

    @property
    def pearson(self) -> float:
        return _correlation(pearsonr, self.x, self.y)

    @property
    def spearman(self) -> float:
        return _correlation(spearmanr, self.x, self.y)


def _correlation(test, x, y) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(test(x, y)[0])


def _gain_on(records: dict, label: str, docs: list[str]) -> float:
    base, knocked = records["base"], records[label]
    return sum(knocked[d] for d in docs) / len(docs) - sum(base[d] for d in docs) / len(docs)


def intervention_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Runs on the same model and probe split that differ in their intervention."""
    return [
        (a, b)
        for a, b in combinations(runs, 2)
        if a.split_identity() == b.split_identity() and a.config.get("intervention") != b.config.get("intervention")
    ]


def between_runs(a: Run, b: Run) -> Agreement:
    """Probe gain under run a's intervention vs run b's, per (sub-task, layer), on the probe docs that
    both runs scored for the baseline and that layer (so both gains see the same docs)."""
    xs, ys, layers, names = [], [], [], []
    other = {s.name: s for s in b.subtasks}
    for sub in a.subtasks:
        if sub.name not in other:
            continue
        ra, rb = sub.data["probe_doc_scores"], other[sub.name].data["probe_doc_scores"]
        for layer in sorted(set(sub.data["candidate_layers"]) & set(other[sub.name].data["candidate_layers"])):
            label = str(layer)
            if label not in ra or label not in rb or "base" not in ra or "base" not in rb:
                continue
            docs = sorted(set(ra["base"]) & set(ra[label]) & set(rb["base"]) & set(rb[label]))
            if not docs:
                continue
            xs.append(_gain_on(ra, label, docs))
            ys.append(_gain_on(rb, label, docs))
            layers.append(layer)
            names.append(sub.name)
    return Agreement(np.array(xs), np.array(ys), np.array(layers), names)


def probe_vs_test(run: Run) -> Agreement:
    """Probe gain vs test gain per (sub-task, layer), where the run scored that layer on the test docs."""
    xs, ys, layers, names = [], [], [], []
    for sub in run.swept_subtasks():
        for layer, gain in sub.gains().items():
            test_gain = sub.test_gain(str(layer))
            if test_gain is None:
                continue
            xs.append(gain)
            ys.append(test_gain)
            layers.append(layer)
            names.append(sub.name)
    return Agreement(np.array(xs), np.array(ys), np.array(layers), names)
