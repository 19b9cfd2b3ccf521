"""The selection rules (lmms_talo.method.rules) on hand-built per-doc score tables with known answers."""

from __future__ import annotations

from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import decide_round, make_rule
from lmms_talo.method.statistics import bootstrap_indices
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore

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


def test_gain_rule_is_the_papers_rule():
    rule = make_rule("gain")
    assert rule.decide(DOCS, BASE, LAYERS) == decide_round(DOCS, BASE, LAYERS, 0.0)
    assert rule.decide(DOCS, BASE, LAYERS).selected == 2


def test_sign_test_prefers_the_layer_whose_gain_is_not_chance_family_wise():
    outcome = make_rule("sign_test", alpha=0.1).decide(DOCS, BASE, LAYERS, stream="t")
    # raw p: 5 of 5 discordant docs 1/32, 9 of 12 299/4096, 1 of 2 0.75; Holm over the 3 candidates
    assert outcome.evidence == {1: 0.75, 2: 2 * 299 / 4096, 3: 3 / 32}
    assert outcome.selected == 3 and outcome.gains[2] > outcome.gains[3]
    assert "sign_test: layer 3" in outcome.reason and "p=0.0938 Holm-adjusted" in outcome.reason
    # At alpha 0.05 nothing passes once the three candidates are counted: the full model is kept, and why.
    strict = make_rule("sign_test", alpha=0.05).decide(DOCS, BASE, LAYERS, stream="t")
    assert strict.selected is None and "no layer's gain" in strict.reason
    # A round that ran only these 3 of 31 candidates (select or screen mode) counts the other 28 too.
    partial = make_rule("sign_test", alpha=0.1).decide(DOCS, BASE, LAYERS, stream="t", family=31)
    assert partial.evidence[3] == 31 / 32 and partial.selected is None


def test_maxt_keeps_the_layers_dependence_and_is_reproducible():
    rule = make_rule("maxt", alpha=0.1, resamples=2000, seed=3)
    outcome = rule.decide(DOCS, BASE, LAYERS, stream="t")
    # 20 docs: 2000 seeded flips of every doc's differences at once, the largest mean over the layers
    assert outcome.evidence[2] < outcome.evidence[3] < outcome.evidence[1]
    assert outcome.selected == 2 and "maxT sign-flip p=" in outcome.reason
    assert rule.decide(DOCS, BASE, LAYERS, stream="t").evidence == outcome.evidence
    assert (
        make_rule("maxt", alpha=0.1, resamples=2000, seed=3).decide(DOCS, BASE, LAYERS, "u").evidence
        != outcome.evidence
    )
    # The mean gain must exceed the threshold: a threshold above both gains' reach keeps the full model.
    high = make_rule("maxt", threshold=0.2, resamples=2000, seed=3).decide(DOCS, BASE, LAYERS, "t")
    assert high.selected is None and high.evidence[2] > outcome.evidence[2]
    assert (bootstrap_indices(20, 50, 3, "t") == bootstrap_indices(20, 50, 3, "t")).all()


def test_the_removed_bootstrap_rule_names_its_replacement():
    import pytest

    from lmms_talo.method.rules import RuleError

    with pytest.raises(RuleError, match="select_rule=bootstrap was removed.*Use select_rule=maxt"):
        make_rule("bootstrap")


def test_guarded_rules_break_ties_to_the_lowest_layer():
    tied = {4: LAYER_B, 2: dict(LAYER_B)}
    outcome = make_rule("sign_test", alpha=0.1).decide(DOCS, BASE, tied)  # Holm over 2: p = 1/16
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
    guarded = run(make_rule("sign_test", alpha=0.1))
    assert guarded.selected == 3 and guarded.final.evidence == {1: 0.75, 2: 2 * 299 / 4096, 3: 3 / 32}
