"""`lmms-talo tasks`: the bundled talo_* tasks, their categories and, where the data is at hand, their sizes."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter

from lmms_talo.commands.tasks_path_command import add_data_argument

HELP = "list the bundled talo_* tasks with their categories (and sizes, from local data or the HF cache)"
SHOTS = (10, 15, 20)  # the paper's probe-set sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmarks", nargs="*", help="benchmarks to list (default: all), e.g. mmstar seedbench")
    add_data_argument(parser)
    parser.add_argument(
        "--sizes", action="store_true", help="count docs per sub-task from the local HF cache (offline)"
    )


@contextlib.contextmanager
def _offline():
    """Read the HF cache only: a listing must never start a download."""
    import datasets
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _load(bench, local: str | None):
    """The benchmark's evaluation split, from local parquet or the HF cache; (dataset, None) or (None, why)."""
    import datasets

    from lmms_talo.task_configs.generate import _builtin_tasks_dir, _load_builtin, _local_data

    try:
        if local is not None:
            return datasets.load_dataset("parquet", data_files={"eval": _local_data(local)}, split="eval"), None
        builtin = _load_builtin(_builtin_tasks_dir() / bench.builtin_yaml)
        with _offline():
            return datasets.load_dataset(
                builtin["dataset_path"], builtin.get("dataset_name"), split=builtin["test_split"]
            ), None
    except Exception as exc:  # not cached, or unreadable: the listing goes on without sizes
        where = (
            "the local data"
            if local is not None
            else (f"the HF cache (pre-fetch it, or pass --data {bench.data_name}=PATH)")
        )
        return None, f"cannot read {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _counts(bench, dataset) -> Counter:
    from lmms_talo.harness.pool_exclusion import without_media
    from lmms_talo.method.subtasks import field_value

    return Counter(str(field_value(doc, bench.field, bench.group)) for doc in without_media(dataset))


def _fits(n: int) -> str:
    from lmms_talo.method.probe_split import pool_size

    ok = [str(k) for k in SHOTS if pool_size(n, k) >= k]
    return ",".join(ok) if ok else "none"


def run(args: argparse.Namespace) -> int:
    from lmms_talo.task_configs.benchmarks import BENCHMARKS, benchmark
    from lmms_talo.task_configs.generate import parse_data

    try:
        data = parse_data(args.data)
        chosen = [benchmark(name) for name in args.benchmarks] or list(BENCHMARKS)
    except (KeyError, ValueError) as exc:
        print(f"lmms-talo tasks: {exc}", file=sys.stderr)
        return 2
    for bench in chosen:
        counts, why = None, None
        if args.sizes or bench.data_name in data:
            dataset, why = _load(bench, data.get(bench.data_name))
            counts = _counts(bench, dataset) if dataset is not None else None
        print(f"{bench.group}  [{bench.dataset}; {bench.field}; scoring: {bench.scoring}]")
        if why:
            print(f"  (no sizes: {why})")
        for task, category, values in bench.subtasks():
            line = f"  {task:58} {category}"
            if counts is not None:
                n = sum(counts.get(str(v), 0) for v in values)
                line += f"  n={n}  shots: {_fits(n)}"
            print(line)
        if counts is not None:
            covered = {str(v) for _, _, values in bench.subtasks() for v in values}
            missing = sorted(k for k in counts if k not in covered)
            if missing:
                print("  not covered by a sub-task: " + ", ".join(f"{k} (n={counts[k]})" for k in missing))
    return 0
