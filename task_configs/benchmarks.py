"""The paper's benchmarks as TaLo sub-tasks: one lmms-eval task per category, grouped per benchmark.

This table is the single source of the bundled configs: generate.py writes the YAMLs from it, and
the YAMLs' process_docs / process_results / aggregation are the callables defined at the bottom of
this module (`!function lmms_talo.task_configs.benchmarks.<name>`). Prompts, answer extraction and
scoring stay lmms-eval's own: each benchmark names the built-in task YAML it copies them from and
the built-in functions it wraps.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmms_talo.harness.pool_exclusion import SubTaskDocs, aggregate_test_docs, marked_results, slug


@dataclass(frozen=True)
class Benchmark:
    group: str  # the lmms-eval group, and the prefix of its sub-task names
    folder: str  # its folder under task_configs/
    builtin_yaml: str  # the built-in task it reuses, relative to lmms_eval/tasks/
    dataset: str  # as `datasets.load_dataset` names it, for the docs
    field: str  # the doc field (or derived field) that defines a sub-task
    categories: tuple  # (category name, values of `field` it covers), in the benchmark's order
    stratify_field: str | None  # the secondary field the probe pool is stratified by
    metric: str  # the built-in metric the sub-tasks report
    process_results: str  # dotted path of the built-in process_results
    aggregation: str  # dotted path of the built-in (or rule-based) aggregation of `metric`
    max_new_tokens: int  # cap on generated tokens: no probe generates lmms-eval's default 1024
    scoring: str  # one line for the docs
    data: str = ""  # the name `--data NAME=PATH` gives its dataset (default: the folder); shared datasets share it

    @property
    def data_name(self) -> str:
        return self.data or self.folder

    def subtasks(self) -> list[tuple[str, str, tuple]]:
        """(task name, category name, values) per sub-task."""
        return [(f"{self.group}_{slug(name)}", name, values) for name, values in self.categories]


def _each(*names) -> tuple:
    return tuple((name, (name,)) for name in names)


MMSTAR = Benchmark(
    group="talo_mmstar",
    folder="mmstar",
    builtin_yaml="mmstar/mmstar.yaml",
    dataset="Lin-Chen/MMStar (val)",
    field="category",
    categories=_each(
        "coarse perception",
        "fine-grained perception",
        "instance reasoning",
        "logical reasoning",
        "science & technology",
        "math",
    ),
    stratify_field="l2_category",
    metric="average",
    process_results="lmms_eval.tasks.mmstar.utils.mmstar_process_results",
    aggregation="lmms_eval.tasks.mmstar.utils.mmstar_aggregate_results",
    max_new_tokens=16,
    scoring="letter match; mean over l2 categories (mmstar's `average`)",
)

MMBENCH_EN_DEV = Benchmark(
    group="talo_mmbench_en_dev",
    folder="mmbench_en_dev",
    builtin_yaml="mmbench/mmbench_en_dev_static.yaml",
    dataset="lmms-lab-encoder/MMBench (en, dev)",
    field="category",
    categories=_each(
        "image_style",
        "image_scene",
        "image_emotion",
        "image_quality",
        "image_topic",
        "object_localization",
        "attribute_recognition",
        "celebrity_recognition",
        "ocr",
        "spatial_relationship",
        "attribute_comparison",
        "action_recognition",
        "physical_property_reasoning",
        "function_reasoning",
        "identity_reasoning",
        "social_relation",
        "physical_relation",
        "nature_relation",
        "structuralized_imagetext_understanding",
        "future_prediction",
    ),
    stratify_field=None,
    metric="gpt_eval_score",
    process_results="lmms_eval.tasks.mmbench.en_utils.mmbench_process_results",
    aggregation="lmms_talo.task_configs.benchmarks.mmbench_static_accuracy",
    max_new_tokens=16,
    scoring="rule-based option extraction, circular over the test rows (mmbench_en_dev_static; no GPT judge)",
)

MMMU_SUBJECTS = {  # MMMU's disciplines and their subjects (as in lmms-eval's mmmu utils)
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}

_MMMU_COMMON = dict(
    builtin_yaml="mmmu/mmmu_val.yaml",
    dataset="lmms-lab-encoder/MMMU (validation)",
    field="mmmu_subject",
    metric="mmmu_acc",
    process_results="lmms_eval.tasks.mmmu.utils.mmmu_process_results",
    aggregation="lmms_eval.tasks.mmmu.utils.mmmu_aggregate_results",
    max_new_tokens=128,  # open questions answer in words; lmms-eval's mmmu template uses 128 too
    scoring="MMMU option / open-answer parsing (mmmu_val)",
)

MMMU_VAL = Benchmark(
    group="talo_mmmu_val",
    folder="mmmu_val",
    categories=_each(*(s for subjects in MMMU_SUBJECTS.values() for s in subjects)),
    stratify_field=None,
    **_MMMU_COMMON,
)

MMMU_VAL_DISCIPLINE = Benchmark(  # 120-210 docs each: room for 15 and 20 shots (subjects have 30)
    group="talo_mmmu_val_discipline",
    folder="mmmu_val_discipline",
    categories=tuple(MMMU_SUBJECTS.items()),
    stratify_field="mmmu_subject",
    data="mmmu_val",
    **_MMMU_COMMON,
)

SCIENCEQA_IMG = Benchmark(
    group="talo_scienceqa_img",
    folder="scienceqa_img",
    builtin_yaml="scienceqa/scienceqa_img.yaml",
    dataset="lmms-lab-encoder/ScienceQA (ScienceQA-IMG, test)",
    field="category",
    categories=_each(
        "Geography",
        "State capitals",
        "Oceans and continents",
        "Oceania: geography",
        "The Americas: geography",
        "Physical Geography",
        "Magnets",
        "Velocity, acceleration, and forces",
        "Particle motion and energy",
        "Solutions",
        "Materials",
        "Atoms and molecules",
        "Adaptations",
        "Classification",
        "Scientific names",
        "Heredity",
        "Weather and climate",
        "Designing experiments",
        "Engineering practices",
        "Basic economic principles",
        "Ecosystems",
        "Ecological interactions",
        "Colonial America",
        "Rocks and minerals",
    ),
    stratify_field=None,
    metric="exact_match",
    process_results="lmms_eval.tasks.scienceqa.utils.sqa_process_results",
    aggregation="lmms_eval.api.metrics.mean",
    max_new_tokens=16,
    scoring="option letter match (scienceqa_img), mean",
)

SEED_IMAGE_TYPES = {  # SEED-Bench question_type_id of the nine image dimensions
    "scene understanding": 1,
    "instance identity": 2,
    "instance attributes": 3,
    "instance location": 4,
    "instances counting": 5,
    "spatial relation": 6,
    "instance interaction": 7,
    "visual reasoning": 8,
    "text understanding": 9,
}

SEEDBENCH = Benchmark(
    group="talo_seedbench",
    folder="seedbench",
    builtin_yaml="seedbench/seedbench.yaml",
    dataset="lmms-lab-encoder/SEED-Bench (test, image questions)",
    field="question_type_id",
    categories=tuple((name, (type_id,)) for name, type_id in SEED_IMAGE_TYPES.items()),
    stratify_field=None,
    metric="seed_all",
    process_results="lmms_eval.tasks.seedbench.utils.seed_process_result",
    aggregation="lmms_eval.tasks.seedbench.utils.seed_aggregation_result",
    max_new_tokens=16,
    scoring="first letter of the answer (seedbench), accuracy",
)

BENCHMARKS: tuple[Benchmark, ...] = (MMSTAR, MMBENCH_EN_DEV, MMMU_VAL, MMMU_VAL_DISCIPLINE, SCIENCEQA_IMG, SEEDBENCH)


def benchmark(name: str) -> Benchmark:
    """A benchmark by its group name or folder name."""
    for bench in BENCHMARKS:
        if name in (bench.group, bench.folder):
            return bench
    known = ", ".join(b.folder for b in BENCHMARKS)
    raise KeyError(f"no bundled benchmark {name!r}; the benchmarks are: {known}")


def data_name(name: str) -> str:
    """The dataset name (for `--data NAME=PATH`) of a benchmark or dataset name."""
    names = {b.data_name for b in BENCHMARKS}
    if name in names:
        return name
    try:
        return benchmark(name).data_name
    except KeyError:
        raise KeyError(f"no bundled benchmark {name!r}; the datasets are: {', '.join(sorted(names))}") from None


# --- the callables the YAMLs reference ---


def _builtin(path: str) -> Callable:
    """The function at a dotted path, imported on first call (lmms-eval task utils import heavily)."""
    module_name, _, attribute = path.rpartition(".")
    resolved: list[Callable] = []

    def call(*args, **kwargs) -> Any:
        if not resolved:
            resolved.append(getattr(importlib.import_module(module_name), attribute))
        return resolved[0](*args, **kwargs)

    call.__name__ = attribute
    return call


def mmbench_static_accuracy(records: list) -> float:
    """mmbench_en_dev_static's score (rule-based, circular), without its per-run result file."""
    from lmms_eval.tasks.mmbench.en_utils import mmbench_evaluator

    overall, _, _ = mmbench_evaluator.eval_result(records, eval_method="static")
    return overall * 100


def _callables() -> dict[str, Callable]:
    found: dict[str, Callable] = {}
    for bench in BENCHMARKS:
        found[f"{bench.group}_process_results"] = marked_results(_builtin(bench.process_results), bench.metric)
        found[f"{bench.group}_aggregation"] = aggregate_test_docs(_builtin(bench.aggregation))
        for task, _, values in bench.subtasks():
            found[task] = SubTaskDocs(task, bench.field, values, bench.stratify_field)
    return found


# process_docs of each sub-task (named after the task), process_results and aggregation of each benchmark.
globals().update(_callables())
