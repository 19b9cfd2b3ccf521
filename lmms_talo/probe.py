"""The probe protocol: which docs of a sub-task TaLo may look at, and which it must not.

A sub-task's docs are split once, with a seed, into a *probe pool* (min(n // 3, 4k) docs) and a
*test set* (every other doc). Each selection round draws a *probe set* of k docs from the pool.
The pool is excluded from the test set as a whole, so no doc the selection could have seen is
ever counted in a test score.

The split is a pure function of (doc keys in dataset order, strata, k, seed, sub-task name): the
adapter and the bundled task configs call the same function and therefore agree on the pool.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

POOL_SHOTS_FACTOR = 4  # pool = min(n // 3, 4 k), as the authors' code draws it
POOL_FRACTION_DIVISOR = 3


class ProbeSplitError(ValueError):
    """The sub-task cannot give the requested probe set."""


def pool_size(n_docs: int, shots: int) -> int:
    return min(n_docs // POOL_FRACTION_DIVISOR, POOL_SHOTS_FACTOR * shots)


def _rng(seed: int, name: str, purpose: str) -> np.random.Generator:
    """A generator that depends on the seed and the sub-task, not on Python's hash salt."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def stratified_sample(
    keys: Sequence[Hashable],
    count: int,
    rng: np.random.Generator,
    strata: Sequence[Hashable] | None = None,
) -> list[Hashable]:
    """Draw `count` keys; with strata, each stratum gets its proportional share (largest remainder).

    The result keeps the input order, so it does not depend on the order of the draws.
    """
    if count > len(keys):
        raise ProbeSplitError(f"cannot draw {count} docs from {len(keys)}")
    if strata is None:
        chosen = set(rng.choice(len(keys), size=count, replace=False).tolist())
        return [key for index, key in enumerate(keys) if index in chosen]
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        groups[stratum].append(index)
    ordered = sorted(groups, key=str)
    exact = {s: count * len(groups[s]) / len(keys) for s in ordered}
    quota = {s: int(exact[s]) for s in ordered}
    leftover = count - sum(quota.values())
    by_remainder = sorted(ordered, key=lambda s: (-(exact[s] - quota[s]), str(s)))
    for s in by_remainder[:leftover]:
        quota[s] += 1
    chosen = set()
    for s in ordered:
        members = groups[s]
        picks = rng.choice(len(members), size=quota[s], replace=False)
        chosen.update(members[p] for p in picks.tolist())
    return [key for index, key in enumerate(keys) if index in chosen]


@dataclass(frozen=True)
class ProbeSplit:
    """The seeded split of one sub-task's docs."""

    name: str
    shots: int
    seed: int
    pool: tuple
    test: tuple
    pool_strata: tuple | None

    def probe_set(self, round_index: int) -> list:
        """The k probe docs of a selection round; round 0 is the first draw, later rounds redraw."""
        rng = _rng(self.seed, self.name, f"probe-round-{round_index}")
        return stratified_sample(self.pool, self.shots, rng, self.pool_strata)


def split_subtask(
    name: str,
    keys: Sequence[Hashable],
    shots: int,
    seed: int,
    strata: Sequence[Hashable] | None = None,
) -> ProbeSplit:
    """Split one sub-task's docs (keys in dataset order) into probe pool and test set."""
    if shots < 1:
        raise ProbeSplitError(f"probe_shots must be at least 1, got {shots}")
    if strata is not None and len(strata) != len(keys):
        raise ProbeSplitError("strata must give one value per doc")
    if len(set(keys)) != len(keys):
        raise ProbeSplitError(f"sub-task {name!r} has repeated doc keys")
    size = pool_size(len(keys), shots)
    if size < shots:
        raise ProbeSplitError(
            f"sub-task {name!r} has {len(keys)} docs, but probe_shots={shots} needs at least "
            f"{POOL_FRACTION_DIVISOR * shots} (the probe pool is n // {POOL_FRACTION_DIVISOR}). "
            f"Lower probe_shots, or use granularity=task to probe the whole task as one."
        )
    pool = stratified_sample(list(keys), size, _rng(seed, name, "pool"), strata)
    pool_set = set(pool)
    test = tuple(key for key in keys if key not in pool_set)
    pool_strata = None
    if strata is not None:
        stratum_of = dict(zip(keys, strata))
        pool_strata = tuple(stratum_of[key] for key in pool)
    return ProbeSplit(name, shots, seed, tuple(pool), test, pool_strata)
