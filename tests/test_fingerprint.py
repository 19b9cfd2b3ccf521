"""The probe store's fingerprint covers everything that changes a probe answer (issue 12, part 1).

Through the real lmms-eval CLI, with one state_dir: a change of the model's form (chat or
--force_simple), of a non-TaLo model arg or of the dtype recomputes every probe pass; an unchanged
rerun reuses them all. Results written under other library versions are never reused.
"""

import json

import pytest
from cli_tasks import run_lmms_eval, write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.outputs.probe_store import ProbeStore

SHOTS, LAYERS = 3, 2
PROBE_RESULTS = SHOTS * (1 + LAYERS)  # probe docs x (baseline + layers 1-2), one round


def _run(tmp_path, name, state, extra_args="", *flags):
    args = (
        f"pretrained={state['model']},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots={SHOTS},layers=1-{LAYERS},"
        f"max_redraws=0,replay=false,state_dir={state['dir']},report={tmp_path / name}.json{extra_args}"
    )
    run_lmms_eval("talo_llava", args, "talo_fp", state["task"], tmp_path / f"out_{name}", *flags)
    report = json.loads((tmp_path / f"{name}.json").read_text())
    (group,) = report["subtasks"]
    return report, (group["probe_docs_computed"], group["probe_docs_reused"])


@pytest.mark.e2e
def test_form_model_args_and_dtype_each_recompute_every_probe_pass(tmp_path, tiny_model_dir):
    state = {
        "model": tiny_model_dir("llava"),
        "dir": tmp_path / "state",
        "task": write_image_task(tmp_path / "task", "talo_fp", [f"a{i % 3}" for i in range(9)]),
    }
    first, counts = _run(tmp_path, "chat", state)
    assert counts == (PROBE_RESULTS, 0)
    assert first["harness_model"]["simple"] is False and first["model"]["dtype"] == ["float32"]

    simple, counts = _run(tmp_path, "simple", state, "", "--force_simple")
    assert simple["harness_model"]["simple"] is True
    assert counts == (PROBE_RESULTS, 0), "the simple form builds another prompt: nothing of the chat run is reused"

    _, counts = _run(tmp_path, "eager", state, ",attn_implementation=eager")
    assert counts == (PROBE_RESULTS, 0), "a changed non-TaLo model arg reuses nothing"

    half, counts = _run(tmp_path, "bf16", state, ",dtype=bfloat16")
    assert half["model"]["dtype"] == ["bfloat16"], "the dtype is read off the loaded parameters"
    assert counts == (PROBE_RESULTS, 0), "another dtype reuses nothing"

    again, counts = _run(tmp_path, "again", state)
    assert counts == (0, PROBE_RESULTS), "an unchanged rerun reuses every probe pass"
    assert again["subtasks"][0]["interaction_vector"] == first["subtasks"][0]["interaction_vector"]
    assert {
        "lmms-talo",
        "lmms-talo@source",
        "transformers",
        "torch",
        "torchvision",
        "tokenizers",
        "pillow",
        "lmms-eval",
    } <= set(again["versions"])
    assert all(
        again["versions"][name] for name in ("lmms-talo", "lmms-talo@source", "transformers", "torch", "lmms-eval")
    )
    assert len(list(state["dir"].glob("*.jsonl"))) == 4


def test_results_written_under_other_versions_are_not_reused(tmp_path, caplog):
    old = {"transformers": "5.23.0", "torch": "2.14.1", "lmms-eval": "0.7.3"}
    new = {**old, "transformers": "5.24.0"}
    ProbeStore(tmp_path, {"model": "m"}, old).put("base", 3, 1.0, ["A"])
    with caplog.at_level("WARNING", logger="lmms_talo"):
        store = ProbeStore(tmp_path, {"model": "m"}, new)
    assert store.get("base", 3) is None
    assert "1 probe results" in caplog.text and "written under other versions" in caplog.text
    assert '"transformers": "5.23.0"' in caplog.text and '"transformers": "5.24.0"' in caplog.text
    store.put("base", 3, 0.0, ["B"])
    assert ProbeStore(tmp_path, {"model": "m"}, new).get("base", 3) == (0.0, ["B"])
    assert ProbeStore(tmp_path, {"model": "m"}, old).get("base", 3) == (1.0, ["A"]), "each line keeps its versions"


def test_fingerprint_ignores_memory_addresses():
    """Model args given from Python may be objects: their reprs' addresses change every run."""
    from lmms_talo.outputs.probe_store import fingerprint_of

    assert fingerprint_of({"arg": object()}) == fingerprint_of({"arg": object()})
    assert fingerprint_of({"arg": object()}) != fingerprint_of({"arg": 1})


def test_pool_content_changes_with_a_docs_prompt_or_target_not_with_other_docs():
    """The probe store's key covers what the probe docs are: a changed data file (prompt or gold
    answer of a pool doc) under the same task config gets a new store, a change outside the pool not."""
    from types import SimpleNamespace

    from lmms_talo.outputs.probe_store import pool_content

    def digest(prompts, targets, pool=(0, 2)):
        task = SimpleNamespace(eval_docs=[{"t": t} for t in targets], doc_to_target=lambda doc: doc["t"])
        requests = {
            d: [SimpleNamespace(args=(prompts[d], {"max_new_tokens": 4}, d, "task"))] for d in range(len(prompts))
        }
        return pool_content(task, pool, requests.__getitem__)

    first = digest(["q0", "q1", "q2"], ["a", "b", "c"])
    assert digest(["q0", "q1", "q2"], ["a", "b", "c"]) == first
    assert digest(["q0", "q1 changed", "q2"], ["a", "b changed", "c"]) == first  # doc 1 is not in the pool
    assert digest(["q0", "q1", "q2 changed"], ["a", "b", "c"]) != first
    assert digest(["q0", "q1", "q2"], ["a", "b", "c changed"]) != first
    assert digest(["q0", "q1", "q2"], ["a", "b", "c"], pool=(0, 1)) != first
