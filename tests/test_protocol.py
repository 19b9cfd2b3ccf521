"""The authors' probe protocol (talo/probe_layer.py), round by round: what each round draws, why,
and when the rounds stop; run through LayerSweep on score tables, so the sweep's decisions follow."""

import pytest

from lmms_talo.method.config import TaloArgumentError, TaloConfig
from lmms_talo.method.probe_split import FIRST_DRAW, ProbeSplit, split_subtask
from lmms_talo.method.rules import make_rule
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore

LAYERS = (1, 2, 3)
SHOTS = 10


class Table:
    """Fixed scores per (variant, doc); records which variants ran on which docs."""

    def __init__(self, base, layer=None):
        self.base, self.layer = base, layer or (lambda label, doc: base(doc))
        self.runs: list[tuple[str, int]] = []

    def answer(self, knockout, docs):
        label = knockout.label if knockout else "base"
        self.runs.extend((label, d) for d in docs)
        return {d: [self.base(d) if label == "base" else self.layer(label, d)] for d in docs}

    @staticmethod
    def score(doc, responses):
        return float(responses[0])


def run(split, table, mode="full", threshold=0.0, **kwargs):
    rule = make_rule("gain", threshold=threshold)
    return LayerSweep(table.answer, table.score, ProbeStore(None, {}), mode=mode, rule=rule).run(
        split, LAYERS, "zero", **kwargs
    )


def disjoint(rounds):
    docs = [d for r in rounds for d in r.docs]
    return len(docs) == len(set(docs))


@pytest.mark.parametrize("mode", ["full", "select"])
def test_no_gain_redraws_k_plus_r_plus_1_unused_docs_until_fewer_than_k_remain(mode):
    split = split_subtask("t", list(range(300)), SHOTS, seed=0)  # pool: min(100, 40) = 40
    result = run(split, Table(lambda d: 0.5), mode)
    assert [len(r.docs) for r in result.probe_rounds] == [10, 11, 12]  # 33 used, 7 left < k
    assert [r.why for r in result.probe_rounds] == [
        FIRST_DRAW,
        "no positive gain on round 0",
        "no positive gain on round 1",
    ]
    assert disjoint(result.probe_rounds) and {d for r in result.probe_rounds for d in r.docs} <= set(split.pool)
    assert [o.probe_docs for o in result.rounds] == [r.docs for r in result.probe_rounds]
    assert result.selected is None
    assert result.stopped == "no layer selected; no redraw: 7 unused pool units remain, fewer than probe_shots=10"


def test_a_perfect_round_0_is_redrawn_unswept_and_counts_as_a_redraw():
    split = split_subtask("t", list(range(300)), SHOTS, seed=1)
    first = set(split.first_round().docs)
    table = Table(lambda d: 1.0 if d in first else 0.5)
    result = run(split, table)
    sizes = [len(r.docs) for r in result.probe_rounds]
    assert sizes == [10, 10, 12]  # perfect: k again; then no gain after 1 redraw: k + 1 + 1; 32 used, 8 left
    assert [r.why for r in result.probe_rounds] == [
        FIRST_DRAW,
        "baseline perfect on round 0",
        "no positive gain on round 1",
    ]
    assert disjoint(result.probe_rounds)
    assert not [d for label, d in table.runs if label != "base" and d in first], "round 0's layers were swept"
    assert result.rounds[0].layer_scores == {} and result.rounds[1].layer_scores
    assert result.stopped.endswith("8 unused pool units remain, fewer than probe_shots=10")


def test_a_perfect_later_round_is_a_round_without_gain():
    split = split_subtask("t", list(range(300)), SHOTS, seed=2)
    first = set(split.first_round().docs)
    result = run(split, Table(lambda d: 0.0 if d in first else 1.0))  # round 0 imperfect, later rounds perfect
    assert [r.why for r in result.probe_rounds] == [
        FIRST_DRAW,
        "no positive gain on round 0",
        "no positive gain on round 1",
    ]


def test_the_first_round_with_a_positive_gain_decides_and_ties_go_low():
    split = split_subtask("t", list(range(300)), SHOTS, seed=3)
    first = set(split.first_round().docs)
    # layers 2 and 3 help on every doc outside round 0; layer 1 never does
    table = Table(lambda d: 0.0, lambda label, d: 1.0 if label in ("2", "3") and d not in first else 0.0)
    result = run(split, table)
    assert len(result.rounds) == 2 and result.selected == 2 and result.final.tied_layers == (2, 3)
    assert result.stopped == "round 1 selected layer 2"


def test_at_most_max_redraws_redraws():
    """The authors' cap of 5 redraws: with a pool of at most 4k it is never reached (the unused docs
    run out first), so the cap is shown on a larger pool and through max_redraws."""
    pool = tuple(range(200))
    big = ProbeSplit("t", SHOTS, 0, pool, (), pool, None)
    rounds = [big.first_round()]
    while big.no_redraw(rounds) is None:
        rounds.append(big.redraw(rounds, baseline_perfect=False))
    assert [len(r.docs) for r in rounds] == [10, 11, 12, 13, 14, 15] and disjoint(rounds)
    assert big.no_redraw(rounds) == "5 redraws made (the authors' limit is 5)"
    split = split_subtask("t", list(range(300)), SHOTS, seed=0)
    result = run(split, Table(lambda d: 0.5), max_redraws=1)
    assert len(result.rounds) == 2 and result.stopped.endswith("1 redraws made (the authors' limit is 5)")
    assert len(run(split, Table(lambda d: 0.5), max_redraws=0).rounds) == 1


def test_rounds_are_a_pure_function_of_the_split_and_the_outcomes():
    split = split_subtask("t", list(range(300)), SHOTS, seed=4)
    a = run(split, Table(lambda d: 0.5))
    b = run(split_subtask("t", list(range(300)), SHOTS, seed=4), Table(lambda d: 0.5))
    assert a.probe_rounds == b.probe_rounds
    c = run(split_subtask("t", list(range(300)), SHOTS, seed=5), Table(lambda d: 0.5))
    assert c.probe_rounds[0].docs != a.probe_rounds[0].docs


def test_stratified_redraws_draw_from_the_unused_strata():
    strata = ["a"] * 200 + ["b"] * 100
    split = split_subtask("t", list(range(300)), SHOTS, seed=0, strata=strata)
    result = run(split, Table(lambda d: 0.5))
    assert sum(strata[d] == "a" for d in result.probe_rounds[0].docs) in (6, 7)
    assert disjoint(result.probe_rounds)


def test_protocol_args_default_to_the_authors_protocol_and_bad_ones_are_refused_with_the_fix():
    assert TaloConfig().probe_protocol == "authors" and TaloConfig().max_redraws == 5
    assert TaloConfig().granularity == "auto"
    with pytest.raises(TaloArgumentError, match="resample_rounds was removed.*max_redraws"):
        TaloConfig.pop_from({"resample_rounds": "3"})
    with pytest.raises(TaloArgumentError, match="probe_protocol='resample' is unknown"):
        TaloConfig.pop_from({"probe_protocol": "resample"})
    with pytest.raises(TaloArgumentError, match="max_redraws must be at least 0"):
        TaloConfig.pop_from({"max_redraws": "-1"})
