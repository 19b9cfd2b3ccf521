"""Multi-layer search: knock out a second layer on top of the selected one when that helps more.

After the single-layer selection l1, each remaining candidate l2 is probed as the pair (l1, l2) on
the same probe docs, and the selection rule compares the pairs with l1 alone: the pair is kept only
when it beats the single layer by more than the threshold (and, for a guarded rule, when the gain is
unlikely to be chance). With max_layers > 2 the search goes on greedily from the chosen pair. Each
stage costs one pass over the probe docs per remaining candidate; the reference (the layers already
chosen) is read back from the probe store, not recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmms_talo.method.interventions import Knockout
from lmms_talo.method.rules import RoundOutcome
from lmms_talo.method.sweep import LayerSweep, SweepResult


@dataclass(frozen=True)
class LayerStage:
    """One greedy step: which layer, if any, to add to `base_layers`."""

    base_layers: tuple[int, ...]
    outcome: RoundOutcome  # baseline = the base_layers' probe score; gains = over base_layers
    passes: int  # variants swept, each one pass over the probe docs
    docs_computed: int
    docs_reused: int
    seconds: float
    doc_scores: dict  # variant label -> {doc: score} of the variants this stage probed

    def to_dict(self) -> dict:
        o = self.outcome
        return {
            "base_layers": list(self.base_layers),
            "probe_docs": list(o.probe_docs),
            "reference_score": o.baseline,
            "layer_scores": {str(k): v for k, v in o.layer_scores.items()},
            "gains": {str(k): v for k, v in o.gains.items()},
            "evidence": {str(k): v for k, v in o.evidence.items()},
            "selected": o.selected,
            "tied_layers": list(o.tied_layers),
            "reason": o.reason,
            "passes": self.passes,
            "docs_computed": self.docs_computed,
            "docs_reused": self.docs_reused,
            "seconds": self.seconds,
        }


def with_layer(layers: tuple[int, ...], layer: int) -> tuple[int, ...]:
    """Layer sets are kept sorted, so a pair has one label ('3+7') whichever layer came first."""
    return tuple(sorted(layers + (layer,)))


def search_more_layers(
    sweep: LayerSweep,
    result: SweepResult,
    intervention: str,
    max_layers: int,
    stream: str,
) -> tuple[tuple[int, ...], list[LayerStage]]:
    """Grow the sweep's selection greedily up to `max_layers` layers, each stage decided by the
    sweep's own rule. Returns (the layers to knock out, the stages, each with its per-doc scores);
    `result` is read, never changed."""
    if result.selected is None:
        return (), []
    layers: tuple[int, ...] = (result.selected,)
    probe = list(result.final.probe_docs)
    stages: list[LayerStage] = []
    while len(layers) < max_layers:
        remaining = [l for l in result.candidate_layers if l not in layers]
        if not remaining:
            break
        started = time.perf_counter()
        cost = SweepResult(tuple(remaining), [])
        current = Knockout(layers, intervention)
        grown = {l: Knockout(with_layer(layers, l), intervention) for l in remaining}
        reference = sweep.doc_scores(current, probe, cost)
        added = {l: sweep.doc_scores(knockout, probe, cost) for l, knockout in grown.items()}
        statistic = sweep.paired_statistic(current.label, {l: k.label for l, k in grown.items()}, probe, cost)
        outcome = sweep.rule.decide(probe, reference, added, stream=f"{stream}/{current.label}", statistic=statistic)
        stages.append(
            LayerStage(
                layers,
                outcome,
                len(remaining),
                cost.docs_computed,
                cost.docs_reused,
                time.perf_counter() - started,
                cost.doc_scores,
            )
        )
        if outcome.selected is None:
            break
        layers = with_layer(layers, outcome.selected)
    return layers, stages
