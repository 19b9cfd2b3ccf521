"""Sub-tasks: the docs of a task that share one value of a category field; probe units.

The paper selects a layer per benchmark sub-category. Known benchmarks get their category and
stratification fields by default, and granularity=auto (the default) groups them by category; any
other task is one sub-task unless it names a `category_field`. A task config can declare its fields:
`metadata: {talo: {category_field, stratify_field, unit_field}}` (a config that also declares
`category: <value>` is already one category, so auto treats it as one sub-task).

A probe *unit* is what the split and the probe count: one doc, or, with a unit field, all docs that
share its value (MMBench stores each question once per rotation of its options: the question,
`index % 1_000_000`, is the unit, scored right only if every rotation is).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# task-name prefix -> (category field, stratification field or None)
KNOWN_FIELDS: dict[str, tuple[str, str | None]] = {
    "mmstar": ("category", "l2_category"),
    "talo_mmstar": ("category", "l2_category"),
    "mmbench": ("category", None),
    "talo_mmbench": ("category", None),
    "scienceqa": ("category", None),
    "talo_scienceqa": ("category", None),
    "seedbench": ("question_type_id", None),
    "talo_seedbench": ("question_type_id", None),
    "mmmu": ("mmmu_subject", None),
    "talo_mmmu": ("mmmu_subject", None),
}

# task-name prefix -> unit field (docs sharing its value are one probe unit)
KNOWN_UNITS: dict[str, str] = {"mmbench": "mmbench_question", "talo_mmbench": "mmbench_question"}

# task-name prefix -> (the report figure that compares with the paper's, why): the authors report
# VLMEvalKit's Overall, plain accuracy over docs (docs/method.md, "Fidelity to the authors' code").
PAPER_FIGURES: dict[str, tuple[str, str]] = {
    "mmstar": ("doc_mean", "VLMEvalKit's Overall is plain accuracy; lmms-eval's score averages the l2 categories"),
    "talo_mmstar": ("doc_mean", "VLMEvalKit's Overall is plain accuracy; lmms-eval's score averages the l2 categories"),
    "mmbench": ("score", "circular accuracy over questions, in percent (talo_mmbench_en_dev)"),
    "talo_mmbench": ("score", "circular accuracy over questions, in percent"),
    "mmmu": ("score", "accuracy over docs (equals doc_mean)"),
    "talo_mmmu": ("score", "accuracy over docs (equals doc_mean)"),
    "scienceqa": ("score", "accuracy over docs (equals doc_mean)"),
    "talo_scienceqa": ("score", "accuracy over docs (equals doc_mean)"),
    "seedbench": ("score", "accuracy over docs (equals doc_mean)"),
    "talo_seedbench": ("score", "accuracy over docs (equals doc_mean)"),
}

MMBENCH_ROTATION = 1_000_000  # MMBench's rotated copies of question i have index i + r * 1_000_000

_MMMU_ID = re.compile(r"^(?:validation|test|dev)_(.+)_\d+$")


def mmmu_subject(doc: Mapping[str, Any]) -> str:
    match = _MMMU_ID.match(str(doc["id"]))
    return match.group(1) if match else str(doc["id"])


def mmbench_question(doc: Mapping[str, Any]) -> int:
    return int(doc["index"]) % MMBENCH_ROTATION


# Derived fields: names that are computed from a doc rather than read from it.
DERIVED_FIELDS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "mmmu_subject": mmmu_subject,
    "mmbench_question": mmbench_question,
}


class CategoryFieldError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _by_prefix(table: dict, task_name: str):
    for prefix in sorted(table, key=len, reverse=True):
        if task_name.startswith(prefix):
            return table[prefix]
    return None


def known_fields(task_name: str) -> tuple[str, str | None] | None:
    return _by_prefix(KNOWN_FIELDS, task_name)


def paper_figure(task_name: str) -> dict | None:
    """Which report figure of a paper benchmark compares with the paper's table, and why."""
    known = _by_prefix(PAPER_FIGURES, task_name)
    return {"field": known[0], "why": known[1]} if known else None


def known_unit(task_name: str) -> str | None:
    return _by_prefix(KNOWN_UNITS, task_name)


def field_value(doc: Mapping[str, Any], field: str, task_name: str) -> Any:
    if field in DERIVED_FIELDS:
        return DERIVED_FIELDS[field](doc)
    if field not in doc:
        available = ", ".join(k for k in doc if not k.startswith("_"))
        raise CategoryFieldError(
            f"task {task_name!r}: its docs have no field {field!r}. Set category_field (or "
            f"stratify_field) to one of: {available}; or use granularity=task"
        )
    value = doc[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CategoryFieldError(
            f"task {task_name!r}: a doc has an empty {field!r} value; choose another category_field "
            f"or use granularity=task"
        )
    return value


def declared_fields(task) -> dict:
    """Fields a task config declares for TaLo: `metadata: {talo: {category_field, stratify_field}}`."""
    metadata = getattr(getattr(task, "config", None), "metadata", None) or {}
    return dict(metadata.get("talo") or {}) if isinstance(metadata, dict) else {}


@dataclass(frozen=True)
class TaskFields:
    """How one task is cut into sub-tasks and probe units, and why (for the log)."""

    granularity: str  # task | category (auto resolved)
    why: str
    category: str | None
    stratify: str | None
    unit: str | None


def _auto_granularity(task_name: str, category_field: str | None, declared: dict) -> tuple[str, str]:
    if "category" in declared:
        return "task", f"its config is the single category {declared['category']!r}"
    if category_field:
        return "category", f"category_field={category_field}"
    if known_fields(task_name):
        return "category", f"a known benchmark: the paper's unit is its category ({known_fields(task_name)[0]})"
    return "task", "no known category field (set category_field=... to probe per category)"


def resolve_fields(
    task_name: str, granularity: str, category_field: str | None, stratify_field: str | None, task=None
) -> TaskFields:
    """The granularity and the (category, stratification, unit) fields of a task: model args, then the
    task config's declaration, then the known defaults of its benchmark."""
    declared = declared_fields(task)
    unit = declared.get("unit_field") or known_unit(task_name)
    if stratify_field is None:
        stratify_field = declared.get("stratify_field")
    if category_field is None:
        category_field = declared.get("category_field")
    if granularity == "auto":
        granularity, why = _auto_granularity(task_name, category_field, declared)
    else:
        why = f"granularity={granularity}"
    defaults = known_fields(task_name)
    if granularity == "task":
        return TaskFields("task", why, None, stratify_field, unit)
    category = category_field or (defaults[0] if defaults else None)
    if category is None:
        raise CategoryFieldError(
            f"granularity=category but task {task_name!r} has no known category field: set "
            f"category_field=<doc field>, or use granularity=task"
        )
    stratify = (
        stratify_field if stratify_field is not None else (defaults[1] if defaults and not category_field else None)
    )
    return TaskFields("category", why, category, stratify, unit)


def subtask_name(task_name: str, category: Any) -> str:
    return task_name if category is None else f"{task_name}/{category}"
