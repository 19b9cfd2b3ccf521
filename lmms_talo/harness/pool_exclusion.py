"""Pool exclusion for the bundled talo_* tasks: lmms-eval's own aggregate becomes the test score.

The TaLo adapter must see every doc of a sub-task (it probes the pool docs), so a talo_* task keeps
all of its docs. Each doc gets a mark (sub-task, position, stratum, probe unit); process_results carries the
mark on the doc's record, and the task's aggregation drops the probe-pool docs before calling the
benchmark's own aggregation on the rest.

The pool is the split the adapter published for the sub-task (lmms_talo.harness.evaluation_scope), so the two
cannot disagree. When no TaLo model ran (a plain model scored on the same test set), the split is
recomputed with the same function and inputs the adapter uses. Either way the split must follow the
task's probe protocol (shots, seed): the defaults below, or LMMS_TALO_SHOTS / LMMS_TALO_SEED.

A sub-task the adapter did not probe (fewer than k units, or a force_layer run) publishes a split
with no pool: the aggregate then counts every doc, as the report's test score does. A plain model
(no split published) is scored on the test set the protocol would give a probing run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmms_talo.harness import evaluation_scope
from lmms_talo.method.probe_split import ProbeSplit, split_subtask
from lmms_talo.method.subtasks import field_value, known_unit

DEFAULT_SHOTS = 10
DEFAULT_SEED = 0
SHOTS_ENV = "LMMS_TALO_SHOTS"
SEED_ENV = "LMMS_TALO_SEED"
MARK = "talo_doc"  # the doc field, and the record key, that carries a doc's mark


class TaskProtocolError(RuntimeError):
    """The probe split a talo_* task would evaluate on does not follow its declared protocol."""


def slug(value: Any) -> str:
    """'science & technology' -> 'science_technology': the category part of a sub-task name."""
    text = re.sub(r"[^0-9a-z]+", "_", str(value).lower()).strip("_")
    if not text:
        raise ValueError(f"category {value!r} gives an empty task-name part")
    return text


@dataclass(frozen=True)
class Protocol:
    shots: int
    seed: int
    source: str  # where the numbers came from, for error messages


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise TaskProtocolError(f"{name}={raw!r} is not an integer (e.g. {name}=15)") from None
    if name == SHOTS_ENV and value < 1:
        raise TaskProtocolError(f"{name} must be at least 1, got {value}")
    return value


def expected_protocol() -> Protocol:
    """The shots and seed every talo_* sub-task expects: LMMS_TALO_SHOTS / LMMS_TALO_SEED, else 10 / 0."""
    shots, seed = _env_int(SHOTS_ENV), _env_int(SEED_ENV)
    source = " and ".join(
        f"{name}={value}" for name, value in ((SHOTS_ENV, shots), (SEED_ENV, seed)) if value is not None
    )
    return Protocol(
        DEFAULT_SHOTS if shots is None else shots,
        DEFAULT_SEED if seed is None else seed,
        source or f"the talo_* default ({DEFAULT_SHOTS} shots, seed {DEFAULT_SEED}; no {SHOTS_ENV}/{SEED_ENV} set)",
    )


def check_protocol(split: ProbeSplit) -> None:
    """Refuse a split whose shots or seed differ from what the talo_* task expects."""
    expected = expected_protocol()
    if (split.shots, split.seed) == (expected.shots, expected.seed):
        return
    raise TaskProtocolError(
        f"{split.name}: the TaLo model probes with probe_shots={split.shots}, seed={split.seed}, but the "
        f"task expects shots={expected.shots}, seed={expected.seed} ({expected.source}). The test set "
        f"depends on both, so they must agree: run with {SHOTS_ENV}={split.shots} {SEED_ENV}={split.seed} "
        f"set in the environment, or with probe_shots={expected.shots},seed={expected.seed} in --model_args."
    )


def check_task_split(task, split: ProbeSplit) -> None:
    """For a talo_* task (one category per task): the adapter's split must be the task's own, by the
    task's protocol. Called by the adapter as soon as it splits, before any probing. Other tasks pass."""
    docs = getattr(getattr(task, "config", None), "process_docs", None)
    if not isinstance(docs, SubTaskDocs):
        return
    if split.name != docs.task:
        raise TaskProtocolError(
            f"{docs.task}: the TaLo model split it into {split.name!r}; talo_* tasks are one category each "
            f"and exclude the pool of the whole task: run them with granularity=auto (the default) or task."
        )
    check_protocol(split)


# --- docs ---


def without_media(dataset):
    """The dataset without its image and audio columns: reading its fields then decodes no media."""
    import datasets

    def is_media(feature) -> bool:
        if isinstance(feature, (datasets.Image, datasets.Audio)):
            return True
        inner = getattr(feature, "feature", None)  # Sequence(Image())
        return inner is not None and is_media(inner) or isinstance(feature, list) and any(map(is_media, feature))

    return dataset.remove_columns([name for name, feature in dataset.features.items() if is_media(feature)])


@dataclass(frozen=True)
class SubTaskDocs:
    """process_docs of one sub-task: keeps the docs whose `field` is one of `values` and marks them.

    The mark's index is the doc's position among the kept docs, which is lmms-eval's doc_id for the
    task; its stratum is the doc's `stratify_field` value and its unit the doc's probe unit (the
    benchmark's unit field, lmms_talo.method.subtasks.KNOWN_UNITS), as the adapter reads them.
    """

    task: str
    field: str
    values: tuple
    stratify_field: str | None = None

    def __call__(self, dataset):
        wanted = {str(v) for v in self.values}
        light = without_media(dataset)  # reading the fields must not decode every image
        keep = [i for i, doc in enumerate(light) if str(field_value(doc, self.field, self.task)) in wanted]
        if not keep:
            raise TaskProtocolError(
                f"{self.task}: no doc of the dataset has {self.field} in {list(self.values)}. Check the dataset "
                f"(`lmms-talo tasks --data ...` lists the categories it holds)."
            )
        marks = [self.mark(position, doc) for position, doc in enumerate(light.select(keep))]
        return dataset.select(keep).add_column(MARK, marks)

    def mark(self, position: int, doc: Mapping[str, Any]) -> dict:
        stratum = field_value(doc, self.stratify_field, self.task) if self.stratify_field else None
        unit_field = known_unit(self.task)
        unit = field_value(doc, unit_field, self.task) if unit_field else None
        return {
            "subtask": self.task,
            "index": position,
            "stratum": None if stratum is None else str(stratum),
            "unit": unit,
        }


# --- records ---


class MarkedScore(float):
    """A per-doc metric value that remembers its doc's mark (for metrics that are plain numbers)."""

    def __new__(cls, value: float, mark: dict):
        score = super().__new__(cls, value)
        score.mark = mark
        return score

    def __reduce__(self):  # lmms-eval gathers records across ranks with pickle
        return (MarkedScore, (float(self), self.mark))


def marked_results(process_results: Callable, metric: str) -> Callable:
    """A process_results that keeps only `metric` from the benchmark's own and marks its record."""

    def process(doc, results):
        value = process_results(doc, results)[metric]
        mark = doc[MARK]
        if isinstance(value, dict):
            return {metric: {**value, MARK: mark}}
        return {metric: MarkedScore(value, mark)}

    process.__name__ = f"talo_{getattr(process_results, '__name__', 'process_results')}"
    return process


def _mark_of(record) -> dict:
    mark = record.get(MARK) if isinstance(record, dict) else getattr(record, "mark", None)
    if mark is None:
        raise TaskProtocolError(
            "a talo_* aggregation got a record without its doc mark (was process_results replaced?)"
        )
    return mark


def _unmarked(record):
    if isinstance(record, dict):
        return {k: v for k, v in record.items() if k != MARK}
    return float(record)


# --- the split and the aggregation ---


def split_for(subtask: str, marks: Sequence[dict]) -> ProbeSplit:
    """The probe split of a sub-task: the adapter's published one, or the same split recomputed."""
    published = evaluation_scope.published(subtask)
    if published is None:
        others = [name for name in evaluation_scope.published_names() if name.startswith(f"{subtask}/")]
        if others:
            raise TaskProtocolError(
                f"{subtask}: the TaLo model split it by category ({others[0]}, ...), so its pool is not the "
                f"task's. talo_* tasks are one category each: run them with granularity=auto (the default) or task."
            )
        expected = expected_protocol()
        ordered = sorted(marks, key=lambda m: m["index"])
        keys = [m["index"] for m in ordered]
        strata = [m["stratum"] for m in ordered] if ordered and ordered[0]["stratum"] is not None else None
        units = [m["unit"] for m in ordered] if ordered and ordered[0].get("unit") is not None else None
        return split_subtask(subtask, keys, expected.shots, expected.seed, strata, units)
    check_protocol(published)
    return published


def records_outside_pool(records: Sequence) -> tuple[list, ProbeSplit]:
    """The records of the test docs (the pool's removed), unmarked, and the split they came from."""
    marks = [_mark_of(r) for r in records]
    names = {m["subtask"] for m in marks}
    if len(names) != 1:
        raise TaskProtocolError(f"a talo_* aggregation got records of several sub-tasks: {sorted(names)}")
    split = split_for(names.pop(), marks)
    pool = set(split.pool)
    return [_unmarked(r) for r, m in zip(records, marks) if m["index"] not in pool], split


def aggregate_test_docs(aggregate: Callable[[list], Any]) -> Callable[[list], Any]:
    """An aggregation that applies the benchmark's own `aggregate` to the test docs only."""

    def aggregation(records):
        kept, split = records_outside_pool(records)
        if not kept:
            raise TaskProtocolError(f"{split.name}: every doc is in the probe pool; nothing is left to evaluate")
        return aggregate(kept)

    aggregation.__name__ = f"talo_{getattr(aggregate, '__name__', 'aggregate')}"
    return aggregation
