"""benchmarks/validity.py's offline logic, without the model: decisions read back from stored answers
are TaLo's own, the permuted-label control permutes, rescoring refuses a store it cannot reproduce,
and the summary counts and intervals are the ones its table prints."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from lmms_talo.method.statistics import paired_flip_p

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def validity():
    spec = importlib.util.spec_from_file_location("validity_study", ROOT / "benchmarks" / "validity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


N_POOL = 24


def stored_task(validity, helped_layer: int | None, seed: int = 0):
    """A cloze task of 4-option docs whose stored answers (losses per option) make the base model right
    on two pool docs and `helped_layer` right everywhere; every other layer answers as the base."""
    rng = np.random.default_rng(seed)
    docs = [{"options": ["a", "b", "c", "d"], "answer": int(rng.integers(4))} for _ in range(3 * N_POOL)]
    pool = list(range(N_POOL))

    def losses(gold: int, right: bool) -> list:
        pick = gold if right else (gold + 1) % 4
        return [(0.5 if i == pick else 2.0 + i, False) for i in range(4)]

    records = {}
    for d in pool:
        gold, base_right = docs[d]["answer"], d in (0, 1)
        for label in ["base"] + [str(l) for l in validity.LAYERS]:
            right = base_right or label == str(helped_layer)
            records[(label, str(d))] = (float(right), losses(gold, right))
    return validity.StoredTask("bb_planted", "cloze", docs, pool, records)


def test_decisions_from_stored_answers_find_the_planted_layer_under_every_rule(validity):
    stored = stored_task(validity, helped_layer=validity.LAYERS[2])
    validity.check_rescoring(stored)  # the true labels reproduce every stored score
    gold = validity.labels(stored, None)
    for variant in validity.RULE_VARIANTS:
        selection = validity.decide(stored, variant, gold, 8)
        # the family-wise sign test over the study's candidate layers cannot pass on 8 probe docs:
        # its smallest p-value, 2^-8, times the layers stays above 0.05
        want = () if variant == "sign_test" else (validity.LAYERS[2],)
        assert selection.layers == want, variant
    nothing = stored_task(validity, helped_layer=None)
    assert all(
        validity.decide(nothing, v, validity.labels(nothing, None), 8).layers == () for v in validity.RULE_VARIANTS
    )


def test_a_budgets_pool_is_the_authors_size_drawn_from_the_study_pool(validity):
    stored = stored_task(validity, helped_layer=None)
    small, again, whole = (
        validity.budget_pool(stored, 2),
        validity.budget_pool(stored, 2),
        validity.budget_pool(stored, 8),
    )
    assert len(small) == 8 and small == again and set(small) < set(stored.pool)  # min(72 // 3, 4 * 2)
    assert whole == tuple(stored.pool)  # min(72 // 3, 4 * 8) = the study pool


def test_the_control_permutes_the_gold_labels_seeded_and_rescoring_checks_the_store(validity):
    stored = stored_task(validity, helped_layer=None)
    true = validity.labels(stored, None)
    first, again, other = (validity.labels(stored, k) for k in (0, 0, 1))
    assert first == again and first != other
    assert sorted(first.values()) == sorted(true.values())  # 4 options everywhere: a permutation
    stored.records[("base", "0")] = (1.0 - stored.records[("base", "0")][0], stored.records[("base", "0")][1])
    with pytest.raises(SystemExit, match="bb_planted doc 0 \\(base\\): rescored"):
        validity.check_rescoring(stored)


def test_paired_summary_excludes_the_pool_and_tests_for_harm(validity):
    base = {str(d): float(d % 2) for d in range(40)}
    knocked = {str(d): 0.0 if d >= 10 else base[str(d)] for d in range(40)}  # loses every right doc past 10
    summary = validity.paired_summary(base, knocked, pool=set(range(10)))
    diff = np.array([knocked[str(d)] - base[str(d)] for d in range(10, 40)])
    assert summary["n"] == 30 and summary["difference"] == pytest.approx(diff.mean())
    half = 2.045 * diff.std(ddof=1) / math.sqrt(30)  # t quantile, 29 degrees of freedom
    assert summary["ci95"] == pytest.approx([diff.mean() - half, diff.mean() + half], rel=1e-3)
    worse = paired_flip_p(
        [knocked[str(d)] for d in range(10, 40)], [base[str(d)] for d in range(10, 40)], 0, "validity"
    )
    assert summary["worse_p"] == worse < 0.05


def test_summary_counts_applied_negative_and_control_selections(validity):
    stored = {"t1": stored_task(validity, None), "t2": stored_task(validity, None, seed=1)}
    hurt = {str(d): 0.0 for d in range(N_POOL, 64)}
    same = {str(d): 1.0 for d in range(N_POOL, 64)}
    tests = {"t1": {"base": same, "3": hurt}, "t2": {"base": same, "3+5": same}}
    decisions = {
        name: {v: {"layers": [], "control_selected": 1, "control_draws": 50} for v in validity.RULE_VARIANTS}
        for name in stored
    }
    decisions["t1"]["gain"]["layers"] = [3]
    decisions["t2"]["gain"]["layers"] = [3, 5]
    oracles = {"t1": {"best_difference": 0.25}, "t2": {"best_difference": 0.0}}
    rows = validity.summarise(decisions, tests, stored, oracles)
    gain = rows["gain"]
    assert (gain["applied"], gain["negative"], gain["significantly_negative"]) == (2, 1, 1)
    assert gain["mean_test_difference"] == pytest.approx(-0.5) and gain["control_selection_rate"] == pytest.approx(
        2 / 100
    )
    assert rows["confirm"]["applied"] == 0 and rows["confirm"]["mean_test_difference"] is None
    # regret: the best layer's test difference minus the rule's own (0 without a knockout)
    assert gain["mean_regret"] == pytest.approx(((0.25 - -1.0) + (0.0 - 0.0)) / 2)
    assert rows["confirm"]["mean_regret"] == pytest.approx(0.125)


def test_the_oracle_finds_the_best_layer_and_corrects_over_the_layers(validity):
    stored = {"t": stored_task(validity, None)}
    docs = range(N_POOL, 3 * N_POOL)
    base = {str(d): float(d % 4 == 0) for d in docs}
    variants = {"base": base} | {str(layer): dict(base) for layer in validity.LAYERS}
    variants["7"] = {str(d): 1.0 for d in docs}  # right everywhere: +0.75 on 48 docs
    variants["9"] = {str(d): float(d % 4 == 0 or d == N_POOL + 1) for d in docs}  # one doc better
    (o,) = validity.oracle({"t": variants}, stored).values()
    assert o["best_layer"] == 7 and o["best_difference"] == pytest.approx(0.75) and o["n"] == 2 * N_POOL
    assert o["best_holm_p"] < 0.05 and o["significant_layers"] == [7]  # layer 9's one doc is not enough
