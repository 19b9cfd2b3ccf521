"""The probe splits TaLo used in this process, keyed by sub-task name.

Tasks that exclude the probe pool from their own aggregate (the bundled talo_* configs) read the
pool from here, so the task and the adapter cannot disagree about which docs were probed.
"""

from __future__ import annotations

from .probe import ProbeSplit

SPLITS: dict[str, ProbeSplit] = {}


def publish(split: ProbeSplit) -> None:
    SPLITS[split.name] = split


def published(name: str) -> ProbeSplit | None:
    return SPLITS.get(name)
