"""Does the easy-VQA LLaVA use the image? Its accuracy on easy-VQA test questions, asked as
lmms-eval multiple-choice tasks (one per question type), with the image and with a blank white one.

    python benchmarks/easy_vqa_accuracy.py --limit 300 --json benchmarks/results/easy_vqa_accuracy.json

The model is lmms-eval's own `llava_hf` class with lmms-talo's repair of its loglikelihood (lmms-eval
0.7.3's fails on every image task; lmms_talo/harness/lmms/fixes.py), no TaLo: lmms-eval's evaluator
builds the requests and scores them (`acc`: the option of least mean answer loss is the gold one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def evaluate(limit: int | None, seed: int, threads: int) -> dict:
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from lmms_eval.tasks import TaskManager

    from lmms_talo.demo import easy_vqa, easy_vqa_llava, vlm_demo
    from lmms_talo.harness.lmms.fixes import LlavaHfLoglikelihood, loglikelihood_outputs_kept
    from lmms_talo.outputs.model_identity import cache_root

    torch.set_num_threads(threads)
    prepared = vlm_demo.prepare(cache_root(), print, limit=limit, seed=seed, variants=("choice", "blind"))
    model_class = type("LlavaHfRepaired", (LlavaHfLoglikelihood, LlavaHf), {})
    lm = model_class(pretrained=str(prepared.model), device="cpu", device_map="cpu", dtype="float32")
    started = time.perf_counter()
    with loglikelihood_outputs_kept():
        results = simple_evaluate(
            model=lm,
            tasks=[t.name for t in prepared.converted],
            task_manager=TaskManager(include_path=str(prepared.tasks_dir)),
            batch_size=1,
            force_simple=True,
        )["results"]
    rows = {}
    for task in prepared.converted:
        rows.setdefault(task.kind, {"n": task.docs, "chance": round(task.chance, 4)})
        rows[task.kind]["with_image" if task.variant == "choice" else "blank_image"] = results[task.name]["acc,none"]
    card = easy_vqa_llava.card()
    return {
        "model": vlm_demo.MODEL_LABEL,
        "adapter_sha256": easy_vqa_llava.adapter_digest(),
        "adapter_training": card.get("command"),
        "data": f"{easy_vqa.REQUIREMENT} test split, up to {limit} questions per type (seed {seed})",
        "accuracy": rows,
        "seconds": round(time.perf_counter() - started),
        "provenance": __import__("provenance").provenance() | {"threads": threads},
    }


def table(result: dict) -> str:
    lines = ["| questions | n | chance | with the image | blank image |", "|---|---:|---:|---:|---:|"]
    for kind, row in result["accuracy"].items():
        lines.append(
            f"| {kind} | {row['n']} | {row['chance']:.3f} | {row['with_image']:.3f} | {row['blank_image']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="test questions per type (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    result = evaluate(args.limit, args.seed, args.threads)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
