"""Does memory stay flat over a long run? Many sub-tasks through the real lmms-eval CLI, in one process.

The model is realistic_vlm.py's random-weight LLaVA (SmolLM2-135M-wide decoder layers, 576 image
tokens per image) cut to --layers decoder layers so that a long run stays affordable; the task is a
local image task whose docs fall into --subtasks categories (TaLo's granularity=category), so one
process sweeps, selects and evaluates sub-task after sub-task, with prefix replay (which holds every
layer's K/V for a probe doc) and compare_base on. TaLo records the process's resident and peak
memory once each sub-task is done (the report's `memory` entries); this prints them and the growth
per sub-task, fitted over the second half of the run (the first sub-tasks warm caches up).

  python benchmarks/memory_flat.py                          # 24 sub-tasks x 6 docs, 6 decoder layers
  python benchmarks/memory_flat.py --report R.json          # the same figures for any finished run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lmms_talo.outputs.report_reader import Run, load_run

HERE = Path(__file__).resolve().parent


def run(work: Path, subtasks: int, docs: int, layers: int, threads: int) -> Path:
    """One lmms-eval process over `subtasks` sub-tasks; returns its TaLo report."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import realistic_vlm
    from cli_tasks import cli_env, write_image_task

    model = realistic_vlm.build(work / f"vlm_{layers}_layers", num_layers=layers)
    categories = [f"category_{i // docs:02d}" for i in range(subtasks * docs)]
    task = write_image_task(
        work / "task", "talo_memory", [f"answer {i % 4}" for i in range(subtasks * docs)], categories
    )
    report = work / "talo_report.json"
    args = (
        f"pretrained={model},device=cpu,device_map=cpu,probe_shots={max(1, docs // 3)},max_redraws=0,"
        f"category_field=category,compare_base=true,state_dir=none,report={report}"
    )
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "talo_llava",
        "--force_simple",
        "--model_args",
        args,
        "--tasks",
        "talo_memory",
        "--include_path",
        str(task),
        "--output_path",
        str(work / "out"),
        "--batch_size",
        "1",
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**cli_env(), "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise SystemExit(f"lmms-eval failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    print(f"lmms-eval: {subtasks} sub-tasks in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return report


def summarize(run: Run) -> str:
    memory = [s.memory for s in run.subtasks if s.memory]
    if len(memory) < 4:
        raise SystemExit("the report holds memory records for fewer than 4 sub-tasks: nothing to fit")
    rss = np.array([m["rss_mb"] for m in memory])
    half = len(rss) // 2
    slope = np.polyfit(np.arange(half, len(rss)), rss[half:], 1)[0]
    lines = ["| sub-task | resident MB | peak MB |", "|---:|---:|---:|"]
    lines += [f"| {i + 1} | {m['rss_mb']:.0f} | {m['peak_rss_mb']:.0f} |" for i, m in enumerate(memory)]
    lines += [
        "",
        f"{len(rss)} sub-tasks: resident {rss[0]:.0f} MB after the first, {rss[-1]:.0f} MB after the last; "
        f"growth over the second half {slope:+.2f} MB per sub-task; "
        f"peak {max(m['peak_rss_mb'] for m in memory):.0f} MB",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lmms_talo_memory")
    parser.add_argument("--subtasks", type=int, default=24)
    parser.add_argument("--docs", type=int, default=6, help="docs per sub-task")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers of the model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", type=Path, help="summarize this finished run's talo_report.json instead")
    args = parser.parse_args(argv)
    path = args.report or run(args.work, args.subtasks, args.docs, args.layers, args.threads)
    print(summarize(load_run(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
