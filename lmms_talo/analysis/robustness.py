"""Robustness of the selection: redo the selection on bootstrap resamples of the probe docs and count
how often each layer (or no layer) would have been chosen."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lmms_talo.method.rules import SelectionRule
from lmms_talo.method.statistics import bootstrap_indices
from lmms_talo.outputs.report_reader import Subtask

NONE = "none"


@dataclass
class SelectionDistribution:
    subtask: str
    chosen: int | str  # the rule's choice on the actual probe docs (a layer, or "none")
    counts: Counter  # layer or "none" -> resamples that chose it
    resamples: int

    def share(self, choice) -> float:
        return self.counts.get(choice, 0) / self.resamples

    @property
    def win_rate(self) -> float:
        """How often the resamples agree with the choice made on the actual probe docs."""
        return self.share(self.chosen)


def _choice(outcome) -> int | str:
    return NONE if outcome.selected is None else outcome.selected


def selection_distribution(sub: Subtask, rule: SelectionRule, resamples: int, seed: int) -> SelectionDistribution:
    docs = sub.probe_docs
    counts: Counter = Counter()
    for positions in bootstrap_indices(len(docs), resamples, seed, f"robustness/{sub.name}"):
        counts[_choice(sub.decide(rule, [docs[i] for i in positions]))] += 1
    return SelectionDistribution(sub.name, _choice(sub.decide(rule)), counts, resamples)
