"""The batched sweep engine (lmms_talo.method.batching): many probe docs per harness call gives the
sequential engine's per-doc scores and decisions in every mode, with fewer calls; its run-time
self-check falls back to the sequential engine on a difference, and a killed batched run resumes."""

import json

import numpy as np
import pytest
from cli_tasks import write_image_task
from test_sweep import LAYERS, ScoreTable, random_table
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.harness.sweep_engine import disk_offloaded, harness_batch_size
from lmms_talo.method.batching import SweepEngine, compare_engines
from lmms_talo.method.interventions import names as intervention_names
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import make_rule
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore


class CallLog(ScoreTable):
    """A score table that also logs each call's docs."""

    def __init__(self, table):
        super().__init__(table)
        self.calls: list[tuple[str, tuple]] = []

    def answer(self, knockout, docs):
        self.calls.append((knockout.label if knockout else "base", tuple(docs)))
        return super().answer(knockout, docs)


def run(table, mode, split, batched: bool, store=None, answer=None, threshold=0.0, rule="gain"):
    model = CallLog(table)
    engine = SweepEngine(batched, "test", docs_per_call=3) if batched else SweepEngine(False, "test")
    sweep = LayerSweep(
        answer or model.answer,
        model.score,
        store or ProbeStore(None, {}),
        mode=mode,
        rule=make_rule(rule, threshold=threshold),
        engine=engine,
    )
    return sweep.run(split, LAYERS, "zero", 2), model


@pytest.mark.parametrize("mode", ["full", "select"])
@pytest.mark.parametrize("seed", range(6))
def test_batched_engine_decides_as_the_sequential_one(mode, seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, 40)
    split = split_subtask("t", list(range(40)), 4, seed=seed)
    batched, batched_model = run(table, mode, split, True)
    sequential, sequential_model = run(table, mode, split, False)
    assert [r.selected for r in batched.rounds] == [r.selected for r in sequential.rounds]
    assert [r.layer_scores for r in batched.rounds] == [r.layer_scores for r in sequential.rounds]
    if mode == "full":
        assert batched.doc_scores == sequential.doc_scores
    else:  # select mode prunes after each call: a chunk of docs runs where one doc did, never fewer
        for label, scores in sequential.doc_scores.items():
            assert scores.items() <= batched.doc_scores[label].items()
    assert batched.engine["engine"] == "batched" and sequential.engine["engine"] == "sequential"
    if any(r.layer_scores for r in batched.rounds):  # layers were swept: the check ran and agreed
        assert batched.engine["check"]["same_score"] == batched.engine["check"]["docs"] > 1
        assert len(batched_model.calls) < len(sequential_model.calls)
        assert max(len(docs) for _, docs in batched_model.calls) > 1
    assert all(len(docs) == 1 for _, docs in sequential_model.calls)


def test_full_mode_runs_one_call_per_variant_and_round():
    table = {label: dict.fromkeys(range(30), 0.0) for label in ["base"] + [str(l) for l in LAYERS]}
    table["3"] = dict.fromkeys(range(30), 1.0)
    split = split_subtask("t", list(range(30)), 4, seed=0)
    result, model = run(table, "full", split, True)
    assert result.selected == 3
    probe = tuple(split.first_round().docs)
    batched_calls = [(label, docs) for label, docs in model.calls if len(docs) > 1]
    # the self-check's batched call of the highest layer, the base, then each other layer once
    assert sorted(label for label, _ in batched_calls) == sorted(["6", "base", "1", "2", "3", "4", "5"])
    assert all(docs == probe for _, docs in batched_calls)
    # the self-check ran the highest layer one doc per call beside it
    assert [docs for label, docs in model.calls if label == "6" and len(docs) == 1] == [(d,) for d in probe]


@pytest.mark.parametrize("mode", ["full", "select"])
def test_a_difference_in_a_score_falls_back_to_the_sequential_engine(tmp_path, caplog, mode):
    """Simulated: batched rows score a doc differently from one doc per call, under every variant. The
    check (layer 6) sees it, the sweep falls back before any knockout is computed batched, computes the
    base again one doc per call, says so once, and equals the sequential sweep; the store's last
    word on every result is the sequential one (a reload reads the last line)."""
    rng = np.random.default_rng(3)
    table = random_table(rng, 30)
    table["base"] = dict.fromkeys(range(30), 0.0)  # an imperfect baseline: the layers are swept
    split = split_subtask("t", list(range(30)), 4, seed=0)
    model = CallLog(table)

    def rounding_differs(knockout, docs):
        answers = model.answer(knockout, docs)
        if len(docs) > 1:
            first = docs[0]
            answers[first] = [1.0 - answers[first][0]]
        return answers

    store = ProbeStore(tmp_path, {"t": 1})
    fallen, _ = run(table, mode, split, True, store=store, answer=rounding_differs)
    sequential, _ = run(table, mode, split, False)
    assert fallen.engine["engine"] == "sequential" and fallen.engine["why"].startswith("fell back: knockout 6")
    assert fallen.engine["check"]["same_score"] == fallen.engine["check"]["docs"] - 1
    assert fallen.doc_scores == sequential.doc_scores and fallen.selected == sequential.selected
    assert sum("steps aside" in r.message for r in caplog.records) == 1
    last = {
        (line["variant"], line["doc"]): line["score"] for line in map(json.loads, store.path.read_text().splitlines())
    }
    assert last == {
        (label, doc): score for label, scores in sequential.doc_scores.items() for doc, score in scores.items()
    }
    reloaded, _ = run(table, mode, split, False, store=ProbeStore(tmp_path, {"t": 1}))
    assert reloaded.docs_computed == 0 and reloaded.doc_scores == sequential.doc_scores


def test_the_margin_statistic_is_part_of_the_check():
    counts, reason = compare_engines(
        "4", {1: (1.0, [0.25]), 2: (0.0, [0.5])}, {1: (1.0, [0.25]), 2: (0.0, [0.5000001])}, lambda d, r: r[0]
    )
    assert counts == {"variant": "4", "docs": 2, "bit_identical": 1, "same_score": 1} and "doc 2" in reason
    counts, reason = compare_engines("4", {1: (1.0, [0.25])}, {1: (1.0, [0.25000001])}, None)
    assert reason is None and counts["bit_identical"] == 0 and counts["same_score"] == 1


def test_a_killed_batched_run_resumes_from_the_store(tmp_path):
    table = random_table(np.random.default_rng(5), 30)
    table["base"] = dict.fromkeys(range(30), 0.0)
    split = split_subtask("t", list(range(30)), 4, seed=1)
    model = CallLog(table)
    calls = []

    def dies_after_four(knockout, docs):
        calls.append(knockout)
        if len(calls) > 4 + len(split.first_round().docs):  # the check's calls, then four batched calls
            raise KeyboardInterrupt
        return model.answer(knockout, docs)

    with pytest.raises(KeyboardInterrupt):
        run(table, "full", split, True, store=ProbeStore(tmp_path, {"t": 1}), answer=dies_after_four)
    resumed, resumed_model = run(table, "full", split, True, store=ProbeStore(tmp_path, {"t": 1}))
    fresh, _ = run(table, "full", split, True)
    assert resumed.doc_scores == fresh.doc_scores and resumed.selected == fresh.selected
    assert resumed.docs_reused > 0 and resumed.docs_computed < fresh.docs_computed


def test_the_engine_choice_says_why():
    assert SweepEngine.choose(False, 8, 2).to_report()["why"] == "sweep_batch=false"
    assert "batch_size=1" in SweepEngine.choose(True, 1, 1).why
    assert SweepEngine.choose(True, 8, 2, "accelerate offloads part of the model to disk").batched is False
    engine = SweepEngine.choose(True, 8, 2)
    assert engine.batched and engine.docs_per_call == 2

    class Model:
        hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk"}

    assert disk_offloaded(Model()) and disk_offloaded(object()) is None

    class Harness:
        batch_size_per_gpu = 4

    assert harness_batch_size(Harness()) == 4 and harness_batch_size(object()) == 1


# --- through the harness, on tiny models of the real architectures ---

ARCHS = {"smollm2": "talo_huggingface", "qwen2_vl": "talo_qwen2_vl"}
TASKS = {"smollm2": ["talo_batch_gen", "talo_batch_mc"], "qwen2_vl": ["talo_batch_gen"]}


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lmms_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    write_image_task(folder / "gen", "talo_batch_gen", [f"a{i % 3}" for i in range(12)])
    choices = [["red", "blue", "green"], ["one", "two", "three"]]
    docs = [choices[i % 2] for i in range(12)]
    write_image_task(
        folder / "mc",
        "talo_batch_mc",
        [c[i % 3] for i, c in enumerate(docs)],
        output_type="multiple_choice",
        choices=docs,
    )
    return TaskManager(include_path=[str(folder / "gen"), str(folder / "mc")])


def _harness_run(arch, model_dir, manager, out, **talo_args):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model

    args = ",".join(f"{k}={v}" for k, v in talo_args.items())
    lm = get_model(ARCHS[arch], True).create_from_arg_string(
        f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS[arch]},batch_size=4,probe_shots=4,state_dir={out},"
        f"report={out}.json,{args}"
    )
    simple_evaluate(model=lm, tasks=TASKS[arch], task_manager=manager, batch_size=4, force_simple=True)
    return json.loads((out.parent / f"{out.name}.json").read_text())["subtasks"]


INTERVENTIONS = {
    "smollm2": list(intervention_names(paper=True) + intervention_names(paper=False)),
    "qwen2_vl": ["zero"],
}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "arch,intervention", [(arch, i) for arch, interventions in INTERVENTIONS.items() for i in interventions]
)
def test_batched_sweep_equals_the_sequential_sweep_through_the_harness(
    tmp_path, tiny_model_dir, task_manager, arch, intervention
):
    """Generation and likelihood requests: every probe doc's score under every variant, and every
    decision, is the sequential engine's; the self-check ran on each sub-task and agreed."""
    runs = {
        name: _harness_run(arch, tiny_model_dir(arch), task_manager, tmp_path / name, intervention=intervention, **args)
        for name, args in {"batched": {}, "sequential": {"sweep_batch": "false"}}.items()
    }
    for batched, sequential in zip(runs["batched"], runs["sequential"], strict=True):
        assert batched["sweep_engine"]["engine"] == "batched", batched["sweep_engine"]
        assert sequential["sweep_engine"]["why"] == "sweep_batch=false"
        check = batched["sweep_engine"]["check"]
        assert check["same_score"] == check["docs"] > 1
        assert batched["probe_doc_scores"] == sequential["probe_doc_scores"]
        assert batched["rounds"] == sequential["rounds"] and batched["selected_layer"] == sequential["selected_layer"]
        assert batched["rounds"][-1]["layer_scores"], "the layers must be swept"


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["select", "screen"])
def test_batched_select_and_screen_decide_as_sequential(tmp_path, tiny_model_dir, task_manager, mode):
    runs = {
        name: _harness_run("smollm2", tiny_model_dir("smollm2"), task_manager, tmp_path / name, sweep=mode, **args)
        for name, args in {"batched": {}, "sequential": {"sweep_batch": "false"}}.items()
    }
    for batched, sequential in zip(runs["batched"], runs["sequential"], strict=True):
        assert batched["sweep_engine"]["engine"] == "batched", batched["sweep_engine"]
        assert batched["selected_layer"] == sequential["selected_layer"]
        assert len(batched["probe_doc_scores"]) > 1, "some knockout must run"
        for label, scores in sequential["probe_doc_scores"].items():  # select: a chunk runs where one doc did
            assert scores.items() <= batched["probe_doc_scores"][label].items()
