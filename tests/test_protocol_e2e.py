"""The probe protocol through the real lmms-eval CLI: small sub-tasks never stop a run, a forced
layer needs no probe split, the report shows each round, and MMBench is split and probed by question."""

from __future__ import annotations

import json
import subprocess
import sys

import benchmark_fixtures as fixtures
import pytest
from cli_tasks import cli_env, run_lmms_eval, samples, write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.harness import pool_exclusion

pytestmark = pytest.mark.e2e


def _llava_args(tiny_model_dir, report, extra):
    return (
        f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},state_dir=none,report={report},{extra}"
    )


def test_small_subtasks_are_answered_unprobed_and_the_report_shows_each_round(tmp_path, tiny_model_dir):
    answers = [f"a{i % 3}" for i in range(32)]
    folder = write_image_task(tmp_path / "task", "talo_proto", answers, categories=["big"] * 30 + ["small"] * 2)
    report_path = tmp_path / "report.json"
    results, proc = run_lmms_eval(
        "talo_llava",
        _llava_args(tiny_model_dir, report_path, "probe_shots=3,category_field=category"),
        "talo_proto",
        folder,
        tmp_path / "out",
        "--force_simple",
    )
    groups = {g["subtask"]: g for g in json.loads(report_path.read_text())["subtasks"]}
    small, big = groups["talo_proto/small"], groups["talo_proto/big"]
    assert small["not_probed"] == "2 docs, fewer than probe_shots=3: answered by the full model"
    assert small["pool"] == [] and small["rounds"] == [] and small["selected_layers"] == []
    assert small["test"]["talo"]["n"] == 2
    log = proc.stdout + proc.stderr
    assert log.count("not probed, answered by the full model: talo_proto/small (2 docs") == 1
    assert "talo_proto: granularity=category (category_field=category)" in log
    assert big["not_probed"] is None and big["probe_stopped"]
    rounds = big["rounds"]
    assert rounds[0]["drawn"] == "first draw" and rounds[0]["size"] == 3 == len(rounds[0]["probe_docs"])
    for i, r in enumerate(rounds[1:], 1):
        assert r["round"] == i and r["drawn"] in (
            f"no positive gain on round {i - 1}",
            f"baseline perfect on round {i - 1}",
        )
    used = [d for r in rounds for d in r["probe_docs"]]
    assert len(used) == len(set(used)) and set(used) <= set(big["pool"])
    assert len(samples(tmp_path / "out", "talo_proto")) == 32


def test_forced_layer_on_a_small_task_answers_every_doc_without_a_split(tmp_path, tiny_model_dir):
    folder = write_image_task(tmp_path / "task", "talo_forced", [f"a{i % 3}" for i in range(20)])
    report_path = tmp_path / "report.json"
    results, proc = run_lmms_eval(
        "talo_llava",
        _llava_args(tiny_model_dir, report_path, "force_layer=2"),
        "talo_forced",
        folder,
        tmp_path / "out",
        "--force_simple",
    )
    (group,) = json.loads(report_path.read_text())["subtasks"]
    assert group["forced"] and group["selected_layers"] == [2] and group["pool"] == []
    assert group["not_probed"] == "force_layer=2: no probing" and group["rounds"] == []
    assert group["test"]["talo"]["n"] == 20 == len(samples(tmp_path / "out", "talo_forced"))
    assert "force_layer=2: no probing, every doc answered under the knockout" in proc.stdout + proc.stderr


def test_mmbench_is_split_and_probed_by_question(tmp_path, tiny_model_dir):
    data = fixtures.write_fixture(tmp_path / "data", "mmbench_en_dev", fixtures.mmbench_en_dev({"ocr": 48}, circular=3))
    report_path, out = tmp_path / "report.json", tmp_path / "out"
    env = {**cli_env(), pool_exclusion.SHOTS_ENV: "3"}
    cmd = [
        sys.executable,
        "-m",
        "lmms_talo",
        "eval",
        "--talo_data",
        f"mmbench_en_dev={data}",
        "--model",
        "talo_llava",
        "--force_simple",
        "--model_args",
        _llava_args(tiny_model_dir, report_path, "probe_shots=3"),
        "--tasks",
        "talo_mmbench_en_dev_ocr",
        "--output_path",
        str(out),
        "--batch_size",
        "1",
        "--verbosity",
        "DEBUG",
        "--log_samples",
        "--gen_kwargs",
        "max_new_tokens=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "talo_mmbench_en_dev_ocr: granularity=task, unit mmbench_question" in proc.stdout + proc.stderr
    (group,) = json.loads(report_path.read_text())["subtasks"]
    index = {s["doc_id"]: s["gpt_eval_score"]["index"] for s in samples(out, "talo_mmbench_en_dev_ocr")}
    assert len(index) == 48
    question = {doc: i % 1_000_000 for doc, i in index.items()}
    pool = set(group["pool"])
    pool_questions = {question[d] for d in pool}
    assert pool_questions.isdisjoint(question[d] for d in index if d not in pool), "a question straddles pool and test"
    assert len(pool_questions) == 5 == len(group["unit_docs"])  # 16 questions: pool min(16 // 3, 4 * 3), in questions
    assert all({question[d] for d in docs} == {int(u)} and len(docs) == 3 for u, docs in group["unit_docs"].items())
    assert (
        group["rounds"][0]["size"] == 3 and {int(u) for r in group["rounds"] for u in r["probe_docs"]} <= pool_questions
    )
    # a probe question's score is its worst rotation's, as the task itself scores the rows
    label = str(group["selected_layer"]) if group["selected_layer"] is not None else "base"
    rows = group["test"]["talo"]["doc_scores"]
    for unit, score in group["probe_doc_scores"][label].items():
        assert score == min(rows[str(d)] for d in group["unit_docs"][unit])
