"""Resume after a kill, stale or corrupt probe results, unwritable reports, unscorable tasks."""

import json
import signal
import subprocess
import sys
import time

import pytest

from harness import cli_env, run_lmms_eval, write_image_task
from lmms_talo.scoring import ScoringError
from lmms_talo.store import ProbeStore
from tiny_models import LMMS_EVAL_MODEL_ARGS


def test_store_ignores_corrupt_and_foreign_lines(tmp_path, caplog):
    store = ProbeStore(tmp_path, {"model": "m", "seed": 0})
    store.put("base", 3, 1.0, ["A"])
    store.put("2", 3, 0.0, [(-1.5, False)])
    with open(store.path, "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"fp": "someone-else", "variant": "base", "doc": "4", "score": 1.0, "responses": []}) + "\n")
    with caplog.at_level("WARNING", logger="lmms_talo"):
        reread = ProbeStore(tmp_path, {"model": "m", "seed": 0})
    assert reread.get("base", 3) == (1.0, ["A"])
    assert reread.get("2", 3) == (0.0, [(-1.5, False)])
    assert reread.get("base", 4) is None
    assert "ignored 2 unreadable or foreign lines" in caplog.text
    assert ProbeStore(tmp_path, {"model": "m", "seed": 1}).get("base", 3) is None, "another seed never reuses"


def _slow_task(folder):
    folder = write_image_task(folder, "talo_resume", [f"a{i % 4}" for i in range(30)])
    yaml = folder / "talo_resume.yaml"
    yaml.write_text(yaml.read_text().replace("max_new_tokens: 4", "max_new_tokens: 24"))
    return folder


def _lmms_eval_cmd(model_dir, folder, output, state_dir, report):
    # One round (resample_rounds=1) so that every stored result is read back at most once. Prefix
    # replay is off: with it on, a doc whose base result is stored but whose knockouts are not has
    # its base pass re-run once, by design, to record the prefix the knockouts then replay.
    args = (f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=6,state_dir={state_dir},"
            f"resample_rounds=1,replay=false,report={report}")
    return [sys.executable, "-m", "lmms_eval", "--model", "talo_llava", "--force_simple", "--model_args", args,
            "--tasks", "talo_resume", "--include_path", str(folder), "--output_path", str(output),
            "--batch_size", "1", "--verbosity", "DEBUG"]


def _store_lines(state_dir):
    return sum(len(p.read_text().splitlines()) for p in state_dir.glob("*.jsonl"))


def test_killed_sweep_resumes_without_recomputing(tmp_path, tiny_model_dir):
    folder = _slow_task(tmp_path / "task")
    state = tmp_path / "state"
    total = 6 * 4  # probe docs x (baseline + layers 1..3), first round
    proc = subprocess.Popen(_lmms_eval_cmd(tiny_model_dir("llava"), folder, tmp_path / "o1", state, tmp_path / "r1.json"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _store_lines(state) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _store_lines(state)
    assert 0 < done < total, f"the kill must land mid-sweep ({done} of {total} results stored)"

    resumed = subprocess.run(_lmms_eval_cmd(tiny_model_dir("llava"), folder, tmp_path / "o2", state, tmp_path / "r2.json"),
                             env=cli_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (group,) = json.loads((tmp_path / "r2.json").read_text())["subtasks"]
    assert group["probe_docs_reused"] == done
    assert group["probe_docs_computed"] == total - done

    fresh = subprocess.run(_lmms_eval_cmd(tiny_model_dir("llava"), folder, tmp_path / "o3", tmp_path / "fresh", tmp_path / "r3.json"),
                           env=cli_env(), capture_output=True, text=True)
    assert fresh.returncode == 0
    (clean,) = json.loads((tmp_path / "r3.json").read_text())["subtasks"]
    assert (clean["probe_docs_reused"], clean["probe_docs_computed"]) == (0, total)
    assert (clean["selected_layer"], clean["interaction_vector"]) == (group["selected_layer"], group["interaction_vector"])


def test_unwritable_report_keeps_the_results(tmp_path, tiny_model_dir):
    folder = write_image_task(tmp_path / "task", "talo_unwritable", ["a"] * 12)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the report folder should be")
    args = f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=2,state_dir=none,report={blocker}/r.json"
    results, proc = run_lmms_eval("talo_llava", args, "talo_unwritable", folder, tmp_path / "out", "--force_simple")
    assert "exact_match,none" in results["results"]["talo_unwritable"]
    assert "cannot write the report" in proc.stderr + proc.stdout


def test_task_without_a_scorable_metric(tmp_path, tiny_model_dir):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    folder = write_image_task(tmp_path / "task", "talo_unscorable", ["a"] * 12)
    with open(folder / "utils.py", "a") as handle:
        handle.write("\n\ndef process_results(doc, results):\n    return {'prediction': {'text': results[0]}}\n")
    yaml = folder / "talo_unscorable.yaml"
    yaml.write_text(yaml.read_text().replace(
        "metric_list:\n  - metric: exact_match", "process_results: !function utils.process_results\nmetric_list:\n  - metric: prediction"
    ))
    lm = get_model("talo_llava", True).create_from_arg_string(
        f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=2,state_dir=none"
    )
    with pytest.raises(ScoringError, match="no metric TaLo can score per doc.*\\['prediction'\\].*RECORD_SCORERS"):
        simple_evaluate(model=lm, tasks=["talo_unscorable"], task_manager=TaskManager(include_path=str(folder)), batch_size=1)
