"""`lmms-talo export --from-report` writes the model that was evaluated (issue 24, part 3): every
layer of a multi-layer selection, and a sub-task's own layer; a task split into sub-tasks that
selected differently is an error that lists them."""

import json
import subprocess
import sys

import pytest
import torch
from cli_tasks import cli_env
from tiny_models import example_inputs, load_processor, load_tiny

from lmms_talo.method.interventions import Knockout, knocked_out

pytestmark = pytest.mark.e2e  # the export CLI in a subprocess

REPORT = {
    "config": {"intervention": "zero"},
    "subtasks": [
        {"task": "deep", "subtask": "deep", "selected_layer": 1, "selected_layers": [1, 3], "selection_reason": "x"},
        {
            "task": "mmstar",
            "subtask": "mmstar/math",
            "selected_layer": 3,
            "selected_layers": [3],
            "selection_reason": "y",
        },
        {
            "task": "mmstar",
            "subtask": "mmstar/science",
            "selected_layer": None,
            "selected_layers": [],
            "selection_reason": "no gain",
        },
    ],
}


def _export(tmp_path, model_dir, task):
    report = tmp_path / "talo_report.json"
    report.write_text(json.dumps(REPORT))
    out = tmp_path / f"out_{task.replace('/', '_')}"
    cmd = [
        sys.executable,
        "-m",
        "lmms_talo",
        "export",
        "--pretrained",
        str(model_dir),
        "--from-report",
        str(report),
        "--task",
        task,
        "--out",
        str(out),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env()), out


def test_a_multi_layer_selection_exports_every_selected_layer(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama")
    proc, out = _export(tmp_path, source, "deep")
    assert proc.returncode == 0, proc.stderr
    assert "layers 1+3 knocked out" in proc.stdout
    assert json.loads((out / "config.json").read_text())["talo"]["knocked_out_layers"] == [1, 3]
    exported, original = load_tiny("llama", out), load_tiny("llama", source)
    inputs = example_inputs("llama", load_processor("llama", out), batch=2)
    with torch.no_grad():
        with knocked_out(original, Knockout((1, 3), "zero")):
            want = original(**inputs).logits
        got = exported(**inputs).logits
    assert torch.equal(got, want), "the exported checkpoint is the evaluated model: both layers knocked out"


def test_a_task_split_into_sub_tasks_must_name_one(tiny_model_dir, tmp_path):
    proc, out = _export(tmp_path, tiny_model_dir("llama"), "mmstar")
    assert proc.returncode != 0 and not out.exists()
    assert "'mmstar' was split into 2 sub-tasks" in proc.stderr
    assert "mmstar/math: layers 3" in proc.stderr and "mmstar/science: the full model" in proc.stderr

    proc, out = _export(tmp_path, tiny_model_dir("llama"), "mmstar/math")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["talo"]["knocked_out_layers"] == [3]
