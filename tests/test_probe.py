"""The probe protocol: pool / probe set / test split sizes, disjointness, determinism, strata."""

from collections import Counter

import pytest

from lmms_talo.probe import ProbeSplitError, pool_size, split_subtask


@pytest.mark.parametrize("n, shots", [(30, 4), (31, 10), (100, 10), (500, 10), (500, 15), (500, 20), (60, 20)])
def test_sizes_and_disjointness(n, shots):
    keys = list(range(n))
    split = split_subtask("task/cat", keys, shots, seed=0)
    assert len(split.pool) == min(n // 3, 4 * shots) == pool_size(n, shots)
    assert set(split.pool).isdisjoint(split.test)
    assert sorted(split.pool + split.test) == keys
    for round_index in range(5):
        probe = split.probe_set(round_index)
        assert len(probe) == shots
        assert set(probe) <= set(split.pool)


def test_deterministic_under_a_seed_and_different_across_seeds():
    keys = [f"doc{i}" for i in range(200)]
    a = split_subtask("t", keys, 10, seed=3)
    b = split_subtask("t", keys, 10, seed=3)
    c = split_subtask("t", keys, 10, seed=4)
    assert a.pool == b.pool and a.probe_set(0) == b.probe_set(0)
    assert a.pool != c.pool
    assert split_subtask("other", keys, 10, seed=3).pool != a.pool  # sub-tasks draw independently


def test_redraws_differ():
    split = split_subtask("t", list(range(300)), 10, seed=0)
    rounds = {tuple(split.probe_set(r)) for r in range(5)}
    assert len(rounds) == 5


def test_stratified_pool_keeps_proportions():
    strata = ["a"] * 120 + ["b"] * 60 + ["c"] * 20
    split = split_subtask("t", list(range(200)), 10, seed=1, strata=strata)
    counts = Counter(strata[k] for k in split.pool)
    assert counts == {"a": 24, "b": 12, "c": 4}  # 40 pool docs in the 6:3:1 ratio
    probe_counts = Counter(strata[k] for k in split.probe_set(0))
    assert probe_counts == {"a": 6, "b": 3, "c": 1}


def test_fewer_docs_than_probe_shots_is_a_clear_error():
    with pytest.raises(ProbeSplitError, match=r"has 20 docs, but probe_shots=10 needs at least 30.*Lower probe_shots"):
        split_subtask("mmstar/math", list(range(20)), 10, seed=0)
    with pytest.raises(ProbeSplitError, match="at least 1"):
        split_subtask("t", list(range(20)), 0, seed=0)
