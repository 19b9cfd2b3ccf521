"""The paired statistics behind the guarded selection rules (lmms_talo.method.rules): exact sign and
sign-flip tests, Holm's adjustment over the candidate layers, the max-statistic sign-flip test, and
the bootstrap resamples of the offline robustness analysis.

Every function is pure: a statistic depends on the per-doc values and the seed only, so the report's
per-doc records reproduce each decision offline.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np


def sign_test_p(reference: Sequence[float], knocked: Sequence[float]) -> float:
    """P(at least this many discordant docs favour the knockout | no effect): exact binomial, one-sided."""
    better = sum(1 for r, k in zip(reference, knocked) if k > r)
    worse = sum(1 for r, k in zip(reference, knocked) if k < r)
    discordant = better + worse
    if discordant == 0:
        return 1.0
    return sum(math.comb(discordant, j) for j in range(better, discordant + 1)) / 2**discordant


EXACT_FLIP_LIMIT = 16  # up to 2^16 sign patterns are enumerated; beyond, a seeded Monte Carlo
FLIP_SAMPLES = 20_000


def paired_flip_p(reference: Sequence[float], knocked: Sequence[float], seed: int = 0, stream: str = "") -> float:
    """One-sided p-value that the knockout's mean paired difference is > 0, by sign flips of the
    per-doc differences (a paired permutation test). On pass/fail scores it is exactly the sign test;
    on a continuous statistic (the likelihood margin) it uses the sizes of the differences too.
    Exact for up to EXACT_FLIP_LIMIT non-zero differences, else FLIP_SAMPLES seeded flips with the
    (hits + 1) / (samples + 1) correction, which never understates p."""
    differences = np.array([k - r for r, k in zip(reference, knocked)], dtype=float)
    differences = differences[differences != 0]
    if differences.size == 0:
        return 1.0
    observed = differences.sum()
    tolerance = 1e-12 * np.abs(differences).sum()  # flips that equal the observed sum count as extreme
    if differences.size <= EXACT_FLIP_LIMIT:
        return float(np.mean(_sign_patterns(differences.size) @ differences >= observed - tolerance))
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    flips = rng.choice((-1.0, 1.0), size=(FLIP_SAMPLES, differences.size))
    return float((np.sum(flips @ differences >= observed - tolerance) + 1) / (FLIP_SAMPLES + 1))


@functools.lru_cache(maxsize=EXACT_FLIP_LIMIT + 1)
def _sign_patterns(size: int) -> np.ndarray:
    """Every +-1 pattern of `size` signs (2^size rows): built once per size, shared by every layer."""
    return ((np.arange(2**size)[:, None] >> np.arange(size)) & 1) * 2.0 - 1.0


def holm_adjusted(p_values: Mapping[Hashable, float], family: int | None = None) -> dict:
    """Holm's step-down adjustment: each p-value as it must be read when all of them were tested
    (family-wise error at most alpha over the candidate layers). `family`: the number of hypotheses
    when some were not tested (layers pruned or screened out): those count as p = 1, ranked last,
    which can only raise the others' adjusted p-values (conservative)."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    count, running, adjusted = max(len(ordered), family or 0), 0.0, {}
    for rank, (key, p) in enumerate(ordered):
        running = max(running, min(1.0, (count - rank) * p))
        adjusted[key] = running
    return {key: adjusted[key] for key in p_values}


def bootstrap_indices(n_docs: int, samples: int, seed: int, stream: str) -> np.ndarray:
    """`samples` resamples (with replacement) of n_docs positions; seeded by (seed, stream) only."""
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    return rng.integers(0, n_docs, size=(samples, n_docs))


def max_flip_p_values(
    differences: np.ndarray, seed: int = 0, stream: str = "", samples: int = FLIP_SAMPLES
) -> np.ndarray:
    """Per row of `differences` (layers x docs): the family-wise adjusted p-value of the one-sided
    max-statistic sign-flip test (Westfall and Young's single-step maxT). Each doc's differences are
    flipped together across layers (the layers share the docs, and their dependence is kept); a
    layer's p-value is the share of flips whose largest mean difference over all layers reaches its
    own. Exact for up to EXACT_FLIP_LIMIT docs, else `samples` seeded flips with the
    (hits + 1) / (samples + 1) correction."""
    n_docs = differences.shape[1]
    observed = differences.sum(axis=1)
    tolerance = 1e-12 * np.abs(differences).sum(axis=1)
    if n_docs <= EXACT_FLIP_LIMIT:
        largest = (_sign_patterns(n_docs) @ differences.T).max(axis=1)
        return np.array([np.mean(largest >= o - t) for o, t in zip(observed, tolerance)])
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    largest = (rng.choice((-1.0, 1.0), size=(samples, n_docs)) @ differences.T).max(axis=1)
    return np.array([(np.sum(largest >= o - t) + 1) / (samples + 1) for o, t in zip(observed, tolerance)])


# (reference values per doc, {layer: values per doc}) of a paired statistic
PairedValues = tuple[Mapping[Hashable, float], Mapping[int, Mapping[Hashable, float]]]


def paired_tests(
    probe_docs: Sequence[Hashable],
    reference: Mapping[Hashable, float],
    layer_values: Mapping[int, Mapping[Hashable, float]],
    seed: int,
    stream: str,
    family: int | None = None,
) -> dict:
    """Every candidate layer's one-sided paired test against the reference (paired_flip_p), and the
    p-values Holm-adjusted over the candidates (`family` of them, when only some were run): which
    probe gains could be noise, for any rule."""
    ref = [reference[d] for d in probe_docs]
    p_values = {
        layer: paired_flip_p(ref, [values[d] for d in probe_docs], seed, f"{stream}/{layer}")
        for layer, values in layer_values.items()
    }
    return {"p_values": p_values, "holm": holm_adjusted(p_values, family)}
