"""The probe protocol: pool / probe set / test split sizes, disjointness, determinism, strata."""

from collections import Counter

import pytest

from lmms_talo.method.probe_split import ProbeSplitError, pool_size, split_subtask


@pytest.mark.parametrize("n, shots", [(30, 4), (31, 10), (100, 10), (500, 10), (500, 15), (500, 20), (60, 20)])
def test_pool_is_a_third_capped_at_4k_disjoint_from_the_test_docs_and_holds_the_k_probe_docs(n, shots):
    keys = list(range(n))
    split = split_subtask("task/cat", keys, shots, seed=0)
    assert len(split.pool) == min(n // 3, 4 * shots) == pool_size(n, shots)
    assert set(split.pool).isdisjoint(split.test)
    assert sorted(split.pool + split.test) == keys
    probe = split.first_round().docs
    assert len(probe) == shots
    assert set(probe) <= set(split.pool)


def test_deterministic_under_a_seed_and_different_across_seeds():
    keys = [f"doc{i}" for i in range(200)]
    a = split_subtask("t", keys, 10, seed=3)
    b = split_subtask("t", keys, 10, seed=3)
    c = split_subtask("t", keys, 10, seed=4)
    assert a.pool == b.pool and a.first_round() == b.first_round()
    assert a.pool != c.pool
    assert split_subtask("other", keys, 10, seed=3).pool != a.pool  # sub-tasks draw independently


def test_redraws_never_reuse_a_pool_doc():
    split = split_subtask("t", list(range(300)), 10, seed=0)
    rounds = [split.first_round()]
    while split.no_redraw(rounds) is None:
        rounds.append(split.redraw(rounds, baseline_perfect=False))
    docs = [d for r in rounds for d in r.docs]
    assert len(docs) == len(set(docs)) and set(docs) <= set(split.pool)


def test_stratified_pool_keeps_proportions():
    strata = ["a"] * 120 + ["b"] * 60 + ["c"] * 20
    split = split_subtask("t", list(range(200)), 10, seed=1, strata=strata)
    counts = Counter(strata[k] for k in split.pool)
    assert counts == {"a": 24, "b": 12, "c": 4}  # 40 pool docs in the 6:3:1 ratio
    probe_counts = Counter(strata[k] for k in split.first_round().docs)
    assert probe_counts == {"a": 6, "b": 3, "c": 1}


def test_fewer_docs_than_probe_shots_are_not_probed_and_say_why():
    split = split_subtask("mmmu/Art", list(range(8)), 10, seed=0)
    assert split.pool == () and split.test == tuple(range(8))
    assert split.unprobed == "8 docs, fewer than probe_shots=10: answered by the full model"
    tiny = split_subtask("t", [0, 1], 2, seed=0)  # n >= k, but n // 3 = 0: nothing to probe
    assert tiny.pool == () and "probe pool (n // 3) is empty" in tiny.unprobed
    with pytest.raises(ProbeSplitError, match="at least 1"):
        split_subtask("t", list(range(20)), 0, seed=0)


def test_a_pool_smaller_than_k_is_probed_whole_in_one_round():
    """n >= k but n // 3 < k: the authors probe the whole (smaller) pool, and cannot redraw."""
    split = split_subtask("mmstar/math", list(range(20)), 10, seed=0)
    assert split.unprobed is None and len(split.pool) == 6
    first = split.first_round()
    assert sorted(first.docs) == sorted(split.pool)
    assert split.no_redraw([first]) == "0 unused pool units remain, fewer than probe_shots=10"


def test_units_keep_a_question_on_one_side_and_count_k_in_questions():
    """MMBench-style rows: 40 questions, question q stored as rows q, q+1e6 (and q+2e6 for even q)."""
    keys, units = [], []
    for rotation in range(3):
        for q in range(40):
            if rotation < 2 or q % 2 == 0:
                keys.append(q + rotation * 1_000_000)
                units.append(q)
    split = split_subtask("mmbench/ocr", keys, 4, seed=0, units=units)
    assert len(split.pool_units) == pool_size(40, 4) == 13
    pool_questions = {k % 1_000_000 for k in split.pool}
    assert pool_questions == set(split.pool_units)
    assert not pool_questions & {k % 1_000_000 for k in split.test}
    assert sorted(split.pool + split.test) == sorted(keys)
    first = split.first_round()
    assert len(first.docs) == 4 and set(first.docs) <= set(split.pool_units)
    assert all(split.docs_of(q) == tuple(k for k in keys if k % 1_000_000 == q) for q in first.docs)
