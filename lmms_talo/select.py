"""The TaLo selection rule: the layer whose knockout raises the probe score most, if it helps at all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence


@dataclass(frozen=True)
class RoundOutcome:
    """The decision of one probe round."""

    probe_docs: tuple
    baseline: float
    layer_scores: dict[int, float]  # mean probe score per candidate layer (empty when not swept)
    gains: dict[int, float]  # the Task-Layer Interaction Vector: layer score - baseline
    selected: int | None
    reason: str
    tied_layers: tuple[int, ...] = field(default=())
    evidence: dict[int, float] = field(default_factory=dict)  # a guarded rule's statistic per layer (lmms_talo.rules)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def baseline_is_perfect(baseline: float) -> bool:
    return baseline >= 1.0


def decide_round(
    probe_docs: Sequence[Hashable],
    base_scores: Mapping[Hashable, float],
    layer_doc_scores: Mapping[int, Mapping[Hashable, float]],
    threshold: float,
) -> RoundOutcome:
    """Apply `l* = argmax_l g_l if g_l* > threshold`; ties go to the lowest layer."""
    baseline = mean([base_scores[d] for d in probe_docs])
    if not layer_doc_scores:
        return RoundOutcome(tuple(probe_docs), baseline, {}, {}, None, "baseline already perfect on the probe set")
    layer_scores = {layer: mean([scores[d] for d in probe_docs]) for layer, scores in layer_doc_scores.items()}
    gains = {layer: score - baseline for layer, score in layer_scores.items()}
    best_gain = max(gains.values())
    tied = tuple(sorted(layer for layer, gain in gains.items() if gain == best_gain))
    if best_gain > threshold:
        reason = f"layer {tied[0]} gains {best_gain:+.3f} on the probe set"
        if len(tied) > 1:
            reason += f" (tied with layers {', '.join(map(str, tied[1:]))}; the lowest layer wins ties)"
        return RoundOutcome(tuple(probe_docs), baseline, layer_scores, gains, tied[0], reason, tied)
    reason = f"no layer gains more than the threshold {threshold:g} (best {best_gain:+.3f} at layer {tied[0]})"
    return RoundOutcome(tuple(probe_docs), baseline, layer_scores, gains, None, reason, tied)
