"""`lmms-talo tasks-path`: the folder of the bundled talo_* task configs, for lmms-eval's --include_path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "tasks-path"
HELP = "print the folder of the bundled talo_* task configs (for lmms-eval --include_path)"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        metavar="BENCH=PATH",
        help="load benchmark BENCH (e.g. mmstar, mmbench_en_dev, mmmu_val, scienceqa_img, seedbench) from local "
        "parquet (a file, a folder of them, or a glob) instead of the Hugging Face dataset; repeatable",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_argument(parser)
    parser.add_argument(
        "--out", type=Path, help="with --data: write the configs here (default: a new temporary folder)"
    )


def run(args: argparse.Namespace) -> int:
    from lmms_talo.task_configs.generate import bundled_folder, folder_for, parse_data, write

    try:
        data = parse_data(args.data)
    except (KeyError, ValueError) as exc:
        print(f"lmms-talo tasks-path: {exc}", file=sys.stderr)
        return 2
    if args.out is not None and not data:
        print(
            "lmms-talo tasks-path: --out only applies with --data (the bundled folder is printed as is)",
            file=sys.stderr,
        )
        return 2
    try:
        folder = write(args.out, data) if args.out is not None else folder_for(data) if data else bundled_folder()
    except FileNotFoundError as exc:
        print(f"lmms-talo tasks-path: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0
