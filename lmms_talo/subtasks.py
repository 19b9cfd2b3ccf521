"""Sub-tasks: the docs of a task that share one value of a category field.

The paper selects a layer per benchmark sub-category. Known benchmarks get their category and
stratification fields by default; any other task names them with `category_field` /
`stratify_field`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

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

_MMMU_ID = re.compile(r"^(?:validation|test|dev)_(.+)_\d+$")


def mmmu_subject(doc: Mapping[str, Any]) -> str:
    match = _MMMU_ID.match(str(doc["id"]))
    return match.group(1) if match else str(doc["id"])


# Derived fields: names that are computed from a doc rather than read from it.
DERIVED_FIELDS: dict[str, Callable[[Mapping[str, Any]], Any]] = {"mmmu_subject": mmmu_subject}


class CategoryFieldError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def known_fields(task_name: str) -> tuple[str, str | None] | None:
    for prefix in sorted(KNOWN_FIELDS, key=len, reverse=True):
        if task_name.startswith(prefix):
            return KNOWN_FIELDS[prefix]
    return None


def field_value(doc: Mapping[str, Any], field: str, task_name: str) -> Any:
    if field in DERIVED_FIELDS:
        return DERIVED_FIELDS[field](doc)
    if field not in doc:
        available = ", ".join(k for k in doc.keys() if not k.startswith("_"))
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


def resolve_fields(task_name: str, granularity: str, category_field: str | None, stratify_field: str | None, task=None):
    """The (category field, stratification field) for a task: model args, then the task config's
    declaration, then the known defaults of its benchmark."""
    declared = declared_fields(task)
    if stratify_field is None:
        stratify_field = declared.get("stratify_field")
    if category_field is None:
        category_field = declared.get("category_field")
    defaults = known_fields(task_name)
    if granularity == "task":
        return None, stratify_field
    category = category_field or (defaults[0] if defaults else None)
    if category is None:
        raise CategoryFieldError(
            f"granularity=category but task {task_name!r} has no known category field: set "
            f"category_field=<doc field>, or use granularity=task"
        )
    stratify = stratify_field if stratify_field is not None else (defaults[1] if defaults and not category_field else None)
    return category, stratify


def subtask_name(task_name: str, category: Any) -> str:
    return task_name if category is None else f"{task_name}/{category}"
