"""The body of benchmarks/gpu_check.sh (run that): one table from
  1. bit-exactness of the zero / uniform / mean hooks against the weight edit, in bfloat16 and
     float16, on the tiny random architectures of the test suite (tests/tiny_models.py): the logits
     of a left-padded batch of two prompts under the hooks and under the edited copy, compared bit
     for bit (NaN payloads included);
  2. the sweep modes on the realistic-shape random LLaVA (benchmarks/realistic_vlm.py, 576 image
     tokens), each mode in its own process (benchmarks/sweep_speed.py): wall seconds, ratio to the
     naive sweep, peak CUDA memory (torch.cuda.max_memory_allocated) and peak RSS.
No network: every model is built in place. --cpu (automatic without CUDA) is the smoke version the
test suite runs: two architectures, a 3-layer VLM, 2 probe docs, the naive and screen modes only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

INTERVENTIONS = ("zero", "uniform", "mean")
SWEEP_MODES = ("naive", "full", "select", "screen")


def _bits(tensor):
    import torch

    return tensor.contiguous().view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def exactness(archs, dtypes, device: str, work: Path) -> list[dict]:
    """One row per (architecture, dtype): whether every intervention's hooks equal the weight edit bit for bit."""
    import torch
    from tiny_models import (
        VLM_ARCHITECTURES,
        build_tiny,
        example_inputs,
        load_processor,
        load_tiny,
    )

    from lmms_talo.method.interventions import Knockout, edit_weights_in_place, knocked_out

    rows = []
    for arch in archs:
        path = (
            build_tiny(arch, work / "tiny" / arch)
            if not (work / "tiny" / arch / "config.json").exists()
            else work / "tiny" / arch
        )
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
                "x_naive": r["seconds"] / naive["seconds"],
                "peak_cuda_mb": r.get("peak_cuda_mb"),
                "peak_rss_mb": r["peak_rss_mb"],
                "ok": True,
            }
        )
    rows += [{"check": "sweep mode", "setting": "agreement", "result": f"MISMATCH: {p}", "ok": False} for p in problems]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| check | setting | result | seconds | x naive | peak CUDA MB | peak RSS MB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        lines.append(
            f"| {r['check']} | {r['setting']} | {r['result']} | {fmt(r.get('seconds'), '.1f')} | "
            f"{fmt(r.get('x_naive'), '.2f')} | {fmt(r.get('peak_cuda_mb'), '.0f')} | "
            f"{fmt(r.get('peak_rss_mb'), '.0f')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU smoke version (automatic without CUDA)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmms_talo_gpu_check"))
    args = parser.parse_args(argv)
    import torch
    from tiny_models import ARCHITECTURES

    cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    args.work.mkdir(parents=True, exist_ok=True)
    header = (
        f"lmms-talo gpu_check, {time.strftime('%Y-%m-%d')}, "
        + ("CPU smoke run" if cpu else f"{torch.cuda.get_device_name(0)}")
        + f", torch {torch.__version__}"
    )
    rows = exactness(("llava", "smollm2") if cpu else ARCHITECTURES, ("bfloat16", "float16"), device, args.work)
    rows += sweeps(device, 3 if cpu else 30, 2 if cpu else 8, ("naive", "screen") if cpu else SWEEP_MODES, args.work)
    print(header)
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
