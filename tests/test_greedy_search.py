"""Multi-layer search (lmms_talo.method.greedy_search) through the real LayerSweep and ProbeStore, on a score
table: each variant's per-doc correctness is given, and `answer` reports which variant ran."""

from __future__ import annotations

from lmms_talo.method.batching import SweepEngine
from lmms_talo.method.greedy_search import search_more_layers
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import make_rule
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore

SHOTS = 10
LAYERS = (1, 2, 3, 4)


def table_sweep(right_by_label: dict[str, set[int]], rule=None):
    """Docs are 0..29; the probe set is the 10-doc pool. right_by_label maps a variant label to the
    positions (0..9, in pool order) of the probe docs it answers right; unlisted variants answer like
    the base model. Returns (sweep, split, calls), where calls logs (label, docs) of every model run."""
    split = split_subtask("t", list(range(30)), SHOTS, seed=0)
    assert len(split.pool) == SHOTS  # pool = min(30 // 3, 4 * 10): the probe set is the whole pool
    position = {doc: i for i, doc in enumerate(split.pool)}
    calls = []

    def answer(knockout, docs):
        label = knockout.label if knockout else "base"
        calls.append((label, tuple(docs)))
        return {doc: [label] for doc in docs}

    def score(doc, responses):
        label = responses[0]
        right = right_by_label.get(label, right_by_label["base"])
        return float(position[doc] in right)

    engine = SweepEngine(True, "answer takes many docs", docs_per_call=SHOTS)  # a variant's docs in one call
    return LayerSweep(answer, score, ProbeStore(None, {"test": "pairwise"}), rule=rule, engine=engine), split, calls


BASE = {0, 1, 2, 3}


def test_the_pair_is_kept_when_it_beats_the_single_layer():
    sweep, split, calls = table_sweep({"base": BASE, "2": BASE | {4, 5}, "2+3": BASE | {4, 5, 6, 7}, "1+2": BASE | {4}})
    result = sweep.run(split, LAYERS, "zero", 0)
    assert result.selected == 2
    before = len(calls)
    layers, stages = search_more_layers(sweep, result, "zero", 2, "t")
    assert layers == (2, 3)
    (stage,) = stages
    assert stage.base_layers == (2,)
    assert stage.outcome.baseline == 0.6 and stage.outcome.layer_scores == {1: 0.5, 3: 0.8, 4: 0.4}
    assert stage.outcome.gains[3] == 0.8 - 0.6
    # Cost: one pass per remaining layer; the single layer's scores come back from the store.
    assert stage.passes == 3 and stage.docs_computed == 3 * SHOTS and stage.docs_reused == SHOTS
    assert [label for label, _ in calls[before:]] == ["1+2", "2+3", "2+4"]
    assert set(stage.doc_scores) == {"2", "1+2", "2+3", "2+4"} and not set(result.doc_scores) & {"1+2", "2+3", "2+4"}
    row = stage.to_dict()
    assert row["selected"] == 3 and row["passes"] == 3 and row["base_layers"] == [2]


def test_the_single_layer_stays_when_no_pair_beats_it_by_the_threshold():
    sweep, split, _ = table_sweep(
        {"base": BASE, "2": BASE | {4, 5}, "2+3": BASE | {4, 5, 6}}, make_rule("gain", threshold=0.15)
    )
    result = sweep.run(split, LAYERS, "zero", 0)
    assert result.selected == 2  # +0.2 clears 0.15
    layers, (stage,) = search_more_layers(sweep, result, "zero", 2, "t")
    assert layers == (2,)  # the pair adds only +0.1
    assert stage.outcome.selected is None and stage.outcome.gains[3] > 0


def test_a_guarded_rule_guards_the_pair_too():
    sweep, split, _ = table_sweep(
        {"base": BASE, "2": BASE | {4, 5, 6, 7, 8, 9}, "2+3": {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}},
        make_rule("sign_test", alpha=0.1),
    )
    result = sweep.run(split, LAYERS, "zero", 0)
    assert result.selected == 2  # 6 of 6 discordant docs: p = 1/64, Holm over the candidate layers
    layers, (stage,) = search_more_layers(sweep, result, "zero", 2, "t")
    assert layers == (2,)
    assert stage.outcome.gains[3] == 0.0 and stage.outcome.evidence[3] == 1.0


def test_greedy_search_grows_to_max_layers_and_no_search_without_a_selection():
    sweep, split, _ = table_sweep({"base": BASE, "2": BASE | {4}, "2+3": BASE | {4, 5}, "2+3+4": BASE | {4, 5, 6}})
    result = sweep.run(split, LAYERS, "zero", 0)
    layers, stages = search_more_layers(sweep, result, "zero", 3, "t")
    assert layers == (2, 3, 4)
    assert [s.base_layers for s in stages] == [(2,), (2, 3)]
    assert [s.passes for s in stages] == [3, 2]
    assert stages[1].docs_reused == SHOTS  # the pair's scores are read back as the reference

    sweep, split, calls = table_sweep({"base": BASE})
    result = sweep.run(split, LAYERS, "zero", 0)
    before = len(calls)
    assert search_more_layers(sweep, result, "zero", 2, "t") == ((), [])
    assert len(calls) == before
