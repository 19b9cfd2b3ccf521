"""The paired tests behind the guarded rules: exact where claimed, at their stated error rates."""

from __future__ import annotations

import numpy as np
import pytest
from test_rules import BASE, LAYER_A  # 12 discordant docs, 9 of them for the knockout

from lmms_talo.method.statistics import EXACT_FLIP_LIMIT, holm_adjusted, paired_flip_p, sign_test_p


def test_sign_test_p_values_are_exact_binomial_tails():
    assert sign_test_p([0] * 5, [1] * 5) == 1 / 32
    assert sign_test_p([0, 0, 0, 0, 1], [1, 1, 1, 1, 0]) == 5 / 32 + 1 / 32
    assert sign_test_p([1, 0], [1, 0]) == 1.0  # no discordant doc: no evidence
    assert sign_test_p(BASE.values(), LAYER_A.values()) == (220 + 66 + 12 + 1) / 4096
    assert sign_test_p([0.5], [0.75]) == 0.5  # fractional scores count by direction


def test_the_flip_test_is_the_sign_test_on_pass_fail_scores():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 15))
        reference, knocked = rng.integers(0, 2, n).astype(float), rng.integers(0, 2, n).astype(float)
        assert paired_flip_p(reference, knocked) == pytest.approx(sign_test_p(reference, knocked), abs=1e-12)


def test_the_flip_test_weighs_the_sizes_of_continuous_differences():
    """Two large wins and three small losses: the sign test sees 2 of 5 docs for the knockout; the
    flip test reaches the observed sum only in the 8 of 32 patterns that keep both wins."""
    reference = [0.0] * 5
    knocked = [5.0, 4.0, -0.1, -0.1, -0.1]
    assert sign_test_p(reference, knocked) == 26 / 32
    assert paired_flip_p(reference, knocked) == 8 / 32


def test_the_flip_test_holds_its_level_under_the_null_and_finds_planted_effects():
    """Over many seeds: a null (differences symmetric around 0) rejects at most alpha of the time, a
    planted shift of one standard deviation on 12 docs nearly always."""
    rng = np.random.default_rng(1)
    alpha, runs = 0.05, 400
    null = [paired_flip_p(np.zeros(12), rng.normal(0, 1, 12)) < alpha for _ in range(runs)]
    planted = [paired_flip_p(np.zeros(12), rng.normal(1, 1, 12)) < alpha for _ in range(runs)]
    assert np.mean(null) <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / runs)
    assert np.mean(planted) >= 0.9


def test_monte_carlo_flips_beyond_the_exact_limit_are_seeded_and_close_to_exact():
    rng = np.random.default_rng(2)
    differences = rng.normal(0.3, 1, EXACT_FLIP_LIMIT + 4)
    zeros = np.zeros_like(differences)
    first, again = (
        paired_flip_p(zeros, differences, seed=5, stream="s"),
        paired_flip_p(zeros, differences, seed=5, stream="s"),
    )
    assert first == again
    patterns = ((np.arange(2**differences.size)[:, None] >> np.arange(differences.size)) & 1) * 2 - 1
    exact = np.mean(patterns @ differences >= differences.sum() - 1e-9)
    assert abs(first - exact) < 0.01


def test_holm_adjustment_matches_its_definition():
    adjusted = holm_adjusted({1: 0.01, 2: 0.04, 3: 0.03, 4: 0.5})
    assert adjusted == pytest.approx({1: 0.04, 2: 0.09, 3: 0.09, 4: 0.5})
    assert holm_adjusted({}) == {}
    assert holm_adjusted({7: 0.6, 8: 0.6}) == {7: 1.0, 8: 1.0}
