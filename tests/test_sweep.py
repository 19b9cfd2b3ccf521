"""The sweep's decisions and outputs: full mode is the paper's protocol; select mode (exact pruning)
picks the same layer on every score matrix, ties and thresholds included, with fewer passes; and
through the harness, the fast sweep's per-doc outputs are the naive sweep's, bit for bit."""

import json

import numpy as np
import pytest
from cli_tasks import write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import baseline_is_perfect, decide_round, make_rule, mean
from lmms_talo.method.sweep import LayerPruner, LayerSweep, SweepModeError
from lmms_talo.outputs.probe_store import ProbeStore

LAYERS = (1, 2, 3, 4, 5, 6)


class ScoreTable:
    """A model whose answer to (variant, doc) is a fixed score; counts every (variant, doc) it runs."""

    def __init__(self, table: dict):
        self.table = table
        self.runs: list[tuple[str, int]] = []

    def answer(self, knockout, docs):
        label = knockout.label if knockout else "base"
        self.runs.extend((label, d) for d in docs)
        return {d: [self.table[label][d]] for d in docs}

    @staticmethod
    def score(doc, responses):
        return float(responses[0])


def reference_rounds(table, split, threshold, max_redraws):
    """The protocol as the README's *Probe protocol* section states it: all layers on all probe docs,
    decide, redraw if nothing helps; a perfect round 0 is redrawn unswept when a redraw is possible."""
    outcomes, drawn = [], [split.first_round()]
    while True:
        probe = list(drawn[-1].docs)
        base = {d: table["base"][d] for d in probe}
        perfect = baseline_is_perfect(mean(list(base.values())))
        can_redraw = split.no_redraw(drawn, max_redraws) is None
        layers = {}
        if not (perfect and (threshold >= 0 or (len(drawn) == 1 and can_redraw))):
            layers = {l: {d: table[str(l)][d] for d in probe} for l in LAYERS}
        outcomes.append(decide_round(probe, base, layers, threshold))
        if outcomes[-1].selected is not None or not can_redraw:
            return outcomes
        drawn.append(split.redraw(drawn, perfect and len(drawn) == 1))


def random_table(rng, n_docs):
    kind = rng.integers(4)
    labels = ["base"] + [str(l) for l in LAYERS]
    if kind == 0:  # correct / wrong
        values = rng.integers(0, 2, size=(len(labels), n_docs)).astype(float)
    elif kind == 1:  # few distinct values: many exact ties
        values = rng.choice([0.0, 0.5, 1.0], size=(len(labels), n_docs))
    elif kind == 2:  # a strong base model: perfect baselines happen
        values = (rng.random((len(labels), n_docs)) < 0.9).astype(float)
    else:  # arbitrary scores, some a hair below 1 (float rounding of the means)
        values = rng.random((len(labels), n_docs))
        values[rng.random(values.shape) < 0.3] = 1.0 - 1e-16 * rng.integers(1, 4)
        values[rng.random(values.shape) < 0.3] = 1.0
    return {label: {d: float(values[i, d]) for d in range(n_docs)} for i, label in enumerate(labels)}


def sweep(table, mode, split, threshold, max_redraws=2):
    model = ScoreTable(table)
    rule = make_rule("gain", threshold=threshold)
    result = LayerSweep(model.answer, model.score, ProbeStore(None, {}), mode=mode, rule=rule).run(
        split, LAYERS, "zero", max_redraws
    )
    return result, model


@pytest.mark.parametrize("seed", range(8))
def test_select_mode_picks_the_full_sweeps_layer(seed):
    rng = np.random.default_rng(seed)
    for case in range(60):
        n_docs = int(rng.integers(6, 40))
        shots = int(rng.integers(1, max(2, n_docs // 3) + 1))
        split = split_subtask(f"task{case}", list(range(n_docs)), shots, seed=case)
        threshold = float(rng.choice([0.0, 0.0, -0.2, 0.1, 0.25]))
        table = random_table(rng, n_docs)

        full, full_model = sweep(table, "full", split, threshold)
        select, select_model = sweep(table, "select", split, threshold)

        assert full.rounds == reference_rounds(table, split, threshold, 2)
        assert [o.selected for o in select.rounds] == [o.selected for o in full.rounds]
        assert len(select_model.runs) <= len(full_model.runs)
        for outcome, pruned in zip(select.rounds, select.pruned):
            assert not set(pruned) & set(outcome.layer_scores), "a pruned layer took part in the decision"
            for note in pruned.values():
                assert 1 <= note.after_docs <= len(outcome.probe_docs)
                assert note.reason


def test_pruning_saves_passes_and_says_where():
    """Layer 3 is right everywhere, the others miss every doc the base model misses: they are
    dropped after those docs, and only layer 3 is scored on the whole probe set."""
    docs = list(range(30))
    split = split_subtask("t", docs, 10, seed=0)
    probe = split.first_round().docs
    base = {d: float(i % 2) for i, d in enumerate(sorted(docs))}
    table = {"base": base}
    for layer in LAYERS:
        table[str(layer)] = {d: 1.0 if layer == 3 else base[d] for d in docs}
    full, full_model = sweep(table, "full", split, 0.0)
    select, select_model = sweep(table, "select", split, 0.0)
    assert full.selected == select.selected == 3
    misses = sum(1 for d in probe if base[d] == 0.0)
    (pruned,) = select.pruned
    assert set(pruned) == set(LAYERS) - {3}
    assert all(note.after_docs <= misses for note in pruned.values())
    layer_runs = [r for r in select_model.runs if r[0] != "base"]
    assert len(layer_runs) < len(LAYERS) * len(probe)
    assert sum(1 for label, _ in layer_runs if label == "3") == len(probe)
    assert select.doc_scores["3"] == full.doc_scores["3"]


def test_ties_go_to_the_lowest_layer_in_both_modes():
    docs = list(range(12))
    split = split_subtask("t", docs, 4, seed=1)
    table = {"base": {d: 0.0 for d in docs}}
    for layer in LAYERS:
        table[str(layer)] = {d: 1.0 if layer in (2, 5) else 0.0 for d in docs}
    full, _ = sweep(table, "full", split, 0.0)
    select, _ = sweep(table, "select", split, 0.0)
    assert full.selected == select.selected == 2
    assert full.final.tied_layers == (2, 5)


def test_pruner_bounds_are_exact_at_the_edges():
    pruner = LayerPruner(["a", "b"], [1, 2], baseline=0.5, threshold=0.0)
    pruner.observe({1: {"a": 0.0}, 2: {"a": 1.0}})
    assert pruner.pruned[1].after_docs == 1  # at most 0.5: no gain over 0.5
    assert 2 not in pruner.pruned
    pruner = LayerPruner(["a", "b"], [1, 2], baseline=0.0, threshold=0.0)
    pruner.observe({1: {"a": 0.0}, 2: {"a": 1.0}})
    assert pruner.alive() == [1, 2]  # layer 1 can still tie layer 2 at 0.5, and would win the tie
    pruner.observe({1: {"b": 1.0}, 2: {"b": 0.0}})
    assert pruner.alive() == [1]  # a real tie at 0.5: the lower layer wins it, so layer 2 cannot win
    pruner = LayerPruner(["a", "b"], [1, 2], baseline=0.0, threshold=0.0)
    pruner.observe({1: {"a": 1.0}, 2: {"a": 0.0}})
    assert "layer 1" in pruner.pruned[2].reason  # layer 2 can at best tie layer 1, and ties go low


def test_a_perfect_baseline_sweeps_no_layer_in_either_mode():
    docs = list(range(12))
    split = split_subtask("t", docs, 4, seed=0)
    table = {"base": {d: 1.0 for d in docs}, **{str(l): {d: 1.0 for d in docs} for l in LAYERS}}
    for mode in ("full", "select"):
        result, model = sweep(table, mode, split, 0.0, max_redraws=1)
        assert result.selected is None
        assert {label for label, _ in model.runs} == {"base"}
        assert result.final.reason == "baseline already perfect on the probe set"


def test_unknown_mode_is_refused():
    with pytest.raises(SweepModeError, match="sweep='fastest'"):
        LayerSweep(None, None, ProbeStore(None, {}), mode="fastest")


# --- whole sweeps: the fast sweep's per-doc outputs equal the naive sweep's ---


def _store_records(path):
    """{(variant, doc): (score, responses)} of a probe store file."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records[(record["variant"], record["doc"])] = (record["score"], record["responses"])
    return records


def _lmms_eval_run(arch, model_dir, manager, tasks, state_dir, **talo_args):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model

    args = ",".join(f"{k}={v}" for k, v in talo_args.items())
    lm = get_model(LMMS_EVAL_MODELS[arch], True).create_from_arg_string(
        f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots=3,state_dir={state_dir},{args}"
    )
    simple_evaluate(model=lm, tasks=tasks, task_manager=manager, batch_size=1, force_simple=True)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """A generate_until task and a likelihood-scored multiple-choice task, 9 docs each."""
    from lmms_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    write_image_task(folder / "gen", "talo_replay_gen", [f"a{i % 3}" for i in range(9)])
    choices = [["red", "blue"], ["one", "two"]]
    docs = [choices[i % 2] for i in range(9)]
    write_image_task(
        folder / "mc",
        "talo_replay_mc",
        [c[i % 2] for i, c in enumerate(docs)],
        output_type="multiple_choice",
        choices=docs,
    )
    return TaskManager(include_path=[str(folder / "gen"), str(folder / "mc")])


LMMS_EVAL_MODELS = {"llava": "talo_llava", "qwen2_vl": "talo_qwen2_vl", "smollm2": "talo_huggingface"}
# lmms-eval 0.7.3's Qwen2-VL class has no loglikelihood: its likelihood path is the forward pass
# checked bit for bit above. The plain causal LM ignores the images.
LMMS_EVAL_TASKS = {
    "llava": ["talo_replay_gen", "talo_replay_mc"],
    "qwen2_vl": ["talo_replay_gen"],
    "smollm2": ["talo_replay_gen", "talo_replay_mc"],
}


@pytest.mark.e2e
@pytest.mark.parametrize("arch", sorted(LMMS_EVAL_TASKS))
@pytest.mark.parametrize("intervention", ["zero", "uniform", "mean"])
def test_lmms_eval_sweep_outputs_equal_the_naive_sweep(tmp_path, tiny_model_dir, task_manager, arch, intervention):
    """Through the harness's model classes (lmms-eval's LLaVA and Qwen2-VL, lmms-talo's causal LM):
    every probe answer (generated text, log-likelihoods) of the replayed sweep equals the naive
    sweep's, and select mode picks the same layers."""
    runs = [("naive", dict(replay="false")), ("replay", dict(replay="true"))]
    if intervention == "zero":
        runs.append(("select", dict(replay="true", sweep="select")))
    stores, reports = {}, {}
    for name, args in runs:
        _lmms_eval_run(
            arch,
            tiny_model_dir(arch),
            task_manager,
            LMMS_EVAL_TASKS[arch],
            tmp_path / name,
            intervention=intervention,
            report=tmp_path / f"{name}.json",
            **args,
        )
        stores[name] = {p.name: _store_records(p) for p in (tmp_path / name).glob("*.jsonl")}
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["subtasks"]
    assert len(stores["naive"]) == len(LMMS_EVAL_TASKS[arch])  # one probe store per sub-task
    assert stores["replay"] == stores["naive"]
    for group in reports["replay"]:
        assert group["rounds"][-1]["layer_scores"], "the probe set must leave room for a gain, or no layer is swept"
        assert group["sweep_replay"]["layers_replayed"] > 0 and group["sweep_replay"]["calls_unmatched"] == 0
    if "select" in stores:
        for name, records in stores["select"].items():
            assert all(stores["naive"][name][key] == value for key, value in records.items())
        assert [g["selected_layer"] for g in reports["select"]] == [g["selected_layer"] for g in reports["naive"]]
        assert all(g["sweep_mode"] == "select" for g in reports["select"])
