"""Exported checkpoints load with from_pretrained and equal the hook-based knockout."""

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


@pytest.mark.e2e
def test_export_command_from_a_report(tiny_model_dir, tmp_path):
    report = tmp_path / "talo_report.json"
    report.write_text(
        json.dumps(
            {
                "config": {"intervention": "zero"},
                "subtasks": [
                    {"task": "mmstar", "subtask": "mmstar/math", "selected_layer": 3, "selection_reason": "x"},
                    {
                        "task": "mmstar",
                        "subtask": "mmstar/science",
                        "selected_layer": None,
                        "selection_reason": "no gain",
                    },
                ],
            }
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "lmms_talo",
        "export",
        "--pretrained",
        str(tiny_model_dir("llama")),
        "--from-report",
        str(report),
        "--task",
        "mmstar/math",
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["talo"]["knocked_out_layers"] == [3]
    assert (tmp_path / "out" / "tokenizer.json").exists()
    cmd[cmd.index("mmstar/math")] = "mmstar/science"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env())
    assert proc.returncode != 0 and "kept the full model (no gain); nothing to export" in proc.stderr
