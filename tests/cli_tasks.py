"""Helpers for end-to-end tests: local image tasks written as parquet, and the real lmms-eval CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tiny_models import example_image

UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""

QUESTIONS = ("What is shown?", "Which shape is it?", "What color is it?", "Is it large or small?", "Where is it?")


def write_image_task(
    folder: Path,
    name: str,
    answers: list[str],
    categories: list[str] | None = None,
    output_type: str = "generate_until",
    choices: list[list[str]] | None = None,
) -> Path:
    """A local lmms-eval task with one random image and one question per doc."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    n = len(answers)
    columns = {
        "question": [QUESTIONS[i % len(QUESTIONS)] for i in range(n)],
        "answer": answers,
        "image": [example_image(seed=i) for i in range(n)],
        "category": categories or ["all"] * n,
    }
    if choices is not None:
        columns["choices"] = choices
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
            "category": datasets.Value("string"),
            **({"choices": datasets.Sequence(datasets.Value("string"))} if choices is not None else {}),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / f"{name}.parquet"))
    (folder / "utils.py").write_text(UTILS)
    if output_type == "generate_until":
        body = """
            output_type: generate_until
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 4
              until: ["\\n\\n"]
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """
    else:
        body = """
            output_type: multiple_choice
            doc_to_target: answer
            doc_to_choice: choices
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """
    (folder / f"{name}.yaml").write_text(
        textwrap.dedent(
            f"""
            task: {name}
            dataset_path: parquet
            dataset_kwargs:
              data_files:
                test: {name}.parquet
            test_split: test
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: !function utils.doc_to_text
            """
        )
        + textwrap.dedent(body)
    )
    return folder


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_lmms_eval(model: str, model_args: str, tasks: str, include_path: Path, output: Path, *extra: str):
    """Runs the real lmms-eval CLI; returns (results dict, completed process)."""
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(include_path),
        "--output_path",
        str(output),
        "--batch_size",
        "1",
        "--verbosity",
        "DEBUG",
        "--log_samples",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=900)
    assert proc.returncode == 0, f"lmms-eval failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    files = sorted(output.rglob("*_results.json"))
    assert files, f"no results file under {output}:\n{proc.stderr[-4000:]}"
    return json.loads(files[-1].read_text()), proc


def samples(output: Path, task: str) -> list[dict]:
    files = sorted(output.rglob(f"*_samples_{task}.jsonl"))
    assert files, f"no samples for {task} under {output}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]
