"""The probe protocol: which docs of a sub-task TaLo may look at, and which it must not.

A sub-task's *units* are split once, with a seed, into a *probe pool* (min(n // 3, 4k) units) and a
*test set* (every other unit). A unit is one doc, or, where a benchmark stores one question as
several rows (MMBench's rotated options), all rows of that question: a question never straddles
pool and test set, and k counts questions. The pool is excluded from the test set as a whole, so no
doc the selection could have seen is ever counted in a test score.

Probe rounds follow the authors' `probe_target_layer_vlmeval_enhanced` (talo/probe_layer.py):
  round 0   k pool units (the whole pool when it holds fewer than k);
  perfect   round 0's baseline is 1.0: redraw k units from the pool units not used yet, round 0's
            layers unswept;
  no gain   a swept round with no layer over the threshold: redraw k + r + 1 unused units (r = the
            redraws so far, the perfect-baseline redraw included), never more than remain;
  stop      when fewer than k unused units remain, or after MAX_REDRAWS redraws (6 rounds).
Each round's draw is seeded by (seed, sub-task, round index) and stratified like the pool, so the
rounds are a pure function of the split and of which rounds were perfect or gained nothing.

A sub-task with fewer than k units, or an empty pool, is not probed: its split has no pool and
says why (`unprobed`); the caller answers it with the full model.

The split is a pure function of (doc keys in dataset order, strata, units, k, seed, sub-task name):
the adapter and the bundled task configs call the same function and therefore agree on the pool.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

POOL_SHOTS_FACTOR = 4  # pool = min(n // 3, 4 k), as the authors' code draws it
POOL_FRACTION_DIVISOR = 3
MAX_REDRAWS = 5  # the authors' max_resample_rounds: 6 rounds in all

FIRST_DRAW = "first draw"


class ProbeSplitError(ValueError):
    """The sub-task cannot give the requested probe set."""


def pool_size(n_units: int, shots: int) -> int:
    return min(n_units // POOL_FRACTION_DIVISOR, POOL_SHOTS_FACTOR * shots)


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
class ProbeRound:
    """One round's probe units and why they were drawn."""

    index: int
    docs: tuple
    why: str


@dataclass(frozen=True)
class ProbeSplit:
    """The seeded split of one sub-task: pool and test are doc keys; the rounds draw pool units."""

    name: str
    shots: int
    seed: int
    pool: tuple  # doc keys of the pool units
    test: tuple  # every other doc key, in dataset order
    pool_units: tuple  # the pool's units (== pool when each doc is its own unit)
    pool_strata: tuple | None  # one per pool unit
    unit_docs: dict | None = None  # unit -> its doc keys; None: each doc is its own unit
    unprobed: str | None = None  # why this sub-task is not probed (then the pool is empty)

    def docs_of(self, unit: Hashable) -> tuple:
        return (unit,) if self.unit_docs is None else self.unit_docs[unit]

    def first_round(self) -> ProbeRound:
        size = min(self.shots, len(self.pool_units))  # a pool smaller than k is probed whole
        docs = stratified_sample(self.pool_units, size, _rng(self.seed, self.name, "probe-round-0"), self.pool_strata)
        return ProbeRound(0, tuple(docs), FIRST_DRAW)

    def _unused(self, rounds: Sequence[ProbeRound]) -> list[int]:
        used = {unit for r in rounds for unit in r.docs}
        return [i for i, unit in enumerate(self.pool_units) if unit not in used]

    def unused_units(self, rounds: Sequence[ProbeRound]) -> list:
        """The pool units no round in `rounds` used, in pool order (select_rule=confirm's docs)."""
        return [self.pool_units[i] for i in self._unused(rounds)]

    def no_redraw(self, rounds: Sequence[ProbeRound], max_redraws: int = MAX_REDRAWS) -> str | None:
        """Why no further round can be drawn after `rounds`, or None when one can."""
        if len(rounds) - 1 >= max_redraws:
            return f"{max_redraws} redraws made (the authors' limit is {MAX_REDRAWS})"
        unused = len(self._unused(rounds))
        if unused < self.shots:
            return f"{unused} unused pool units remain, fewer than probe_shots={self.shots}"
        return None

    def redraw(self, rounds: Sequence[ProbeRound], baseline_perfect: bool) -> ProbeRound:
        """The next round from the pool units not used yet: k after a perfect round-0 baseline,
        else k + r + 1 (r = redraws so far), never more than remain. Check no_redraw first."""
        unused = self._unused(rounds)
        last = rounds[-1].index
        redraws = len(rounds) - 1
        size = self.shots if baseline_perfect else min(self.shots + redraws + 1, len(unused))
        strata = None if self.pool_strata is None else [self.pool_strata[i] for i in unused]
        units = [self.pool_units[i] for i in unused]
        docs = stratified_sample(units, size, _rng(self.seed, self.name, f"probe-round-{last + 1}"), strata)
        why = f"baseline perfect on round {last}" if baseline_perfect else f"no positive gain on round {last}"
        return ProbeRound(last + 1, tuple(docs), why)


def _units_in_order(keys: Sequence[Hashable], units: Sequence[Hashable] | None) -> dict | None:
    if units is None:
        return None
    if len(units) != len(keys):
        raise ProbeSplitError("units must give one value per doc")
    members: dict = defaultdict(list)
    for key, unit in zip(keys, units):
        members[unit].append(key)
    return {unit: tuple(docs) for unit, docs in members.items()}


def unprobed_split(name: str, keys: Sequence[Hashable], shots: int, seed: int, why: str) -> ProbeSplit:
    """A sub-task TaLo does not probe: no pool, every doc a test doc, and the reason."""
    return ProbeSplit(name, shots, seed, (), tuple(keys), (), None, None, why)


def split_subtask(
    name: str,
    keys: Sequence[Hashable],
    shots: int,
    seed: int,
    strata: Sequence[Hashable] | None = None,
    units: Sequence[Hashable] | None = None,
) -> ProbeSplit:
    """Split one sub-task's docs (keys in dataset order) into probe pool and test set, by unit
    (`units`: one value per doc, docs sharing it are one question; None: each doc is a unit)."""
    if shots < 1:
        raise ProbeSplitError(f"probe_shots must be at least 1, got {shots}")
    if strata is not None and len(strata) != len(keys):
        raise ProbeSplitError("strata must give one value per doc")
    if len(set(keys)) != len(keys):
        raise ProbeSplitError(f"sub-task {name!r} has repeated doc keys")
    unit_docs = _units_in_order(keys, units)
    unit_keys = list(keys) if unit_docs is None else list(unit_docs)
    noun = "docs" if unit_docs is None else "questions"
    if len(unit_keys) < shots:
        why = f"{len(unit_keys)} {noun}, fewer than probe_shots={shots}: answered by the full model"
        return unprobed_split(name, keys, shots, seed, why)
    size = pool_size(len(unit_keys), shots)
    if size == 0:
        why = (
            f"{len(unit_keys)} {noun}: the probe pool (n // {POOL_FRACTION_DIVISOR}) is empty; "
            "answered by the full model"
        )
        return unprobed_split(name, keys, shots, seed, why)
    unit_strata = None
    if strata is not None:
        stratum_of = dict(zip(keys, strata))
        unit_strata = [stratum_of[key if unit_docs is None else unit_docs[key][0]] for key in unit_keys]
    pool_units = stratified_sample(unit_keys, size, _rng(seed, name, "pool"), unit_strata)
    pool = [doc for unit in pool_units for doc in ((unit,) if unit_docs is None else unit_docs[unit])]
    pool_set = set(pool)
    test = tuple(key for key in keys if key not in pool_set)
    pool_strata = None
    if unit_strata is not None:
        stratum_of_unit = dict(zip(unit_keys, unit_strata))
        pool_strata = tuple(stratum_of_unit[unit] for unit in pool_units)
    return ProbeSplit(name, shots, seed, tuple(pool), test, tuple(pool_units), pool_strata, unit_docs)
