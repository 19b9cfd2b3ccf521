"""The body of benchmarks/gpu_check.sh (run that). It prints a header line (date, GPU or "CPU smoke
run", torch), a legend line, one table and the run's wall seconds; each table row is one check, in
this order:

  hooks = weight edit   bit-exactness of the zero / uniform / mean hooks against the weight edit, in
                        bfloat16 and float16, on the test suite's tiny random architectures
                        (tests/tiny_models.py): the logits of a left-padded batch of two prompts under
                        the hooks and under the edited copy, compared bit for bit (NaN payloads
                        included). CUDA: all 10 architectures; --cpu: llava and smollm2.
  sweep mode            the sweep modes on the realistic-shape random LLaVA (benchmarks/realistic_vlm.py
                        build(), 576 image tokens, float32 weights), each mode in its own process
                        (benchmarks/sweep_speed.py): selection, exact passes, wall seconds, x ref = the
                        ratio to the naive sweep, peak CUDA memory (torch.cuda.max_memory_allocated)
                        and peak RSS. CUDA: naive/full/select/screen, 30 layers, 8 probe docs;
                        --cpu: naive and screen, 3 layers, 2 docs. An "agreement" row appears only
                        when the modes' per-doc scores or selections differ (a failure).
  sweep engine          the batched sweep engine (the default, sweep_batch=true: a round's probe docs in
                        one harness call per variant) against the sequential one (sweep_batch=false: one
                        doc per call) on the full sweep, in bfloat16, each in its own process
                        (sweep_speed's full_seq and full modes): two rows per model, sequential then
                        batched, with the selection, exact passes, model calls (a prefill or one decode
                        step each: fewer in the batched row means batching applied), wall seconds,
                        x ref = wall seconds over the sequential engine's (the sequential row is 1.00),
                        peak CUDA memory and peak RSS of each; the batched row adds the engine's own
                        report (batched or sequential, why, and its self-check's counts). Plain LMs
                        (talo_huggingface, likelihood task) run with batch_size = the probe docs; the
                        VLMs run through llava_hf, whose generation asserts batch size 1, so there
                        batching falls back to one doc per call (the row says so, whatever the engine
                        reports) and the pair measures the engine's overhead.
                        CUDA: the realistic LLaVA (30 layers, 8 docs), the 7B-width LLaVA-NeXT (4
                        docs), then the tiny smollm2, llava_next, qwen2, llama, llava_onevision
                        (8 docs each); a pair that would end past BUDGET_S (420 s) is skipped, and its
                        row says so. Left out: qwen2_vl, qwen2_5_vl, qwen3_vl, internvl (internvl_hf
                        asserts batch size 1; the Qwen classes pick their own dtype and batching; not
                        validated here). --cpu: the tiny smollm2 only (4 docs, batch_size=4); the
                        realistic LLaVA gets a "skipped in the CPU smoke run" row.
  engine agreement      per model, batched vs sequential: how many (variant, doc) probe scores are
                        identical, whether the selected layer (the decision) is identical, and how many
                        answers are bit-identical. A measurement, not pass/fail (bf16 batching changes
                        kernel shapes and padding); only different probe docs fail it.
  7B-width build        realistic_vlm.build_next(): a random LLaVA-NeXT of real 7B width (hidden 4096,
                        32 heads, MLP 11008, vocabulary 32064, 8 decoder layers, bfloat16), CLIP-L-width
                        tower (2 layers), anyres at 336 px / patch 14 with LLaVA-v1.6's pinpoints; the
                        task's 672 px images take 2928 image tokens each (the row counts them with the
                        saved processor). CUDA: weights drawn on the GPU, then its engine pair above;
                        --cpu: built shrunk (hidden 64, 2 layers, tower width 32, same image geometry),
                        one float32 forward on one image, no engine pair (the row says so).

No network: every model is built in place. --cpu (automatic without CUDA) is the smoke version the
test suite runs (about a minute and a half on 2 cores). Exit status 0 only if every hook check is
bit-exact, the sweep modes agree, every engine pair ran on the same probe docs and nothing failed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

INTERVENTIONS = ("zero", "uniform", "mean")
SWEEP_MODES = ("naive", "full", "select", "screen")
BUDGET_S = 420.0  # the CUDA run: an engine pair that would end past this many seconds is skipped
ENGINE_ARCHS = ("smollm2", "llava_next", "qwen2", "llama", "llava_onevision")  # the CUDA run's tiny pairs, in order
COLORS = ("red", "blue", "green", "yellow")
LLAVA_HF_BATCH = "batch_size=1: llava_hf generation asserts it, batching falls back to one doc per call"
SMOKE_NEXT = dict(  # the CPU smoke run's shrunk 7B-width LLaVA-NeXT: same image geometry, tiny widths
    text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
    vision=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2),
    num_layers=2,
)


def _bits(tensor):
    import torch

    return tensor.contiguous().view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def _tiny(arch: str, work: Path) -> Path:
    """The test suite's tiny random `arch` model, built once under `work`."""
    from tiny_models import build_tiny

    path = work / "tiny" / arch
    return path if (path / "config.json").exists() else build_tiny(arch, path)


def exactness(archs, dtypes, device: str, work: Path) -> list[dict]:
    """One row per (architecture, dtype): whether every intervention's hooks equal the weight edit bit for bit."""
    import torch
    from tiny_models import VLM_ARCHITECTURES, example_inputs, load_processor, load_tiny

    from lmms_talo.method.interventions import Knockout, edit_weights_in_place, knocked_out

    rows = []
    for arch in archs:
        path = _tiny(arch, work)
        processor = load_processor(arch, path)
        for name in dtypes:
            dtype = getattr(torch, name)
            started = time.perf_counter()
            model = load_tiny(arch, path).to(device=device, dtype=dtype)
            inputs = {
                k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                for k, v in example_inputs(arch, processor, batch=2).items()
            }
            failed = []
            for intervention in INTERVENTIONS:
                edited = copy.deepcopy(model)
                edit_weights_in_place(edited, 1, intervention)
                with torch.no_grad():
                    want = edited(**inputs).logits
                    with knocked_out(model, Knockout((1,), intervention)):
                        got = model(**inputs).logits
                if not torch.equal(_bits(got), _bits(want)):
                    failed.append(intervention)
                del edited
            rows.append(
                {
                    "check": "hooks = weight edit",
                    "setting": f"{arch} {name}" + (" (VLM)" if arch in VLM_ARCHITECTURES else ""),
                    "result": "bit-exact" if not failed else "DIFFERS: " + ",".join(failed),
                    "seconds": time.perf_counter() - started,
                    "ok": not failed,
                }
            )
            del model
    return rows


def sweeps(device: str, layers: int, shots: int, modes, work: Path) -> list[dict]:
    import sweep_speed

    spec = sweep_speed.vlm_spec(work, shots, 1 if device == "cpu" else 4, device, layers)
    measured = sweep_speed.measure(spec, list(modes))
    naive = next(r for r in measured if r["mode"] == "naive")
    problems = sweep_speed.check(measured)
    rows = []
    for r in measured:
        rows.append(
            {
                "check": "sweep mode",
                "setting": f"{r['mode']} ({r['layers']} layers, {len(r['probe_docs'])} docs, {device})",
                "result": f"selected {r['selected']}, {r['exact_passes']} exact passes",
                "seconds": r["seconds"],
                "x_ref": r["seconds"] / naive["seconds"],
                "peak_cuda_mb": r.get("peak_cuda_mb"),
                "peak_rss_mb": r["peak_rss_mb"],
                "ok": True,
            }
        )
    rows += [{"check": "sweep mode", "setting": "agreement", "result": f"MISMATCH: {p}", "ok": False} for p in problems]
    return rows


# --- the batched sweep engine against the sequential one ---


class Clock:
    """Time since the run began, and whether a pair of child processes still fits the budget
    (estimated by the longest pair so far). budget None: no limit (the CPU smoke run)."""

    def __init__(self, budget: float | None):
        self.started = time.perf_counter()
        self.budget = budget
        self.longest = 60.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def affords(self, extra: float = 0.0) -> bool:
        return self.budget is None or self.elapsed() + 1.1 * self.longest + extra <= self.budget

    def skipped(self) -> str:
        return f"skipped: would end past the {self.budget:.0f} s budget ({self.elapsed():.0f} s used)"


def _engine_pair(spec: dict) -> tuple[dict, dict]:
    """The sequential engine's and the batched engine's full sweep of `spec`, each in its own process
    (sweep_speed's full_seq and full modes)."""
    import sweep_speed

    sequential, batched = sweep_speed.measure(spec, ["full_seq", "full"])
    return sequential, batched


def _agreement(a: dict, b: dict, key: str) -> tuple[int, int]:
    """(identical, all): two runs' per-(variant, doc) `key` (doc_scores, doc_answers), over the pairs either ran."""
    pairs = {(label, doc) for r in (a, b) for label, values in r.get(key, {}).items() for doc in values}
    same = sum(a[key].get(label, {}).get(doc) == b[key].get(label, {}).get(doc) for label, doc in pairs)
    return same, len(pairs)


def _engine_report(row: dict) -> str:
    """What the run's engine says (SweepResult.engine): which engine ran, why, and its self-check."""
    engine = row.get("engine") or {}
    text = f"engine {engine.get('engine', '?')}: {engine.get('why', '?')}"
    check = engine.get("check") or {}
    if check:
        docs = check["docs"]
        text += f"; self-check same score {check['same_score']}/{docs}, bit-identical {check['bit_identical']}/{docs}"
    return text.replace("|", "/")


def _failure(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200].replace("|", "/")


def engine_rows(name: str, spec: dict, batching: str, clock: Clock) -> list[dict]:
    """Three rows for one model: the sequential engine, the batched engine (x ref: its wall seconds
    over the sequential one's; with the engine's own report) and their agreement; one row if it was
    skipped or failed."""
    if not clock.affords():
        return [{"check": "sweep engine", "setting": name, "result": clock.skipped(), "ok": True}]
    started = time.perf_counter()
    try:
        sequential, batched = _engine_pair(spec)
    except Exception as error:  # the table still prints; the exit status says it failed
        return [{"check": "sweep engine", "setting": name, "result": f"FAILED: {_failure(error)}", "ok": False}]
    finally:
        clock.longest = max(clock.longest, time.perf_counter() - started)
    setting = f"{name}, {len(sequential['probe_docs'])} docs, {sequential['layers']} layers"
    rows = []
    for r, engine in ((sequential, "sequential (sweep_batch=false)"), (batched, f"batched ({batching})")):
        result = f"selected {r['selected']}, {r['exact_passes']} exact passes, {r['model_calls']} model calls"
        rows.append(
            {
                "check": "sweep engine",
                "setting": f"{setting}: {engine}",
                "result": result + (f"; {_engine_report(r)}" if r is batched else ""),
                "seconds": r["seconds"],
                "x_ref": r["seconds"] / sequential["seconds"],
                "peak_cuda_mb": r.get("peak_cuda_mb"),
                "peak_rss_mb": r["peak_rss_mb"],
                "ok": True,
            }
        )
    same, total = _agreement(batched, sequential, "doc_scores")
    bits, answers = _agreement(batched, sequential, "doc_answers")
    layer = lambda selected: "no layer" if selected is None else f"layer {selected}"
    decision = (
        f"decision identical ({layer(batched['selected'])})"
        if batched["selected"] == sequential["selected"]
        else f"decision DIFFERS (batched {layer(batched['selected'])}, sequential {layer(sequential['selected'])})"
    )
    same_docs = batched["probe_docs"] == sequential["probe_docs"]
    rows.append(
        {
            "check": "engine agreement",
            "setting": f"{name}: batched vs sequential",
            "result": (
                f"{same}/{total} (variant, doc) scores identical ({same / max(total, 1):.0%}), {decision}; "
                f"answers bit-identical {bits}/{answers}"
                + ("" if same_docs else "; FAILED: the engines probed different docs")
            ),
            "ok": same_docs,
        }
    )
    return rows


def _tasks(work: Path, shots: int) -> dict[str, tuple[str, Path]]:
    """The local tasks (3 x shots docs, random 32 px images): a generated answer (VLMs; the same task
    sweep_speed.vlm_spec writes) and a 4-way multiple choice scored by likelihood (plain LMs)."""
    from cli_tasks import write_image_task

    n = 3 * shots
    vqa = write_image_task(work / "task", "talo_bench_vqa", [f"answer {i % 4}" for i in range(n)])
    mc = write_image_task(
        work / "task_mc",
        "talo_bench_mc",
        [COLORS[i % 4] for i in range(n)],
        output_type="multiple_choice",
        choices=[list(COLORS)] * n,
    )
    return {"generate_until": ("talo_bench_vqa", vqa), "loglikelihood": ("talo_bench_mc", mc)}


def _spec(model: str, reqtype: str, task: tuple[str, Path], model_args: str, shots: int, device: str) -> dict:
    """A sweep_speed spec: bfloat16 weights, `shots` probe docs, one probe round."""
    return {
        "model": model,
        "task": task[0],
        "reqtype": reqtype,
        "include_path": str(task[1]),
        "intervention": "zero",
        "threads": 1 if device == "cpu" else 4,
        "model_args": f"{model_args},device={device},device_map={device},dtype=bfloat16,"
        f"probe_shots={shots},state_dir=none,max_redraws=0",
    }


def tiny_engines(archs, device: str, shots: int, work: Path, clock: Clock) -> list[dict]:
    """The engine pair on the test suite's tiny architectures in bfloat16: plain LMs through
    talo_huggingface (hf_causal_lm) on the likelihood task with batch_size = shots, VLMs through
    talo_llava (llava_hf) on the generation task at batch size 1."""
    from tiny_models import TEXT_ARCHITECTURES

    tasks = _tasks(work, shots)
    rows = []
    for arch in archs:
        name = f"tiny {arch} bf16 ({device})"
        if not clock.affords():
            rows.append({"check": "sweep engine", "setting": name, "result": clock.skipped(), "ok": True})
            continue
        path = _tiny(arch, work)
        if arch in TEXT_ARCHITECTURES:
            reqtype, model, batching = "loglikelihood", "talo_huggingface", f"batch_size={shots}"
            model_args = f"pretrained={path},batch_size={shots}"
        else:
            reqtype, model, batching = "generate_until", "talo_llava", LLAVA_HF_BATCH
            model_args = f"pretrained={path}"
        rows += engine_rows(name, _spec(model, reqtype, tasks[reqtype], model_args, shots, device), batching, clock)
    return rows


def realistic_engines(device: str, layers: int, shots: int, work: Path, clock: Clock) -> list[dict]:
    """The engine pair on the realistic-shape random LLaVA (576 image tokens), in bfloat16."""
    import sweep_speed

    spec = sweep_speed.vlm_spec(work, shots, 1 if device == "cpu" else 4, device, layers)
    spec["model_args"] += ",dtype=bfloat16"
    name = f"realistic LLaVA bf16, 576 image tokens ({device})"
    return engine_rows(name, spec, LLAVA_HF_BATCH, clock)


def _next_task(work: Path, shots: int) -> tuple[str, Path]:
    """The generation task with NEXT_IMAGE_SIDE px images (2928 LLaVA-NeXT image tokens each)."""
    import cli_tasks
    import realistic_vlm
    from tiny_models import example_image

    side = realistic_vlm.NEXT_IMAGE_SIDE
    small = cli_tasks.example_image
    cli_tasks.example_image = functools.partial(example_image, size=(side, side))  # write_image_task's images
    try:
        folder = cli_tasks.write_image_task(
            work / "task_next", "talo_bench_next", [f"answer {i % 4}" for i in range(3 * shots)]
        )
    finally:
        cli_tasks.example_image = small
    return "talo_bench_next", folder


def next_rows(device: str, shots: int, work: Path, clock: Clock) -> list[dict]:
    """The 7B-width LLaVA-NeXT: its build (and, shrunk on CPU, one forward), then on CUDA its engine pair."""
    import realistic_vlm
    import torch
    from tiny_models import example_image
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    cpu = device == "cpu"
    text, vision = SMOKE_NEXT["text"], SMOKE_NEXT["vision"]
    shrunk = f"hidden {text['hidden_size']}, {SMOKE_NEXT['num_layers']} layers, tower width {vision['hidden_size']}"
    name = "7B-width LLaVA-NeXT" + (f" (shrunk for the CPU smoke run: {shrunk})" if cpu else ", 8 layers")
    if not cpu and not clock.affords(60.0):  # its build too
        return [{"check": "7B-width build", "setting": name, "result": clock.skipped(), "ok": True}]
    started = time.perf_counter()
    try:
        folder = realistic_vlm.build_next(
            work / ("next_smoke" if cpu else "next8"), device=device, **(SMOKE_NEXT if cpu else {})
        )
        processor = AutoProcessor.from_pretrained(folder)
        side = realistic_vlm.NEXT_IMAGE_SIDE
        inputs = processor(
            images=[example_image(0, size=(side, side))], text=["<image>\nWhat is shown?"], return_tensors="pt"
        )
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        tokens = int((inputs["input_ids"] == image_id).sum())
        config = AutoConfig.from_pretrained(folder).text_config
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        size = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        result = (
            f"built: hidden {config.hidden_size}, {config.num_attention_heads} heads, "
            f"{config.num_hidden_layers} layers, {size} of bf16 weights; {tokens} image tokens per {side} px image"
        )
        if cpu:  # the smoke run's check that the saved model runs: one forward, float32 (bf16 is slow on CPU)
            model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(**inputs, logits_to_keep=1).logits
            result += f"; one forward ({tuple(logits.shape)} logits); engine pair: CUDA run only"
            del model
    except Exception as error:  # the table still prints; the exit status says it failed
        return [{"check": "7B-width build", "setting": name, "result": f"FAILED: {_failure(error)}", "ok": False}]
    rows = [
        {
            "check": "7B-width build",
            "setting": name,
            "result": result,
            "seconds": time.perf_counter() - started,
            "ok": tokens > 0,
        }
    ]
    if not cpu:
        spec = _spec("talo_llava", "generate_until", _next_task(work, shots), f"pretrained={folder}", shots, device)
        rows += engine_rows(f"7B-width LLaVA-NeXT bf16, {tokens} image tokens ({device})", spec, LLAVA_HF_BATCH, clock)
    return rows


def skipped_on_cpu(setting: str) -> dict:
    return {
        "check": "sweep engine",
        "setting": setting,
        "result": "skipped in the CPU smoke run (the CUDA run runs it)",
        "ok": True,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| check | setting | result | seconds | x ref | peak CUDA MB | peak RSS MB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        lines.append(
            f"| {r['check']} | {r['setting']} | {r['result']} | {fmt(r.get('seconds'), '.1f')} | "
            f"{fmt(r.get('x_ref'), '.2f')} | {fmt(r.get('peak_cuda_mb'), '.0f')} | "
            f"{fmt(r.get('peak_rss_mb'), '.0f')} |"
        )
    return "\n".join(lines)


LEGEND = (
    "x ref: wall seconds over the naive sweep's (sweep mode) or the sequential engine's (sweep engine); "
    "engine agreement is measured in bfloat16, not pass/fail"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU smoke version (automatic without CUDA)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmms_talo_gpu_check"))
    args = parser.parse_args(argv)
    import torch
    from tiny_models import ARCHITECTURES

    cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    clock = Clock(None if cpu else BUDGET_S)
    args.work.mkdir(parents=True, exist_ok=True)
    header = (
        f"lmms-talo gpu_check, {time.strftime('%Y-%m-%d')}, "
        + ("CPU smoke run" if cpu else f"{torch.cuda.get_device_name(0)}")
        + f", torch {torch.__version__}"
    )
    rows = exactness(("llava", "smollm2") if cpu else ARCHITECTURES, ("bfloat16", "float16"), device, args.work)
    rows += sweeps(device, 3 if cpu else 30, 2 if cpu else 8, ("naive", "screen") if cpu else SWEEP_MODES, args.work)
    if cpu:
        rows.append(skipped_on_cpu(f"realistic LLaVA bf16, 576 image tokens ({device})"))
        rows += next_rows(device, 4, args.work, clock)
        rows += tiny_engines(("smollm2",), device, 4, args.work, clock)
    else:
        rows += realistic_engines(device, 30, 8, args.work, clock)
        rows += next_rows(device, 4, args.work, clock)
        rows += tiny_engines(ENGINE_ARCHS, device, 8, args.work, clock)
    print(header)
    print(LEGEND)
    print(table(rows))
    print(f"({clock.elapsed():.0f} s)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
