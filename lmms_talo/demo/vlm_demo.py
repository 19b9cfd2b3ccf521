"""The demo's vision-language part: TaLo through lmms-eval's `talo_llava` (with images) on the
easy-VQA LLaVA (lmms_talo.demo.easy_vqa_llava) and easy-VQA's test questions, one sub-task per
question type (colour, shape, yes/no), each option scored by its likelihood.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from lmms_talo.demo import easy_vqa, easy_vqa_llava

QUESTIONS_PER_TYPE = 60  # test questions per sub-task, drawn with SEED
SEED = 0
MODEL_LABEL = "easy-VQA LLaVA: SmolLM2-135M-Instruct (pretrained, frozen) + a vision adapter trained here on easy-VQA"


@dataclass
class PreparedVlm:
    model: Path
    tasks_dir: Path
    converted: list  # easy_vqa.ConvertedTask


def tasks_dir(cache: Path, limit: int | None, seed: int) -> Path:
    """A folder per (limit, seed, code that writes the tasks): files under one name never change,
    so concurrent runs never read each other's docs and a code change never reads stale ones."""
    code = hashlib.sha256(Path(easy_vqa.__file__).read_bytes()).hexdigest()[:10]
    return cache / "easy_vqa" / f"tasks-limit{limit or 'all'}-seed{seed}-{code}"


def prepare(
    cache: Path,
    say: Callable[[str], None],
    limit: int | None = QUESTIONS_PER_TYPE,
    seed: int = SEED,
    variants: tuple[str, ...] = ("choice",),
) -> PreparedVlm:
    """The assembled model and the tasks of `variants` (easy_vqa.VARIANTS; all are written once)."""
    model = easy_vqa_llava.ensure_vlm(cache, say)
    folder = tasks_dir(cache, limit, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # one writer; the others wait and read what it wrote
        if (folder / "written").exists():
            converted = _read_back(folder)
        else:
            data = easy_vqa.EasyVqa(easy_vqa.ensure_wheel(cache, say))
            say(f"writing the easy-VQA tasks to {folder} ...")
            converted = easy_vqa.write_tasks(data, folder, limit, seed, easy_vqa.VARIANTS)
            (folder / "written").write_text("\n".join(t.name for t in converted) + "\n")
    return PreparedVlm(model, folder, [t for t in converted if t.variant in variants])


def _read_back(folder: Path) -> list:
    import pyarrow.parquet as pq

    converted = []
    for kind in easy_vqa.QUESTION_TYPES:
        parquet = easy_vqa.parquet_of(folder, kind)
        options = pq.read_table(parquet, columns=["options"]).column("options").to_pylist()
        chance = sum(1.0 / len(o) for o in options) / len(options)
        for variant in easy_vqa.VARIANTS:
            converted.append(
                easy_vqa.ConvertedTask(easy_vqa.task_name(kind, variant), kind, variant, parquet, len(options), chance)
            )
    return converted


def model_args(prepared: PreparedVlm) -> str:
    return f"pretrained={prepared.model},device=cpu,device_map=cpu,dtype=float32"


def command(prepared: PreparedVlm, output: Path, talo_args: str, model: str = "talo_llava") -> list[str]:
    """The lmms-eval command line of the VLM run (`--force_simple`: the simple class scores the
    options; lmms-eval's chat LLaVA class inherits that same loglikelihood)."""
    args = model_args(prepared) + (f",{talo_args}" if talo_args else "")
    return [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        model,
        "--force_simple",
        "--model_args",
        args,
        "--tasks",
        ",".join(t.name for t in prepared.converted),
        "--include_path",
        str(prepared.tasks_dir),
        "--output_path",
        str(output),
        "--batch_size",
        "1",
        "--log_samples",
        "--verbosity",
        "DEBUG",
    ]
