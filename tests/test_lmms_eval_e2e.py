"""TaLo through the real lmms-eval command line, offline, on tiny random VLMs and local tasks."""

import json

import pytest
from cli_tasks import run_lmms_eval, samples, write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

pytestmark = pytest.mark.e2e

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
    args = (
        f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots={SHOTS},report={report_path},state_dir=none"
    )
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

    # lmms-eval's own files carry the decision: a `talo` block beside `results`, a `talo` field per sample row
    block = results["talo"]
    assert (
        block["plugin"] == "lmms-talo" and block["args"]["probe_shots"] == SHOTS and block["report"] == str(report_path)
    )
    assert block["subtasks"]["talo_oracle"]["knockout"] == [ORACLE_LAYER]
    assert block["subtasks"]["talo_oracle"]["test_score_talo"] == 1.0
    assert "talo" not in results["results"] and set(results["results"]["talo_oracle"]) >= {"exact_match,none"}
    rows = samples(tmp_path / "out", "talo_oracle")
    pool = set(group["pool"])
    assert len(rows) == N_DOCS
    assert all(r["talo"] == {"knockout": [ORACLE_LAYER], "in_probe_pool": r["doc_id"] in pool} for r in rows)
    _hub_card_step_reads_the_results_and_ignores_talos_files(tmp_path / "out")


def _hub_card_step_reads_the_results_and_ignores_talos_files(output):
    """--hf_hub_log_args, without network: lmms-eval's card step picks results and sample files by name
    and reads the latest results file with `datasets`; TaLo's files are neither, its block reads fine."""
    import datasets
    from lmms_eval.utils import get_results_filenames, get_sample_results_filenames

    talo_files = ["talo_report.json", "talo_interaction_heatmap.png", "model/talo_report.json"]
    assert get_results_filenames(talo_files) == [] and get_sample_results_filenames(talo_files) == []
    # the probe log is picked exactly as lmms-eval's own sample file
    (own,) = output.rglob("*_samples_talo_oracle.jsonl")
    probe = own.with_name(own.name.replace(".jsonl", "_talo_probe.jsonl"))
    assert probe.exists()
    names = [str(p.relative_to(output)) for p in (own, probe)]
    assert len(get_sample_results_filenames(names)) in (0, 2) and get_results_filenames(names) == []
    (results_file,) = output.rglob("*_results.json")
    card_view = datasets.load_dataset("json", data_files=str(results_file), split="train")
    assert card_view["results"][0]["talo_oracle"]["exact_match,none"] == 1.0
    assert card_view["talo"][0]["subtasks"]["talo_oracle"]["knockout"] == [ORACLE_LAYER]


def test_limit_and_predict_only_are_stated_and_recorded(tmp_path, tiny_model_dir):
    model, arch, extra = CASES["llava"]
    folder = write_image_task(tmp_path / "task", "talo_plain", ["?"] * N_DOCS)
    report_path = tmp_path / "report.json"
    args = (
        f"pretrained={tiny_model_dir(arch)},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots=3,layers=1-2,max_redraws=0,"
        f"report={report_path},state_dir=none"
    )
    _, proc = run_lmms_eval(
        model, args, "talo_plain", folder, tmp_path / "out", *extra, "--limit", "12", "--predict_only"
    )
    report = json.loads(report_path.read_text())
    assert report["harness_run"] == {"limit": 12, "predict_only": True}
    (group,) = report["subtasks"]
    assert len(group["pool"]) == 12 // 3 and group["test_doc_count"] == 12 - 4  # split from the 12 limited docs
    assert "--limit 12: each probe split is drawn from the limited docs" in proc.stderr
    assert "--predict_only: TaLo still scores its probe docs" in proc.stderr
    # the cost, said before the sweep and measured after its first pass; the bar (--verbosity DEBUG)
    assert (
        "1 sub-task(s) to probe (0 not probed), 3 variants each" in proc.stderr
        and "round 0 alone is up to 9 probe passes" in proc.stderr
    )
    assert "one probe pass took" in proc.stderr and "TaLo probe passes (generate_until)" in proc.stderr


def test_wandb_offline_run_holds_the_interaction_table_and_heatmap(tmp_path, tiny_model_dir):
    """lmms-eval's --wandb_args with WANDB_MODE=offline: the run's files hold TaLo's table and image."""
    import subprocess
    import sys

    from cli_tasks import cli_env

    model, arch, extra = CASES["llava"]
    folder = write_image_task(tmp_path / "task", "talo_wb", ["?"] * 12)
    args = (
        f"pretrained={tiny_model_dir(arch)},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots=3,layers=1-2,max_redraws=0,"
        f"report={tmp_path / 'r.json'},state_dir=none"
    )
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        model,
        "--model_args",
        args,
        "--tasks",
        "talo_wb",
        "--include_path",
        str(folder),
        "--output_path",
        str(tmp_path / "out"),
        "--batch_size",
        "1",
        "--wandb_args",
        f"project=talo_test,dir={tmp_path}",
        *extra,
    ]
    env = {**cli_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/talo/interaction_vectors_*.table.json")
    data = json.loads(table.read_text())
    report = json.loads((tmp_path / "r.json").read_text())
    (group,) = report["subtasks"]
    assert data["columns"] == ["subtask", "layer", "probe_gain", "selected"]
    assert {(row[1], row[2]) for row in data["data"]} == {(int(l), g) for l, g in group["interaction_vector"].items()}
    assert list((tmp_path / "wandb").glob("offline-run-*/files/media/images/talo/interaction_heatmap_*.png"))


def test_probe_passes_are_logged_beside_the_sample_file_and_rescore_offline(tmp_path, tiny_model_dir):
    """`<time>_samples_<task>_talo_probe.jsonl` holds every probe pass: re-scoring its stored answers
    with the task's own scoring (here exact match) gives the report's per-doc probe scores."""
    model, arch, extra = CASES["llava"]
    answers = [f"a{i % 4}" for i in range(15)]
    folder = write_image_task(tmp_path / "task", "talo_logged", answers)
    args = (
        f"pretrained={tiny_model_dir(arch)},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots=3,layers=1-2,max_redraws=0,"
        f"report={tmp_path / 'r.json'},state_dir=none"
    )
    run_lmms_eval(model, args, "talo_logged", folder, tmp_path / "out", *extra)
    (own,) = (tmp_path / "out").rglob("*_samples_talo_logged.jsonl")
    (probe,) = (tmp_path / "out").rglob("*_samples_talo_logged_talo_probe.jsonl")
    assert probe.parent == own.parent and probe.name == own.name.replace(".jsonl", "_talo_probe.jsonl")
    header, *rows = [json.loads(line) for line in probe.read_text().splitlines()]
    (group,) = json.loads((tmp_path / "r.json").read_text())["subtasks"]
    assert (
        header["kind"] == "subtask" and header["subtask"] == group["subtask"] and all(r["kind"] == "pass" for r in rows)
    )
    assert header["rounds"] == [{k: r[k] for k in ("round", "drawn", "probe_docs")} for r in group["rounds"]]
    assert {(r["variant"], r["unit"]) for r in rows} == {
        (v, d) for v, docs in group["probe_doc_scores"].items() for d in docs
    }
    for row in rows:
        (doc,) = row["doc_ids"]
        rescored = float(row["responses"][0].strip() == answers[doc])
        assert rescored == row["score"] == group["probe_doc_scores"][row["variant"]][row["unit"]]
    _probe_log_is_redecided_offline(probe, group, tmp_path)


def _probe_log_is_redecided_offline(probe, group, tmp_path):
    """The log read back re-decides as the run did; re-scored responses change the decision; and
    `lmms-talo analyze` takes the log as its input."""
    import subprocess
    import sys

    from cli_tasks import cli_env

    from lmms_talo.outputs.probe_log import report_from_probe_log

    (again,) = report_from_probe_log(probe)["subtasks"]
    for key in ("selected_layers", "interaction_vector", "probe_docs", "probe_doc_scores"):
        assert again[key] == group[key], key
    assert [r["layer_scores"] for r in again["rounds"]] == [r["layer_scores"] for r in group["rounds"]]
    # a user's re-scoring: layer 2 answers every probe doc right, the base model none
    lines = [json.loads(line) for line in probe.read_text().splitlines()]
    for row in lines[1:]:
        row["score"] = float(row["variant"] == "2")
    rescored = probe.with_name("rescored_talo_probe.jsonl")
    rescored.write_text("".join(json.dumps(row) + "\n" for row in lines))
    (changed,) = report_from_probe_log(rescored)["subtasks"]
    assert changed["selected_layers"] == [2] and changed["interaction_vector"]["2"] == 1.0
    assert changed["recorded_selected_layers"] == group["selected_layers"]
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_talo", "analyze", str(rescored), "-o", str(tmp_path / "analysis")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert group["subtask"] in (tmp_path / "analysis" / "report.md").read_text()
