"""`lmms-talo analyze RUN...`: the analysis (tables, paper-style figures, statistics) of TaLo runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = (
    "analyse TaLo runs (talo_report.json files, folders holding them, or probe logs *_talo_probe*.jsonl, "
    "re-decided from their per-pass scores) into report.md, report.html and figures"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        help=(
            "talo_report.json files, folders searched for them, or probe logs "
            "(*_talo_probe*.jsonl beside the harness's sample files)"
        ),
    )
    parser.add_argument("-o", "--output", default="talo_analysis", help="folder to write into (default: talo_analysis)")
    parser.add_argument("--clusters", type=int, default=3, help="flat clusters cut from the dendrogram (default 3)")
    parser.add_argument(
        "--resamples",
        type=int,
        default=200,
        help="bootstrap resamples of the probe docs for cluster stability and selection robustness (default 200)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")


def run(args: argparse.Namespace) -> int:
    from lmms_talo.analysis.build import AnalysisOptions, write_analysis
    from lmms_talo.outputs.report_reader import ReportError

    if args.clusters < 2:
        print("lmms-talo analyze: --clusters must be at least 2", file=sys.stderr)
        return 2
    if args.resamples < 1:
        print("lmms-talo analyze: --resamples must be at least 1", file=sys.stderr)
        return 2
    try:
        path = write_analysis(args.runs, Path(args.output), AnalysisOptions(args.clusters, args.resamples, args.seed))
    except ReportError as exc:
        print(f"lmms-talo analyze: {exc}", file=sys.stderr)
        return 2
    written = sorted(p.name for p in path.parent.iterdir())
    print(f"lmms-talo analyze: wrote {path.parent}: {', '.join(written)}")
    return 0
