"""A run served from the harness's response cache carries the same TaLo record as the run that
filled it (issue 24, part 2), through the real CLIs.

lmms-eval (`--use_cache DIR`) on the tiny LLaVA's oracle task, whose answers are layer 2's
knockout: a second run that changes only its output and report paths is served every answer from
the cache, and still decides, reports, fills the `talo` block and tags every sample row; a run
after a `--limit` run scores every test doc. lm-eval (`lmms-talo lm-eval --use_cache`) the same.
"""

import json

import pytest
from cli_tasks import run_lmms_eval, samples, write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

pytestmark = pytest.mark.e2e

N_DOCS, SHOTS, ORACLE_LAYER = 24, 4, 2
FLAGS = ("--force_simple",)


def _text(filtered):
    return (filtered if isinstance(filtered, str) else filtered[0]).strip()


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, tmp_path_factory):
    """The tiny LLaVA and a task whose gold answers are its answers with layer 2 knocked out."""
    model_dir = tiny_model_dir("llava")
    root = tmp_path_factory.mktemp("cache_oracle")
    seed = write_image_task(root / "seed_task", "talo_seed", ["?"] * N_DOCS)
    args = f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},force_layer={ORACLE_LAYER},state_dir=none"
    run_lmms_eval("talo_llava", args, "talo_seed", seed, root / "seed_out", *FLAGS)
    by_doc = {s["doc_id"]: _text(s["filtered_resps"]) for s in samples(root / "seed_out", "talo_seed")}
    answers = [by_doc[i] for i in range(N_DOCS)]
    assert len(set(answers)) > 1, "the tiny model must not answer everything the same way"
    return model_dir, write_image_task(root / "task", "talo_cached", answers)


def _run(tmp_path, oracle, name, cache, *extra):
    model_dir, task = oracle
    report = tmp_path / f"{name}.json"
    args = (
        f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots={SHOTS},"
        f"state_dir={tmp_path / 'state'},report={report}"
    )
    results, proc = run_lmms_eval(
        "talo_llava", args, "talo_cached", task, tmp_path / f"out_{name}", *FLAGS, "--use_cache", str(cache), *extra
    )
    (group,) = json.loads(report.read_text())["subtasks"]
    return results, group, samples(tmp_path / f"out_{name}", "talo_cached")


def test_a_run_served_from_lmms_evals_cache_keeps_the_whole_talo_record(oracle, tmp_path):
    cache = tmp_path / "cache"
    results, first, rows = _run(tmp_path, oracle, "first", cache)
    assert first["selected_layer"] == ORACLE_LAYER and first["answers_from_cache"] == 0

    again, served, served_rows = _run(tmp_path, oracle, "again", cache)  # only the report and output paths differ
    assert served["answers_from_cache"] == N_DOCS, (
        "every answer comes from the cache, the report path is not in its key"
    )
    assert served["probe_docs_computed"] == 0, "the probe passes come from the probe store"
    for key in ("selected_layers", "pool", "interaction_vector", "probe_doc_scores"):
        assert served[key] == first[key]
    assert served["test"]["talo"] == first["test"]["talo"] and served["test"]["talo"]["score"] == 1.0
    assert again["talo"]["subtasks"]["talo_cached"]["knockout"] == [ORACLE_LAYER]
    assert again["talo"]["subtasks"] == results["talo"]["subtasks"]
    pool = set(served["pool"])
    assert len(served_rows) == N_DOCS
    assert all(r["talo"] == {"knockout": [ORACLE_LAYER], "in_probe_pool": r["doc_id"] in pool} for r in served_rows)
    assert again["results"]["talo_cached"]["exact_match,none"] == 1.0


def test_a_run_partly_served_from_the_cache_scores_every_test_doc(oracle, tmp_path):
    cache = tmp_path / "cache"
    _run(tmp_path, oracle, "limited", cache, "--limit", "12")
    _, full, rows = _run(tmp_path, oracle, "full", cache)
    assert full["test"]["talo"]["n"] == full["test_doc_count"] == N_DOCS - len(full["pool"])
    assert len(rows) == N_DOCS and all(r["talo"]["knockout"] == full["selected_layers"] for r in rows)
    assert 0 <= full["answers_from_cache"] <= 12
