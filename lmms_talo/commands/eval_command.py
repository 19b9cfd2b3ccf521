"""`lmms-talo eval <lmms-eval args>`: lmms-eval's evaluation with the bundled talo_* tasks on its include path.

It runs in this process (so `accelerate launch -m lmms_talo eval ...` works as with lmms-eval).
`--talo_data BENCH=PATH` (repeatable) loads a benchmark from local parquet instead of the hub; an
--include_path of your own is kept beside the bundled one.
"""

from __future__ import annotations

import argparse
import shutil
import sys

HELP = "run lmms-eval with the bundled talo_* tasks (args go to lmms-eval; --talo_data BENCH=PATH for local data)"
PASSTHROUGH = True


def _take(argv: list[str], option: str) -> tuple[list[str], list[str]]:
    """Remove every `option VALUE` / `option=VALUE` from argv: (values, the rest)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == option:
            if i + 1 >= len(argv):
                raise ValueError(f"{option} needs a value")
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(option + "="):
            values.append(arg[len(option) + 1 :])
        else:
            rest.append(arg)
        i += 1
    return values, rest


def run(argv: list[str]) -> int:
    from lmms_talo.task_configs.generate import bundled_folder, folder_for, parse_data

    try:
        data_items, rest = _take(list(argv), "--talo_data")
        user_paths, rest = _take(rest, "--include_path")
        data = parse_data(data_items)
        folder = folder_for(data)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"lmms-talo eval: {exc}", file=sys.stderr)
        return 2
    from lmms_eval.__main__ import cli_evaluate

    argv_before = sys.argv
    sys.argv = ["lmms-eval", *rest]
    try:
        cli_evaluate(argparse.Namespace(include_path=[*user_paths, str(folder)]))
    finally:
        sys.argv = argv_before
        if folder != bundled_folder():
            shutil.rmtree(folder, ignore_errors=True)
    return 0
