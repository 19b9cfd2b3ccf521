"""Resume after a kill, stale or corrupt probe results, unwritable reports, unscorable tasks."""

import json
import signal
import subprocess
import sys
import time

import pytest
from cli_tasks import cli_env, run_lmms_eval, write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.harness.scoring import ScoringError
from lmms_talo.outputs.probe_store import ProbeStore


def test_store_ignores_corrupt_and_foreign_lines(tmp_path, caplog):
    store = ProbeStore(tmp_path, {"model": "m", "seed": 0})
    store.put("base", 3, 1.0, ["A"])
    store.put("2", 3, 0.0, [(-1.5, False)])
    with open(store.path, "a") as handle:
        handle.write("{not json\n")
        handle.write(
            json.dumps({"fp": "someone-else", "variant": "base", "doc": "4", "score": 1.0, "responses": []}) + "\n"
        )
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
    # One round (max_redraws=0) so that every stored result is read back at most once. Prefix
    # replay is off: with it on, a doc whose base result is stored but whose knockouts are not has
    # its base pass re-run once, by design, to record the prefix the knockouts then replay.
    args = (
        f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=6,state_dir={state_dir},"
        f"max_redraws=0,replay=false,report={report}"
    )
    return [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "talo_llava",
        "--force_simple",
        "--model_args",
        args,
        "--tasks",
        "talo_resume",
        "--include_path",
        str(folder),
        "--output_path",
        str(output),
        "--batch_size",
        "1",
        "--verbosity",
        "DEBUG",
    ]


def _store_lines(state_dir):
    return sum(len(p.read_text().splitlines()) for p in state_dir.glob("*.jsonl"))


@pytest.mark.e2e
def test_killed_sweep_resumes_without_recomputing(tmp_path, tiny_model_dir):
    folder = _slow_task(tmp_path / "task")
    state = tmp_path / "state"
    total = 6 * 4  # probe docs x (baseline + layers 1..3), first round
    proc = subprocess.Popen(
        _lmms_eval_cmd(tiny_model_dir("llava"), folder, tmp_path / "o1", state, tmp_path / "r1.json"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while _store_lines(state) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _store_lines(state)
    assert 0 < done < total, f"the kill must land mid-sweep ({done} of {total} results stored)"

    resumed = subprocess.run(
        _lmms_eval_cmd(tiny_model_dir("llava"), folder, tmp_path / "o2", state, tmp_path / "r2.json"),
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (group,) = json.loads((tmp_path / "r2.json").read_text())["subtasks"]
    assert group["probe_docs_reused"] == done
    assert group["probe_docs_computed"] == total - done

    fresh = subprocess.run(
        _lmms_eval_cmd(tiny_model_dir("llava"), folder, tmp_path / "o3", tmp_path / "fresh", tmp_path / "r3.json"),
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert fresh.returncode == 0
    (clean,) = json.loads((tmp_path / "r3.json").read_text())["subtasks"]
    assert (clean["probe_docs_reused"], clean["probe_docs_computed"]) == (0, total)
    assert (clean["selected_layer"], clean["interaction_vector"]) == (
        group["selected_layer"],
        group["interaction_vector"],
    )


@pytest.mark.e2e
def test_unwritable_report_keeps_the_results(tmp_path, tiny_model_dir):
    folder = write_image_task(tmp_path / "task", "talo_unwritable", ["a"] * 12)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the report folder should be")
    args = (
        f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=2,state_dir=none,"
        f"report={blocker}/r.json"
    )
    results, proc = run_lmms_eval("talo_llava", args, "talo_unwritable", folder, tmp_path / "out", "--force_simple")
    assert "exact_match,none" in results["results"]["talo_unwritable"]
    assert "cannot write the report" in proc.stderr + proc.stdout


@pytest.mark.e2e
def test_task_without_a_scorable_metric(tmp_path, tiny_model_dir):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    folder = write_image_task(tmp_path / "task", "talo_unscorable", ["a"] * 12)
    with open(folder / "utils.py", "a") as handle:
        handle.write("\n\ndef process_results(doc, results):\n    return {'prediction': {'text': results[0]}}\n")
    yaml = folder / "talo_unscorable.yaml"
    yaml.write_text(
        yaml.read_text().replace(
            "metric_list:\n  - metric: exact_match",
            "process_results: !function utils.process_results\nmetric_list:\n  - metric: prediction",
        )
    )
    lm = get_model("talo_llava", True).create_from_arg_string(
        f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=2,state_dir=none"
    )
    with pytest.raises(ScoringError, match="no metric TaLo can score per doc.*\\['prediction'\\].*RECORD_SCORERS"):
        simple_evaluate(
            model=lm, tasks=["talo_unscorable"], task_manager=TaskManager(include_path=str(folder)), batch_size=1
        )


# --- one evaluation's state ends with it (issue 12, part 3) ---

POOL_TASK_UTILS = """
from lmms_talo.harness.pool_exclusion import SubTaskDocs, aggregate_test_docs, marked_results


def _answer_is_yes(doc, results):
    return {"exact_match": float(doc["answer"] == "yes")}  # the doc's own value: pool and test differ


process_docs = SubTaskDocs("talo_scoped", "category", ("all",))
process_results = marked_results(_answer_is_yes, "exact_match")
aggregation = aggregate_test_docs(lambda scores: sum(scores) / len(scores))
"""


def _pool_excluding_task(folder, answers):
    """A talo_* style task: its aggregate drops the probe pool, read from the evaluation's split."""
    write_image_task(folder, "talo_scoped", answers)
    with open(folder / "utils.py", "a") as handle:
        handle.write(POOL_TASK_UTILS)
    yaml = folder / "talo_scoped.yaml"
    yaml.write_text(
        yaml.read_text().replace(
            "metric_list:\n  - metric: exact_match\n    aggregation: mean",
            "process_docs: !function utils.process_docs\nprocess_results: !function utils.process_results\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: !function utils.aggregation",
        )
    )
    return folder


@pytest.mark.e2e
def test_a_plain_evaluation_after_a_talo_one_sees_none_of_its_state(tmp_path, tiny_model_dir, monkeypatch):
    """From Python, as a pipeline runs them: a TaLo run that publishes a split with no pool
    (force_layer), then a plain llava_hf run of the same pool-excluding task. The plain run must
    score the protocol's test set, not the TaLo run's split, and lmms-eval is itself again."""
    import lmms_eval.evaluator as evaluator
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from lmms_talo.harness import evaluation_scope, pool_exclusion
    from lmms_talo.method.probe_split import split_subtask

    monkeypatch.setenv(pool_exclusion.SHOTS_ENV, "3")
    monkeypatch.delenv(pool_exclusion.SEED_ENV, raising=False)
    answers = ["yes" if i % 3 == 0 else "no" for i in range(12)]
    folder = _pool_excluding_task(tmp_path / "task", answers)
    pool = set(split_subtask("talo_scoped", list(range(12)), 3, 0).pool)
    test_mean = sum(a == "yes" for i, a in enumerate(answers) if i not in pool) / (12 - len(pool))
    all_mean = sum(a == "yes" for a in answers) / 12
    assert test_mean != all_mean, "the check needs a pool whose exclusion changes the aggregate"
    lmms_unwrap = evaluator.unwrap_generation_output
    model_args = f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']}"

    def evaluate(lm):
        results = simple_evaluate(
            model=lm,
            tasks=["talo_scoped"],
            task_manager=TaskManager(include_path=str(folder)),
            batch_size=1,
            force_simple=True,
        )
        return results["results"]["talo_scoped"]["exact_match,none"]

    talo = get_model("talo_llava", True).create_from_arg_string(
        f"{model_args},probe_shots=3,force_layer=1,state_dir=none,report={tmp_path / 'r.json'}"
    )
    assert evaluate(talo) == all_mean, "force_layer probes nothing: every doc is a test doc"
    assert evaluation_scope.published("talo_scoped") is None and evaluation_scope.published_names() == []
    with pytest.raises(RuntimeError, match="no evaluation in progress"):
        evaluation_scope.current()
    assert evaluator.unwrap_generation_output is lmms_unwrap, "TaLo's repair of lmms-eval ends with its evaluation"

    plain = get_model("llava_hf", True).create_from_arg_string(model_args)
    assert evaluate(plain) == test_mean, "the plain run recomputes the protocol's split"


# --- a failure the base class swallows is an error during probing (issue 12, part 4) ---


def _probe(model, cls_kind, tmp_path, tiny_model_dir, break_it):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    folder = write_image_task(tmp_path / "task", "talo_swallowed", [f"a{i % 3}" for i in range(9)])
    arch = {"talo_llava": "llava", "talo_qwen2_vl": "qwen2_vl"}[model]
    lm = get_model(model, cls_kind == "simple").create_from_arg_string(
        f"pretrained={tiny_model_dir(arch)},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots=3,layers=1,state_dir=none,"
        f"report={tmp_path / 'r.json'}"
    )
    break_it(lm)
    simple_evaluate(
        model=lm,
        tasks=["talo_swallowed"],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=1,
        force_simple=cls_kind == "simple",
    )


@pytest.mark.e2e
def test_a_failed_decode_in_a_probe_is_an_error_not_an_empty_answer(tmp_path, tiny_model_dir, monkeypatch):
    """lmms-eval's chat llava_hf decodes inside its generate try/except, logs the error, answers ""."""
    from lmms_talo.harness.failures import GenerationFailed

    def broken_decode(lm):
        def batch_decode(*args, **kwargs):
            raise ValueError("decoder table is corrupt")

        monkeypatch.setattr(lm.tokenizer, "batch_decode", batch_decode)

    with pytest.raises(GenerationFailed, match=r"probe pass \(base\): it logged the error .*decoder table is corrupt"):
        _probe("talo_llava", "chat", tmp_path, tiny_model_dir, broken_decode)


@pytest.mark.e2e
def test_a_failed_image_preprocessing_in_a_probe_is_an_error_not_an_imageless_answer(
    tmp_path, tiny_model_dir, monkeypatch
):
    """lmms-eval's simple qwen2_vl catches an image it cannot encode, logs it and answers without it."""
    from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

    from lmms_talo.harness.failures import GenerationFailed

    def broken_image_encoding(lm):
        def encode(self, image):
            raise OSError("image file is truncated")

        monkeypatch.setattr(Qwen2_VL, "_encode_image_data_url", encode)

    with pytest.raises(GenerationFailed, match=r"Failed to process PIL image: image file is truncated"):
        _probe("talo_qwen2_vl", "simple", tmp_path, tiny_model_dir, broken_image_encoding)
