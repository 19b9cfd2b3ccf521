"""Exported checkpoints load with from_pretrained and equal the hook-based knockout; from a report,
export writes the model that was evaluated: every selected layer, a sub-task's own layer, and an
ambiguous task name is an error that lists its sub-tasks."""

import json
import subprocess
import sys

import pytest
import torch
from cli_tasks import cli_env
from tiny_models import ARCHITECTURES, example_inputs, load_processor, load_tiny

from lmms_talo.method.interventions import Knockout, knocked_out
from lmms_talo.outputs.export import export


@pytest.mark.parametrize("intervention", ["zero", "uniform", "mean"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exported_checkpoint_equals_hook_knockout(arch, intervention, tiny_model_dir, tmp_path):
    source = tiny_model_dir(arch)
    out = export(str(source), (2,), intervention, str(tmp_path / "out"))
    exported = load_tiny(arch, out)
    original = load_tiny(arch, source)
    inputs = example_inputs(arch, load_processor(arch, out), batch=2)
    with torch.no_grad():
        with knocked_out(original, Knockout((2,), intervention)):
            want = original(**inputs).logits
        got = exported(**inputs).logits
    assert torch.equal(got, want)
    assert exported.config.talo == {"knocked_out_layers": [2], "intervention": intervention, "source": str(source)}


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


def _export_from_report(tmp_path, model_dir, task):
    report = tmp_path / "talo_report.json"
    report.write_text(json.dumps(REPORT))
    out = tmp_path / f"out_{task.replace('/', '_')}"
    cmd = [sys.executable, "-m", "lmms_talo", "export", "--pretrained", str(model_dir)]
    cmd += ["--from-report", str(report), "--task", task, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env()), out


@pytest.mark.e2e
def test_a_sub_tasks_own_layer_is_exported_and_a_kept_full_model_is_not(tiny_model_dir, tmp_path):
    proc, out = _export_from_report(tmp_path, tiny_model_dir("llama"), "mmstar/math")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["talo"]["knocked_out_layers"] == [3]
    assert (out / "tokenizer.json").exists()
    proc, out = _export_from_report(tmp_path, tiny_model_dir("llama"), "mmstar/science")
    assert proc.returncode != 0 and "kept the full model (no gain); nothing to export" in proc.stderr


@pytest.mark.e2e
def test_a_multi_layer_selection_exports_every_selected_layer(tiny_model_dir, tmp_path):
    source = tiny_model_dir("llama")
    proc, out = _export_from_report(tmp_path, source, "deep")
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


@pytest.mark.e2e
def test_a_task_split_into_sub_tasks_must_name_one(tiny_model_dir, tmp_path):
    proc, out = _export_from_report(tmp_path, tiny_model_dir("llama"), "mmstar")
    assert proc.returncode != 0 and not out.exists()
    assert "'mmstar' was split into 2 sub-tasks" in proc.stderr
    assert "mmstar/math: layers 3" in proc.stderr and "mmstar/science: the full model" in proc.stderr
