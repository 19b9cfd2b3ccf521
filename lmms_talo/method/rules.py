"""Selection rules: how strong must a probe gain be before TaLo knocks a layer out?

`gain` is the paper's rule (`decide_round`): the best layer, l* = argmax_l g_l, if its mean probe
gain clears the threshold; ties go to the lowest layer. On 10-20 probe docs that rule often picks
noise, so two guarded rules also ask that the gain be unlikely to be chance:

  sign_test  exact one-sided sign test on the discordant probe docs (those whose score differs
             between the knockout and the reference).
  maxt       the max-statistic sign-flip test of the mean gains over the candidate layers.

Each test is family-wise over the round's candidate layers (sign_test by Holm, maxt by its max
statistic; a candidate that select or screen mode did not run counts as p = 1), so `select_alpha`
is a family-wise level: under the null, some layer passes in at most alpha of rounds. A layer must
clear the gain threshold and the test; among the layers that do, the highest gain wins and ties go
to the lowest layer.

select_stat=margin changes the statistic the guarded tests use in the probe rounds; the gains that
decide are always mean scores, and `confirm` always confirms on the scores: a margin can rise with
no more correct answers (a knockout that flattens every option's likelihood raises the gold margin
on every doc the model gets wrong), so it ranks, and accuracy confirms.

The rule is the only decider: the sweep (lmms_talo.method.sweep) asks it at the end of every probe round.
The rounds stop at the first round where some layer's gain clears the threshold (`cleared`, the
paper's redraw criterion), and a guarded rule then accepts or rejects that round's best layers. A
rejection never asks for more redraws, which would repeat the test until it passes.
Every statistic is a pure function of the per-doc scores and the seed, so the report's per-doc
records reproduce each rule's decision offline. Each rule is one class in the `RULES` registry; the
tests and their adjustment are lmms_talo.method.statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from lmms_talo.method.interventions import Knockout
from lmms_talo.method.statistics import (
    PairedValues,
    holm_adjusted,
    max_flip_p_values,
    paired_flip_p,
    paired_tests,
    sign_test_p,
)


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
    evidence: dict[int, float] = field(default_factory=dict)  # a guarded rule's statistic per layer
    cleared: bool = False  # some layer's gain cleared the threshold: the probe rounds stop here
    # Diagnostics beside the decision (not compared: two outcomes that decide alike are equal):
    p_values: dict[int, float] = field(default_factory=dict, compare=False)  # per layer: the paired test's one-sided p
    holm: dict[int, float] = field(
        default_factory=dict, compare=False
    )  # the same, Holm-adjusted over the candidate layers


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
        return RoundOutcome(tuple(probe_docs), baseline, layer_scores, gains, tied[0], reason, tied, cleared=True)
    reason = f"no layer gains more than the threshold {threshold:g} (best {best_gain:+.3f} at layer {tied[0]})"
    return RoundOutcome(tuple(probe_docs), baseline, layer_scores, gains, None, reason, tied)


class RuleError(ValueError):
    """A selection rule was configured with a bad value."""


STATS = {
    "score": "the per-doc score, pass/fail on most tasks",
    "margin": "the gold option's log-likelihood margin over the best wrong option, likelihood-scored tasks only",
}


@dataclass(frozen=True)
class SelectionRule:
    """The paper's rule (`gain`): the best layer, if its mean probe gain clears the threshold. A
    guarded rule is a subclass that also computes a per-layer statistic (`evidence`) and asks that it
    pass its test (`passes`); adding one is a subclass and a `@register` line."""

    name: ClassVar[str] = "gain"
    confirms: ClassVar[bool] = False  # True: the selection must also pass a test on confirmation docs
    threshold: float = 0.0
    alpha: float = 0.05
    resamples: int = 1000
    seed: int = 0
    stat: str = "score"  # the paired statistic of the tests (STATS); gains are always mean scores

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise RuleError(f"select_alpha must lie strictly between 0 and 1, got {self.alpha}")
        if self.resamples < 1:
            raise RuleError(f"select_resamples must be at least 1, got {self.resamples}")
        if self.stat not in STATS:
            raise RuleError(
                f"select_stat={self.stat!r} is unknown: use {' or '.join(f'{k} ({v})' for k, v in STATS.items())}"
            )

    @property
    def guarded(self) -> bool:
        return type(self).evidence is not SelectionRule.evidence

    def evidence(
        self,
        probe_docs: Sequence[Hashable],
        reference: Mapping[Hashable, float],
        layer_doc_scores: Mapping[int, Mapping[Hashable, float]],
        stream: str,
        family: int | None = None,
    ) -> dict[int, float]:
        """Per layer: the guarded rule's statistic (none for the gain rule); `family`: the number of
        candidate layers the round tests, when more than those given (select_alpha is family-wise)."""
        return {}

    def passes(self, statistic: float) -> bool:
        return True

    def describe(self, statistic: float) -> str:
        return ""

    def decide(
        self,
        probe_docs: Sequence[Hashable],
        reference: Mapping[Hashable, float],
        layer_doc_scores: Mapping[int, Mapping[Hashable, float]],
        stream: str = "",
        statistic: PairedValues | None = None,
        family: int | None = None,
    ) -> RoundOutcome:
        """The rule's decision on one probe set; `reference` is the model the knockouts compete with
        (the full model, or the layers already knocked out in a multi-layer search). `statistic`:
        (reference, per layer) values of the paired statistic when it is not the score (select_stat).
        `family`: the number of candidate layers when only some are in `layer_doc_scores` (select and
        screen modes), so that the Holm p-values are over every candidate."""
        outcome = decide_round(probe_docs, reference, layer_doc_scores, self.threshold)
        if not outcome.gains:
            return outcome
        paired = statistic or (reference, layer_doc_scores)
        outcome = dataclasses.replace(outcome, **paired_tests(probe_docs, *paired, self.seed, stream, family))
        if not self.guarded:
            return outcome
        evidence = self.evidence(probe_docs, *paired, stream, family)
        passing = {l: g for l, g in outcome.gains.items() if g > self.threshold and self.passes(evidence[l])}
        if not passing:
            best = outcome.tied_layers[0]
            reason = (
                f"{self.name}: no layer's gain is both above the threshold {self.threshold:g} and unlikely to be "
                f"chance (best gain {outcome.gains[best]:+.3f} at layer {best}, {self.describe(evidence[best])})"
            )
            return dataclasses.replace(outcome, selected=None, reason=reason, evidence=evidence)
        top = max(passing.values())
        tied = tuple(sorted(l for l, g in passing.items() if g == top))
        reason = f"{self.name}: layer {tied[0]} gains {top:+.3f} on the probe set, {self.describe(evidence[tied[0]])}"
        if len(tied) > 1:
            reason += f" (tied with layers {', '.join(map(str, tied[1:]))}; the lowest layer wins ties)"
        return dataclasses.replace(outcome, selected=tied[0], reason=reason, tied_layers=tied, evidence=evidence)


RULES: dict[str, type[SelectionRule]] = {}


def register(cls: type[SelectionRule]) -> type[SelectionRule]:
    """Class decorator: make a selection rule available as `select_rule=<cls.name>`."""
    RULES[cls.name] = cls
    return cls


def probe_only_rules() -> list[str]:
    """The rules that decide on the probe docs alone, which the offline analyses re-decide; a
    confirming rule also needs docs no probe round used, which a report holds only for the layer
    its own run confirmed."""
    return [name for name, rule in RULES.items() if not rule.confirms]


# Rules that no longer exist, and what to use instead.
REMOVED_RULES = {
    "bootstrap": (
        "select_rule=bootstrap was removed: the paired bootstrap does not hold its level on 8-20 probe docs, "
        "even Holm-adjusted over the candidate layers. Use select_rule=maxt (a family-wise sign-flip test) "
        "or sign_test"
    ),
}


def make_rule(name: str = "gain", **parameters) -> SelectionRule:
    """The rule registered as `name`, with threshold / alpha / resamples / seed."""
    if name in REMOVED_RULES:
        raise RuleError(REMOVED_RULES[name])
    if name not in RULES:
        raise RuleError(f"select_rule={name!r} is unknown: choose one of {', '.join(RULES)}")
    return RULES[name](**parameters)


register(SelectionRule)


@register
class SignTest(SelectionRule):
    """Exact one-sided sign test on the discordant probe docs, Holm-adjusted over the round's candidate
    layers: adjusted p < alpha (alpha is the family-wise level)."""

    name: ClassVar[str] = "sign_test"

    def evidence(self, probe_docs, reference, layer_doc_scores, stream, family=None):
        ref = [reference[d] for d in probe_docs]
        raw = {l: sign_test_p(ref, [s[d] for d in probe_docs]) for l, s in layer_doc_scores.items()}
        return holm_adjusted(raw, family)

    def passes(self, statistic):
        return statistic < self.alpha

    def describe(self, statistic):
        return f"sign test p={statistic:.3g} Holm-adjusted over the candidate layers (family-wise alpha {self.alpha:g})"


@register
class MaxT(SelectionRule):
    """The max-statistic sign-flip test (Westfall and Young's maxT) of the mean paired differences over
    the round's candidate layers: family-wise adjusted p < alpha. Flipping each doc's differences
    together keeps the layers' dependence (they share the docs and the reference), which Holm ignores.
    When the round ran only some candidates (screen mode), it falls back to each layer's exact flip
    test, Holm-adjusted over every candidate."""

    name: ClassVar[str] = "maxt"

    def evidence(self, probe_docs, reference, layer_doc_scores, stream, family=None):
        ref = np.array([reference[d] for d in probe_docs], dtype=float)
        differences = np.array([[s[d] for d in probe_docs] for s in layer_doc_scores.values()], dtype=float) - ref
        differences -= self.bar
        if family is not None and family > len(layer_doc_scores):
            raw = {
                layer: paired_flip_p(np.zeros(len(row)), row, self.seed, f"{stream}/{layer}")
                for layer, row in zip(layer_doc_scores, differences)
            }
            return holm_adjusted(raw, family)
        adjusted = max_flip_p_values(differences, self.seed, stream, self.resamples)
        return {layer: float(p) for layer, p in zip(layer_doc_scores, adjusted)}

    @property
    def bar(self) -> float:
        """The mean gain must exceed the gain threshold; a margin is in other units: it must exceed 0."""
        return self.threshold if self.stat == "score" else 0.0

    def passes(self, statistic):
        return statistic < self.alpha

    def describe(self, statistic):
        return (
            f"maxT sign-flip p={statistic:.3g} that the {self.stat} difference exceeds {self.bar:g}, "
            f"family-wise over the candidate layers (alpha {self.alpha:g})"
        )


@dataclass(frozen=True)
class Confirmation:
    """The confirmation test of one selected knockout on docs no probe round used."""

    layers: tuple[int, ...]
    docs: tuple  # the confirmation units; () when none were left
    stat: str  # the paired statistic tested (STATS)
    reference: dict  # doc -> the statistic under the full model
    knocked: dict  # doc -> the statistic under the knockout
    reference_scores: dict  # doc -> score under the full model
    knocked_scores: dict  # doc -> score under the knockout
    p_value: float | None  # one-sided paired test (paired_flip_p); None without docs
    alpha: float
    kept: bool
    reason: str
    docs_computed: int = 0  # passes the confirmation ran (two per doc, less those the store held)
    docs_reused: int = 0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(layers=list(self.layers), docs=[str(d) for d in self.docs])
        for key in ("reference", "knocked", "reference_scores", "knocked_scores"):
            data[key] = {str(d): v for d, v in data[key].items()}
        data["reference_score"] = mean(list(self.reference_scores.values())) if self.docs else None
        data["knocked_score"] = mean(list(self.knocked_scores.values())) if self.docs else None
        return data


@register
@dataclass(frozen=True)
class Confirm(SelectionRule):
    """The base rule (`base_rule`, default gain) decides the probe rounds exactly as it does alone;
    its selection is kept only if one pre-specified one-sided paired test (paired_flip_p) of the
    per-doc scores on confirmation docs, pool units no probe round used, gives p < alpha."""

    name: ClassVar[str] = "confirm"
    confirms: ClassVar[bool] = True
    base_rule: str = "gain"

    def __post_init__(self):
        super().__post_init__()
        if self.base_rule not in RULES or RULES[self.base_rule].confirms:
            choices = ", ".join(n for n, r in RULES.items() if not r.confirms)
            raise RuleError(
                f"select_base_rule={self.base_rule!r} cannot decide the probe rounds of select_rule=confirm: "
                f"choose one of {choices}"
            )

    @property
    def base(self) -> SelectionRule:
        parameters = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base_rule"}
        return make_rule(self.base_rule, **parameters)

    @property
    def guarded(self) -> bool:
        return self.base.guarded

    def decide(self, probe_docs, reference, layer_doc_scores, stream="", statistic=None, family=None) -> RoundOutcome:
        return self.base.decide(probe_docs, reference, layer_doc_scores, stream, statistic, family)

    def confirm(self, layers, docs, scores: PairedValues, stream: str = "") -> Confirmation:
        """Test `layers` on the confirmation `docs`: `scores` = (full model, knockout) per-doc scores.
        The test is on the scores whatever select_stat is: it is evidence of more correct answers."""
        ref_scores, knocked_scores = scores
        docs = tuple(docs)
        label = Knockout(tuple(layers)).label
        if not docs:
            reason = (
                f"confirm: layer {label} dropped: no pool unit is left unprobed to confirm it on "
                "(raise the pool: more docs, or fewer redraws)"
            )
            return Confirmation(tuple(layers), (), "score", {}, {}, {}, {}, None, self.alpha, False, reason)
        p = paired_flip_p(
            [ref_scores[d] for d in docs], [knocked_scores[d] for d in docs], self.seed, f"{stream}/confirm/{label}"
        )
        kept = p < self.alpha
        difference = mean([knocked_scores[d] for d in docs]) - mean([ref_scores[d] for d in docs])
        reason = (
            f"confirm: layer {label} {'kept' if kept else 'dropped'}: on {len(docs)} confirmation docs its score "
            f"differs by {difference:+.3f}, one-sided paired test on the score p={p:.3g} "
            f"({'<' if kept else '>='} alpha {self.alpha:g})"
        )
        ref, knocked = ref_scores, knocked_scores
        pick = lambda values: {d: values[d] for d in docs}
        return Confirmation(
            tuple(layers),
            docs,
            "score",
            pick(ref),
            pick(knocked),
            pick(ref_scores),
            pick(knocked_scores),
            p,
            self.alpha,
            kept,
            reason,
        )
