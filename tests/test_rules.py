"""The selection rules (lmms_talo.method.rules) on hand-built per-doc score tables with known answers."""

from __future__ import annotations

import pytest

from lmms_talo.method.config import TaloConfig
from lmms_talo.method.rules import bootstrap_indices, make_rule, sign_test_p
from lmms_talo.method.rules import decide_round
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.outputs.probe_store import ProbeStore
from lmms_talo.method.sweep import LayerSweep

DOCS = [str(d) for d in range(20)]


def scores_changing(better: int, worse: int) -> tuple[dict, dict]:
    """Base right on docs 10..19; the knockout turns `better` wrong docs right and `worse` right docs wrong."""
    base = {d: float(int(d) >= 10) for d in DOCS}
    knocked = dict(base)
    for d in range(better):
        knocked[str(d)] = 1.0
    for d in range(10, 10 + worse):
        knocked[str(d)] = 0.0
    return base, knocked


BASE, LAYER_A = scores_changing(9, 3)  # gain +0.30, 12 discordant docs, 9 for the knockout
_, LAYER_B = scores_changing(5, 0)  # gain +0.25, 5 discordant docs, all for the knockout
_, LAYER_C = scores_changing(1, 1)  # gain 0
LAYERS = {1: LAYER_C, 2: LAYER_A, 3: LAYER_B}


def test_sign_test_p_values_are_exact_binomial_tails():
    assert sign_test_p([0] * 5, [1] * 5) == 1 / 32
    assert sign_test_p([0, 0, 0, 0, 1], [1, 1, 1, 1, 0]) == 5 / 32 + 1 / 32
    assert sign_test_p([1, 0], [1, 0]) == 1.0  # no discordant doc: no evidence
    assert sign_test_p(BASE.values(), LAYER_A.values()) == (220 + 66 + 12 + 1) / 4096
    assert sign_test_p([0.5], [0.75]) == 0.5  # fractional scores count by direction


def test_gain_rule_is_the_papers_rule():
    rule = make_rule("gain")
    assert rule.decide(DOCS, BASE, LAYERS) == decide_round(DOCS, BASE, LAYERS, 0.0)
    assert rule.decide(DOCS, BASE, LAYERS).selected == 2


def test_sign_test_prefers_the_layer_whose_gain_is_not_chance():
    outcome = make_rule("sign_test", alpha=0.05).decide(DOCS, BASE, LAYERS, stream="t")
    assert outcome.selected == 3  # 5 of 5 discordant docs: p = 1/32; layer 2's 9 of 12 gives p = 0.073
    assert outcome.evidence == {1: 0.75, 2: 299 / 4096, 3: 1 / 32}
    assert outcome.gains[2] > outcome.gains[3]
    assert "sign_test: layer 3" in outcome.reason and "p=0.0312" in outcome.reason
    # Stricter alpha: nothing passes, the full model is kept and the reason says why.
    strict = make_rule("sign_test", alpha=0.01).decide(DOCS, BASE, LAYERS, stream="t")
    assert strict.selected is None and "no layer's gain" in strict.reason


def test_bootstrap_rule_accepts_gains_whose_lower_bound_clears_the_threshold():
    rule = make_rule("bootstrap", alpha=0.05, resamples=2000, seed=3)
    outcome = rule.decide(DOCS, BASE, LAYERS, stream="t")
    # Layer 3's five unopposed docs give a tighter bound than layer 2's noisier, larger gain.
    assert outcome.evidence[1] < 0 < outcome.evidence[2] < outcome.evidence[3] < outcome.gains[3]
    assert outcome.selected == 2  # both pass; the larger gain wins
    # The bound is a pure function of the scores, the seed and the stream: the report reproduces it.
    assert rule.decide(DOCS, BASE, LAYERS, stream="t").evidence == outcome.evidence
    assert (bootstrap_indices(20, 50, 3, "t") == bootstrap_indices(20, 50, 3, "t")).all()
    assert (bootstrap_indices(20, 50, 3, "t") != bootstrap_indices(20, 50, 3, "other")).any()
    # A threshold between the two bounds leaves only layer 3.
    between = (outcome.evidence[2] + outcome.evidence[3]) / 2
    assert make_rule("bootstrap", threshold=between, resamples=2000, seed=3).decide(DOCS, BASE, LAYERS, "t").selected == 3
    above = outcome.evidence[3] + 0.01
    assert make_rule("bootstrap", threshold=above, resamples=2000, seed=3).decide(DOCS, BASE, LAYERS, "t").selected is None


def test_guarded_rules_break_ties_to_the_lowest_layer():
    tied = {4: LAYER_B, 2: dict(LAYER_B)}
    outcome = make_rule("sign_test").decide(DOCS, BASE, tied)
    assert outcome.selected == 2 and outcome.tied_layers == (2, 4) and "tied with layers 4" in outcome.reason


def test_the_sweep_asks_its_rule_which_is_the_only_decider():
    split = split_subtask("t", list(range(60)), 20, seed=0)  # pool = 20 docs: round 0 probes all of them
    position = {doc: str(i) for i, doc in enumerate(split.pool_units)}
    tables = {"base": BASE, **{str(l): s for l, s in LAYERS.items()}}

    def answer(knockout, docs):
        return {d: [knockout.label if knockout else "base"] for d in docs}

    def score(doc, responses):
        return tables[responses[0]][position[doc]]

    def run(rule):
        return LayerSweep(answer, score, ProbeStore(None, {}), rule=rule).run(split, tuple(LAYERS), "zero", 0)

    assert run(make_rule("gain")).selected == 2
    guarded = run(make_rule("sign_test"))
    assert guarded.selected == 3 and guarded.final.evidence == {1: 0.75, 2: 299 / 4096, 3: 1 / 32}


def test_transfer_modes_score_the_base_model_too():
    assert TaloConfig.pop_from({"transfer": "true"}).compare_base
    assert TaloConfig.pop_from({"test_all_layers": "1"}).compare_base
    assert not TaloConfig.pop_from({}).compare_base
