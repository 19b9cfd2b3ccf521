"""TaLo through the real lmms-eval command line, offline, on tiny random VLMs and local tasks."""

import json

import pytest

from harness import run_lmms_eval, samples, write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

N_DOCS = 30
SHOTS = 4
ORACLE_LAYER = 2

CASES = {  # TaLo model, architecture, extra CLI flags
    "llava": ("talo_llava", "llava", ("--force_simple",)),
    "qwen2_vl": ("talo_qwen2_vl", "qwen2_vl", ()),
}


def _text(filtered):
    return filtered if isinstance(filtered, str) else filtered[0]


def _answers_under(tmp_path, model, arch, model_dir, extra, layer):
    """What the model answers on each doc with `layer` knocked out (force_layer: no probing)."""
    folder = write_image_task(tmp_path / "seed_task", "talo_seed", ["?"] * N_DOCS)
    args = f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS[arch]},force_layer={layer},probe_shots={SHOTS},state_dir=none"
    run_lmms_eval(model, args, "talo_seed", folder, tmp_path / "seed_out", *extra)
    by_doc = {s["doc_id"]: _text(s["filtered_resps"]).strip() for s in samples(tmp_path / "seed_out", "talo_seed")}
    return [by_doc[i] for i in range(N_DOCS)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_oracle_task_selects_the_knocked_out_layer(tmp_path, tiny_model_dir, case):
    model, arch, extra = CASES[case]
    model_dir = tiny_model_dir(arch)
    oracle = _answers_under(tmp_path, model, arch, model_dir, extra, ORACLE_LAYER)
    assert len(set(oracle)) > 1, "the tiny model must not answer everything the same way"

    folder = write_image_task(tmp_path / "oracle_task", "talo_oracle", oracle)
    report_path = tmp_path / "report.json"
    args = f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots={SHOTS},report={report_path},state_dir=none"
    results, proc = run_lmms_eval(model, args, "talo_oracle", folder, tmp_path / "out", *extra)

    assert results["results"]["talo_oracle"]["exact_match,none"] == 1.0
    report = json.loads(report_path.read_text())
    (group,) = report["subtasks"]
    assert group["selected_layer"] == ORACLE_LAYER
    assert group["candidate_layers"] == [1, 2, 3]
    assert group["interaction_vector"][str(ORACLE_LAYER)] > 0
    assert len(group["pool"]) == min(N_DOCS // 3, 4 * SHOTS)
    assert group["test"]["talo"]["n"] == N_DOCS - len(group["pool"])
    assert group["test"]["talo"]["score"] == 1.0
    assert set(group["probe_docs"]) <= set(group["pool"])
    assert "TaLo" in proc.stderr + proc.stdout
