"""`lmms-talo demo`: TaLo on SmolLM2-135M-Instruct and BIG-bench tasks, and on the easy-VQA LLaVA and
easy-VQA questions, on a CPU (see lmms_talo.demo.driver)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = (
    "TaLo on real models (SmolLM2-135M-Instruct; a LLaVA of it with a vision adapter trained on easy-VQA) and real "
    "data (BIG-bench, easy-VQA), offline after a one-time download"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmms_talo.demo.driver import DEFAULT_ROUNDS, DEFAULT_SHOTS, DEFAULT_TASKS
    from lmms_talo.demo.vlm_demo import QUESTIONS_PER_TYPE

    parser.add_argument(
        "-o", "--output", default="talo_demo", help="folder for the report, heatmap and logs (default: talo_demo)"
    )
    parser.add_argument(
        "--tasks",
        default=",".join(t.spec() for t in DEFAULT_TASKS),
        help="comma-separated BIG-bench multiple-choice tasks, each NAME[:STYLE[:LIMIT]] with STYLE cloze "
        "(likelihood of each option's text), lettered (the same, options listed A, B, ...) or generate "
        "(free answer naming the option); default: %(default)s",
    )
    parser.add_argument(
        "--harness",
        choices=("lmms-eval", "lm-eval"),
        default="lmms-eval",
        help="run TaLo through lmms-eval (talo_huggingface) or lm-eval (talo_hf); default lmms-eval",
    )
    parser.add_argument(
        "--probe-shots", type=int, default=DEFAULT_SHOTS, help="probe docs per task (default %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="probe rounds per task at most (TaLo's max_redraws + 1; the authors' code: 6; default %(default)s)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="harness processes run in parallel, the tasks dealt among them (default: one per core)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    parser.add_argument(
        "--fresh", action="store_true", help="recompute the probe sweep instead of reusing stored probe results"
    )
    parser.add_argument(
        "--vlm-questions",
        type=int,
        default=QUESTIONS_PER_TYPE,
        help="easy-VQA test questions per question type in the vision-language part (default %(default)s)",
    )
    parser.add_argument(
        "--no-vlm",
        action="store_true",
        help="skip the vision-language part (talo_llava on the easy-VQA LLaVA and easy-VQA questions)",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default: $LMMS_TALO_CACHE or ~/.cache/lmms_talo)"
    )


def run(args: argparse.Namespace) -> int:
    from lmms_talo.demo.bigbench import BigBenchError
    from lmms_talo.demo.driver import DemoTask, main
    from lmms_talo.demo.pypi import DownloadError

    try:
        tasks = [DemoTask.parse(spec.strip()) for spec in args.tasks.split(",") if spec.strip()]
    except ValueError as exc:
        print(f"lmms-talo demo: {exc}", file=sys.stderr)
        return 2
    if not tasks:
        print("lmms-talo demo: --tasks names no task", file=sys.stderr)
        return 2
    try:
        return main(
            tasks,
            Path(args.output),
            args.harness,
            args.probe_shots,
            args.rounds,
            args.jobs,
            args.threads,
            args.fresh,
            args.cache,
            say=lambda line: print(line, flush=True),
            vlm_questions=0 if args.no_vlm else args.vlm_questions,
        )
    except (BigBenchError, DownloadError) as exc:
        print(f"lmms-talo demo: {exc}", file=sys.stderr)
        return 2
