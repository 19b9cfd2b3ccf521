"""The layer sweep of one sub-task: baseline + one pass per candidate layer over the probe set,
with redraws of the probe set when no layer helps, and every per-doc result persisted as it lands.

The sweep is written against two callables, so that any harness (lmms-eval, lm-eval) can drive it:
  answer(knockout, docs) -> {doc: [responses]}   runs the model on those docs' requests
  score(doc, responses)  -> float in [0, 1]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

from .interventions import Knockout
from .probe import ProbeSplit
from .select import RoundOutcome, baseline_is_perfect, decide_round
from .store import ProbeStore

Answer = Callable[[Knockout | None, Sequence[Hashable]], dict]
Score = Callable[[Hashable, list], float]


@dataclass
class SweepResult:
    candidate_layers: tuple[int, ...]
    rounds: list[RoundOutcome]
    doc_scores: dict[str, dict] = field(default_factory=dict)  # variant label -> {doc: score}
    docs_computed: int = 0  # (variant, doc) pairs run on the model in this process
    docs_reused: int = 0  # pairs read back from the store
    seconds: float = 0.0

    @property
    def final(self) -> RoundOutcome:
        return self.rounds[-1]

    @property
    def selected(self) -> int | None:
        return self.final.selected


class LayerSweep:
    """Runs variants over probe docs through a ProbeStore, so nothing is computed twice."""

    def __init__(self, answer: Answer, score: Score, store: ProbeStore):
        self.answer = answer
        self.score = score
        self.store = store
        self.responses: dict[tuple[str, str], list] = {}

    def doc_scores(self, knockout: Knockout | None, docs: Sequence[Hashable], result: SweepResult) -> dict:
        label = knockout.label if knockout else "base"
        scores: dict = {}
        missing = []
        for doc in docs:
            hit = self.store.get(label, doc)
            if hit is None:
                missing.append(doc)
                continue
            scores[doc], self.responses[(label, str(doc))] = hit
            result.docs_reused += 1
        if missing:
            for doc, responses in self.answer(knockout, missing).items():
                value = self.score(doc, responses)
                self.store.put(label, doc, value, responses)
                self.responses[(label, str(doc))] = responses
                scores[doc] = value
                result.docs_computed += 1
        result.doc_scores.setdefault(label, {}).update({str(d): s for d, s in scores.items()})
        return scores

    def run(
        self,
        split: ProbeSplit,
        candidate_layers: Sequence[int],
        intervention: str,
        threshold: float,
        rounds: int,
    ) -> SweepResult:
        """Probe rounds until a layer clears the threshold or the rounds run out."""
        started = time.perf_counter()
        result = SweepResult(tuple(candidate_layers), [])
        for round_index in range(rounds):
            probe = split.probe_set(round_index)
            base = self.doc_scores(None, probe, result)
            layer_scores = {}
            if not (baseline_is_perfect(sum(base.values()) / len(base)) and threshold >= 0):
                for layer in candidate_layers:
                    layer_scores[layer] = self.doc_scores(Knockout((layer,), intervention), probe, result)
            outcome = decide_round(probe, base, layer_scores, threshold)
            result.rounds.append(outcome)
            if outcome.selected is not None:
                break
        result.seconds = time.perf_counter() - started
        return result
