"""The sweep's engines: batched (many probe docs per harness call, the default) or sequential (one
doc per call), and the batched engine's run-time check against the sequential one.

The batched engine hands a round's probe docs to the harness in one call per variant, so the
harness's own batching (its batch_size) packs their requests into rows of one model call. Batched
kernels may round differently from batch-1 ones (padding, other matmul shapes), so before a sweep
runs any knockout batched it runs one knockout variant over the first round's docs both ways and
compares every doc's probe score (and the rule's statistic, with select_stat=margin). Any
difference puts the sub-task on the sequential engine (its batched base scores computed again),
with one warning and a line in the report; bit-identity of the answers is measured and reported beside it, not required.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from lmms_talo.logs import log


@dataclass
class SweepEngine:
    """Which engine a sweep runs, why, and what its self-check found (the report's `sweep_engine`)."""

    batched: bool
    why: str
    docs_per_call: int = 1  # sweep=select's chunk of docs per call; full and screen run a whole round
    check: dict = field(default_factory=dict)  # the self-check's counts, once run
    fallback: str | None = None  # why the batched engine stepped aside, if it did

    @classmethod
    def choose(cls, wanted: bool, batch_size: int, docs_per_call: int, blocker: str | None = None) -> SweepEngine:
        """The batched engine where it can help and apply, else the sequential one with the reason."""
        if not wanted:
            return cls(False, "sweep_batch=false")
        if blocker:
            return cls(False, blocker)
        if batch_size <= 1:
            return cls(
                False,
                "the harness answers one request per model call (batch_size=1): give batch_size=N in "
                "--model_args to batch probe docs",
            )
        return cls(True, f"the harness batches up to {batch_size} requests per model call", max(1, docs_per_call))

    def fall_back(self, reason: str) -> None:
        if self.batched:
            log.warning("lmms-talo: the batched sweep steps aside for this sub-task: %s; it runs doc by doc", reason)
        self.batched = False
        self.fallback = reason

    def to_report(self) -> dict:
        return {
            "engine": "batched" if self.batched else "sequential",
            "why": f"fell back: {self.fallback}" if self.fallback else self.why,
            "docs_per_call": self.docs_per_call if self.batched else 1,
            "check": dict(self.check),
        }


Outputs = Mapping[Hashable, tuple[float, list]]  # doc -> (score, responses)


def compare_engines(
    label: str,
    batched: Outputs,
    sequential: Outputs,
    statistic: Callable[[Hashable, list], float] | None,
) -> tuple[dict, str | None]:
    """The self-check's counts, and why the engines disagree (None when every doc's score, and
    statistic, is identical). repr compares answers bit for bit (floats print exactly; NaN equals NaN)."""
    docs: Sequence[Hashable] = list(sequential)
    same_bits = [d for d in docs if repr(batched[d][1]) == repr(sequential[d][1])]
    differs = [d for d in docs if batched[d][0] != sequential[d][0]]
    if statistic is not None:
        differs += [
            d
            for d in docs
            if d not in differs and repr(statistic(d, batched[d][1])) != repr(statistic(d, sequential[d][1]))
        ]
    counts = {
        "variant": str(label),
        "docs": len(docs),
        "bit_identical": len(same_bits),
        "same_score": len(docs) - len(differs),
    }
    if not differs:
        return counts, None
    doc = differs[0]
    return counts, (
        f"knockout {label} on probe doc {doc} scored {batched[doc][0]!r} batched and {sequential[doc][0]!r} one "
        f"doc per call ({len(differs)} of {len(docs)} docs differ)"
    )
