"""sweep=screen: the gradient screen ranks layers, only the chosen ones run exactly, and every
decision is exact: the selected layer is always one that was run; with every layer on top the
screen decides as the full sweep; the estimates are first order, right to the last digit for a small
intervention; the model is left exactly as loaded; a rerun reuses everything from the store."""

import json

import numpy as np
import pytest
import torch
from test_response_cache import oracle  # noqa: F401 (a fixture)
from test_sweep import (  # noqa: F401
    LAYERS,
    ScoreTable,
    _lmms_eval_run,
    _store_records,
    random_table,
    task_manager,
)
from tiny_models import ARCHITECTURES, LMMS_EVAL_MODEL_ARGS, example_inputs, load_processor, load_tiny

from lmms_talo.method.interventions import (
    INTERVENTIONS,
    Intervention,
    Knockout,
    knocked_out,
    register,
)
from lmms_talo.method.option_logprobs import (
    PackingCheck,
    item_kind,
    packable,
    packed_logprobs,
    plain_positions,
    separate_logprobs,
)
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import decide_round, make_rule
from lmms_talo.method.screen import (
    ScreenItem,
    _item_score,
    chosen_layers,
    doc_effects,
    predicted_scores,
    spearman,
)
from lmms_talo.method.sweep import LayerSweep, SweepModeError
from lmms_talo.outputs.probe_store import ProbeStore


class TableScreen:
    """A screen whose estimates are a fixed table {doc: {layer: estimate}} and whose per-doc S is
    `signal[doc]` (0 without one); counts its calls."""

    def __init__(self, table, top, others, seed=0, signal=None):
        self.table, self.top, self.others, self.seed, self.signal = table, top, others, seed, signal or {}
        self.calls = 0
        self.packing = PackingCheck()

    def effects(self, doc, responses, layers, intervention):
        self.calls += 1
        return self.signal.get(doc, 0.0), {layer: self.table[doc][layer] for layer in layers}


def screened(table, estimates, split, top, others, threshold=0.0, store=None, max_redraws=2, signal=None):
    model = ScoreTable(table)
    screen = TableScreen(estimates, top, others, signal=signal)
    rule = make_rule("gain", threshold=threshold)
    sweep = LayerSweep(
        model.answer, model.score, store or ProbeStore(None, {}), mode="screen", rule=rule, screen=screen
    )
    return sweep.run(split, LAYERS, "zero", max_redraws), model, screen


def random_estimates(rng, n_docs):
    return {d: {layer: float(rng.normal()) for layer in LAYERS} for d in range(n_docs)}


@pytest.mark.parametrize("seed", range(12))
def test_with_every_layer_on_top_the_screen_decides_as_the_full_sweep(seed):
    rng = np.random.default_rng(seed)
    n_docs = int(rng.integers(8, 20))
    table, estimates = random_table(rng, n_docs), random_estimates(rng, n_docs)
    split = split_subtask("t", list(range(n_docs)), int(rng.integers(2, 5)), seed=seed)
    threshold = float(rng.choice([0.0, 0.1, -0.05]))
    full_model = ScoreTable(table)
    full = LayerSweep(
        full_model.answer, full_model.score, ProbeStore(None, {}), rule=make_rule("gain", threshold=threshold)
    ).run(split, LAYERS, "zero", 2)
    screen, _, _ = screened(table, estimates, split, top=len(LAYERS), others=0, threshold=threshold)
    assert screen.selected == full.selected
    assert [(o.selected, o.layer_scores, o.reason) for o in screen.rounds] == [
        (o.selected, o.layer_scores, o.reason) for o in full.rounds
    ]


@pytest.mark.parametrize("seed", range(12))
def test_the_selected_layer_is_always_one_that_was_run_exactly(seed):
    rng = np.random.default_rng(100 + seed)
    n_docs = int(rng.integers(8, 20))
    table, estimates = random_table(rng, n_docs), random_estimates(rng, n_docs)
    split = split_subtask("t", list(range(n_docs)), 4, seed=seed)
    signal = {d: float(rng.normal()) if d % 3 else 0.0 for d in range(n_docs)}  # some docs give no signal
    result, model, _ = screened(
        table, estimates, split, top=int(rng.integers(1, 3)), others=int(rng.integers(0, 3)), signal=signal
    )
    screened_rounds = {entry["round"]: entry for entry in result.screen}
    for index, outcome in enumerate(result.rounds):
        if index not in screened_rounds:  # a perfect baseline: no layer was run
            assert outcome.selected is None and not outcome.layer_scores
            continue
        entry = screened_rounds[index]
        exact = sorted(entry["top"] + entry["random"])
        assert sorted(outcome.layer_scores) == exact
        assert outcome.selected is None or outcome.selected in exact
        probe = list(outcome.probe_docs)
        base = {d: table["base"][d] for d in probe}
        assert outcome == decide_round(probe, base, {l: {d: table[str(l)][d] for d in probe} for l in exact}, 0.0)
        assert sorted(entry["estimates"]) == sorted(str(l) for l in LAYERS)
        totals = {l: sum(estimates[d][l] for d in probe) for l in LAYERS}
        predicted = {
            l: sum(float(signal[d] + estimates[d][l] > 0) for d in probe) / len(probe) for l in LAYERS
        }  # no doc lacks a change
        assert entry["predicted_gains"] == {str(l): predicted[l] - outcome.baseline for l in LAYERS}
        assert entry["top"] == sorted(sorted(LAYERS, key=lambda l: (-predicted[l], -totals[l], l))[: len(entry["top"])])
    ran = {label for label, _ in model.runs} - {"base"}
    assert ran <= {str(l) for e in result.screen for l in e["top"] + e["random"]}


def test_a_rerun_on_the_store_recomputes_nothing(tmp_path):
    rng = np.random.default_rng(7)
    table, estimates = random_table(rng, 12), random_estimates(rng, 12)
    split = split_subtask("t", list(range(12)), 4, seed=0)
    first, _, screen = screened(table, estimates, split, 2, 1, store=ProbeStore(tmp_path, {"k": 1}))
    assert screen.calls > 0
    again, model, screen = screened(table, estimates, split, 2, 1, store=ProbeStore(tmp_path, {"k": 1}))
    assert screen.calls == 0 and model.runs == [] and again.docs_computed == 0
    assert again.screen == first.screen and again.selected == first.selected


def test_screen_mode_without_a_screen_is_refused():
    with pytest.raises(SweepModeError, match="sweep=screen needs a gradient screen"):
        LayerSweep(None, None, ProbeStore(None, {}), mode="screen")


@pytest.mark.parametrize(
    "args, message",
    [
        ({"sweep": "screen", "screen_top": "0"}, "screen_top must be at least 1"),
        ({"sweep": "screen", "screen_random": "-1"}, "screen_random at least 0"),
        ({"sweep": "screen", "screen_top": "many"}, "bad value for model arg screen_top='many'"),
    ],
)
def test_bad_screen_args_are_refused_by_name(args, message):
    from lmms_talo.method.config import TaloArgumentError, TaloConfig

    with pytest.raises(TaloArgumentError, match=message):
        TaloConfig.pop_from(dict(args))


def test_predicted_scores_count_flips_and_keep_docs_without_signal():
    base = {"a": 0.0, "b": 1.0, "c": 1.0}
    signal = {"a": -1.0, "b": 2.0, "c": 0.0}  # c: a generation answered with the target (no signal)
    estimates = {"a": {1: 1.5, 2: 0.5}, "b": {1: -3.0, 2: 5.0}, "c": {1: 0.0, 2: 0.0}}
    # layer 1 flips a to right and b to wrong; layer 2 flips nothing; c keeps its base score
    assert predicted_scores(base, signal, estimates, [1, 2]) == {1: 2 / 3, 2: 2 / 3}
    estimates["a"][1] = 0.5
    assert predicted_scores(base, signal, estimates, [1, 2]) == {1: 1 / 3, 2: 2 / 3}


def test_chosen_layers_rank_by_predicted_score_then_sum_and_draw_the_others_seeded():
    predicted = {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.75, 5: 0.0}
    totals = {1: 0.5, 2: 2.0, 3: 2.0, 4: -1.0, 5: 0.0}
    top, drawn = chosen_layers(predicted, totals, 2, 2, "s")  # 4 by predicted score, then 2 by its sum
    assert top == [2, 4] and len(drawn) == 2 and set(drawn) <= {1, 3, 5}
    assert chosen_layers(predicted, totals, 2, 2, "s") == (top, drawn)  # seeded
    assert chosen_layers(predicted, totals, 3, 0, "s") == ([2, 3, 4], [])  # 2 and 3 tie: both, by layer
    assert chosen_layers(predicted, totals, 9, 2, "s") == ([1, 2, 3, 4, 5], [])


def test_spearman_is_the_rank_correlation_and_none_below_three_points_or_with_a_constant_side():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None


# --- the estimator on a real (tiny, random) model ---


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    model = load_tiny("smollm2", tiny_model_dir("smollm2")).to(torch.float64)
    tokenizer = load_processor("smollm2", tiny_model_dir("smollm2"))
    ids = tokenizer("The answer to the question is", return_tensors="pt", add_special_tokens=False)["input_ids"]
    options = [tokenizer.encode(text, add_special_tokens=False) for text in (" red", " blue sky", " green")]
    return model, [ScreenItem([({"input_ids": ids}, option) for option in options], 1)]


@pytest.fixture()
def small_scaling():
    """A test intervention: the attention output times (1 - 1e-3), so first order is nearly exact (the
    second-order rest is ~0.4% here; the norms compute in float32, which is ~1e-6 of noise in S)."""

    @register
    class Scaled(Intervention):
        name = "test_scaled"

        def hooks(self, site):
            return [site.attention.register_forward_hook(lambda m, a, out: (out[0] * (1 - 1e-3),) + tuple(out[1:]))]

    yield "test_scaled"
    del INTERVENTIONS["test_scaled"]


def _exact_change(model, items, layer, intervention):
    with torch.no_grad():
        base = sum(float(_item_score(model, item)) for item in items)
        with knocked_out(model, Knockout((layer,), intervention)):
            return sum(float(_item_score(model, item)) for item in items) - base


def test_estimates_are_the_first_order_change_of_the_score(tiny_lm, small_scaling):
    model, items = tiny_lm
    layers = list(range(model.config.num_hidden_layers))
    score, effects = doc_effects(model, items, layers, small_scaling)
    with torch.no_grad():
        assert score == pytest.approx(float(_item_score(model, items[0])), abs=1e-12)
    for layer in layers:
        exact = _exact_change(model, items, layer, small_scaling)
        assert effects[layer] == pytest.approx(exact, rel=1.5e-2), layer


def test_the_screen_leaves_the_model_as_loaded(tiny_lm):
    model, items = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for intervention in ("zero", "uniform", "mean", "skip", "mlp_zero"):
            doc_effects(model, items, [0, 1], intervention)
        bad = ScreenItem(items[0].options, 7)  # a gold index with no option: fails mid-forward
        with pytest.raises(IndexError):
            doc_effects(model, [bad], [0, 1], "zero")
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert not any("forward" in m.__dict__ for m in model.modules())  # the checkpointed forwards are gone
    finally:
        frozen.requires_grad_(True)


def test_the_screens_option_likelihoods_are_the_model_classs_own(tiny_model_dir):
    """S is built from the same tokens the harness scores: each option's log p from the screen's
    forward, separate or packed, equals what hf_causal_lm's loglikelihood returns for it."""
    from types import SimpleNamespace

    from lmms_talo.harness.lmms.text_model import CausalLM
    from lmms_talo.method.screen import encoded_option, pair_encoder

    lm = CausalLM(pretrained=str(tiny_model_dir("smollm2")), device="cpu", dtype="float32", chat_template=False)
    requests = [
        SimpleNamespace(args=("Question: which colour? Answer:", f" {c}")) for c in ("red", "dark blue", "green")
    ]
    options = [encoded_option(pair_encoder(lm), r, "cpu") for r in requests]
    theirs = [-loss for loss, _ in lm.loglikelihood(requests)]
    for way in (separate_logprobs, packed_logprobs):
        with torch.no_grad():
            ours = [float(v) for v in way(lm.model, options)]
        assert ours == pytest.approx(theirs, abs=1e-4), way.__name__


# --- packed options: proved equal at run time, or the screen steps aside ---

# Qwen-VL's multimodal rotary positions are not the plain position ids the packed form passes: such
# a model never packs (a proof on one item would not cover the next: with or without images).
UNPACKABLE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


def _processor_item(arch, tiny_model_dir):
    model = load_tiny(arch, tiny_model_dir(arch))
    processor = load_processor(arch, tiny_model_dir(arch))
    prompt = dict(example_inputs(arch, processor))  # images, grids and per-token type ids as the processor gives them
    tokenizer = getattr(processor, "tokenizer", processor)
    options = [
        (prompt, tokenizer.encode(text, add_special_tokens=False))
        for text in (" red apple", " blue", " green tree house")
    ]
    return model, ScreenItem(options, 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_options_are_proved_equal_or_the_screen_steps_aside(tiny_model_dir, arch):
    model, item = _processor_item(arch, tiny_model_dir)
    check = PackingCheck()
    layers = [0, 1]
    plain = doc_effects(model, [item], layers, "zero")
    packed = doc_effects(model, [item], layers, "zero", check)
    if arch in UNPACKABLE:
        assert not plain_positions(model) and not packable(model, item.options)
        assert check.verdicts == {}, "never checked, never packed"
        assert packed == plain  # the separate way, bit for bit
        return
    assert plain_positions(model)
    assert check.verdicts == {item_kind(item.options): True}, check.reasons
    with torch.no_grad():
        one = [float(v) for v in packed_logprobs(model, item.options)]
        other = [float(v) for v in separate_logprobs(model, item.options)]
    assert one == pytest.approx(other, rel=1e-5)
    assert packed[0] == pytest.approx(plain[0], rel=1e-5)
    for layer in layers:
        assert packed[1][layer] == pytest.approx(plain[1][layer], rel=1e-4, abs=1e-5)


def test_packing_is_proved_for_each_kind_of_item(tiny_model_dir):
    """An item with images after a text-only one (and multi-token after single-token options) is a
    kind of its own: its packing is proved on it, not taken from the first item's proof."""
    model, with_image = _processor_item("llava", tiny_model_dir)
    prompt = dict(with_image.options[0][0])
    text_prompt = {k: prompt[k] for k in ("input_ids", "attention_mask")}
    image_token = model.config.image_token_id
    keep = text_prompt["input_ids"][0] != image_token
    text_prompt = {k: v[:, keep] for k, v in text_prompt.items()}
    text_only = ScreenItem([(text_prompt, c) for _, c in with_image.options], 1)
    single = ScreenItem([(text_prompt, c[:1]) for _, c in with_image.options], 0)
    check = PackingCheck()
    for item in (text_only, single, with_image):
        doc_effects(model, [item], [0, 1], "zero", check)
    assert set(check.verdicts) == {
        "text only, multi-token options",
        "text only, single-token options",
        "with images, multi-token options",
    }
    assert all(check.verdicts.values()), check.reasons


def test_a_model_that_refuses_the_packed_form_is_scored_separately(tiny_lm):
    model, items = tiny_lm

    def refuse_custom_masks(module, args, kwargs):
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 4:
            raise ValueError("custom 4D masks are not supported")

    handle = model.register_forward_pre_hook(refuse_custom_masks, with_kwargs=True)
    try:
        check = PackingCheck()
        assert doc_effects(model, items, [0, 1], "zero", check) == doc_effects(model, items, [0, 1], "zero")
    finally:
        handle.remove()
    assert list(check.verdicts.values()) == [False]
    assert "custom 4D masks are not supported" in next(iter(check.reasons.values()))


def test_only_unpadded_shared_prompts_within_the_attention_window_are_packed(tiny_lm):
    model, items = tiny_lm
    options = items[0].options
    prompt = options[0][0]
    assert packable(model, options)
    assert not packable(model, options[:1])  # one option: nothing to share
    padded = dict(
        prompt,
        attention_mask=torch.cat(
            [torch.zeros(1, 1, dtype=torch.long), torch.ones_like(prompt["input_ids"][:, 1:])], dim=1
        ),
    )
    assert not packable(model, [(padded, c) for _, c in options])
    other = dict(prompt, input_ids=prompt["input_ids"].flip(1))
    assert not packable(model, [options[0], (other, options[1][1])])
    length = prompt["input_ids"].shape[1] + sum(len(c) for _, c in options)
    try:
        model.config.sliding_window = length  # the packed sequence just fits
        assert packable(model, options)
        model.config.sliding_window = length - 1  # it would not: the packed mask would drop the window
        assert not packable(model, options)
    finally:
        del model.config.sliding_window


# --- through lmms-eval: both request types, every paper intervention, the store ---

ARCHS = {"smollm2": ["talo_replay_gen", "talo_replay_mc"], "llava": ["talo_replay_gen", "talo_replay_mc"]}


def _reports(path):
    return json.loads(path.read_text())["subtasks"]


@pytest.mark.e2e
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("intervention", ["zero", "uniform", "mean"])
def test_lmms_eval_screen_with_every_layer_equals_the_full_sweep(
    tmp_path,
    tiny_model_dir,
    task_manager,  # noqa: F811 (the fixture imported from test_sweep)
    arch,
    intervention,
):
    runs = {"full": dict(sweep="full"), "screen": dict(sweep="screen", screen_top=99)}
    reports = {}
    for name, args in runs.items():
        _lmms_eval_run(
            arch,
            tiny_model_dir(arch),
            task_manager,
            ARCHS[arch],
            tmp_path / name,
            intervention=intervention,
            report=tmp_path / f"{name}.json",
            **args,
        )
        reports[name] = _reports(tmp_path / f"{name}.json")
    for full, screen in zip(reports["full"], reports["screen"]):
        assert full["rounds"][-1]["layer_scores"], "the probe set must leave room for a gain"
        assert [(r["selected"], r["layer_scores"]) for r in screen["rounds"]] == [
            (r["selected"], r["layer_scores"]) for r in full["rounds"]
        ]
        assert screen["selected_layer"] == full["selected_layer"]
        (entry,) = screen["screen"]
        assert sorted(entry["estimates"], key=int) == [str(l) for l in screen["candidate_layers"]]
        packed = entry["packed_options"]  # both request types, images included: every kind proved and packed
        assert packed and all(packed.values()), entry["packing_check"]


@pytest.mark.e2e
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lmms_eval_screen_runs_only_the_chosen_layers_and_resumes(tmp_path, tiny_model_dir, task_manager, arch):  # noqa: F811
    args = dict(sweep="screen", screen_top=1, screen_random=1, intervention="zero")
    _lmms_eval_run(
        arch, tiny_model_dir(arch), task_manager, ARCHS[arch], tmp_path / "s", report=tmp_path / "a.json", **args
    )
    stores = {p.name: _store_records(p) for p in (tmp_path / "s").glob("*.jsonl")}
    for group in _reports(tmp_path / "a.json"):
        (entry,) = group["screen"]
        exact = sorted(entry["top"] + entry["random"])
        assert len(exact) == 2 and sorted(map(int, group["rounds"][-1]["layer_scores"])) == exact
        assert group["selected_layer"] is None or group["selected_layer"] in exact
    ran = {str(l) for g in _reports(tmp_path / "a.json") for e in g["screen"] for l in e["top"] + e["random"]}
    for records in stores.values():
        assert "screen" in {variant for variant, _ in records}
        assert {variant for variant, _ in records} <= {"base", "screen"} | ran
    _lmms_eval_run(
        arch, tiny_model_dir(arch), task_manager, ARCHS[arch], tmp_path / "s", report=tmp_path / "b.json", **args
    )
    assert {p.name: _store_records(p) for p in (tmp_path / "s").glob("*.jsonl")} == stores
    again = _reports(tmp_path / "b.json")
    assert all(g["probe_docs_computed"] == 0 for g in again)
    how = ("packed_options", "packing_check")  # how this run computed estimates: here it computed none
    first = [[{k: v for k, v in e.items() if k not in how} for e in g["screen"]] for g in _reports(tmp_path / "a.json")]
    assert [[{k: v for k, v in e.items() if k not in how} for e in g["screen"]] for g in again] == first
    assert all(
        e["packed_options"] == {} and e["packing_check"].startswith("not checked") for g in again for e in g["screen"]
    )


# --- several processes: each rank screens a share of the docs, every rank decides the same way ---


def _screen_all(ranks):
    out = []
    for case in range(6):
        rng = np.random.default_rng(300 + case)
        n_docs = int(rng.integers(9, 20))
        table, estimates = random_table(rng, n_docs), random_estimates(rng, n_docs)
        split = split_subtask(f"t{case}", list(range(n_docs)), 4, seed=case)
        model, screen = ScoreTable(table), TableScreen(estimates, 2, 1)
        result = LayerSweep(
            model.answer, model.score, ProbeStore(None, {}), mode="screen", ranks=ranks, screen=screen
        ).run(split, LAYERS, "zero", 2)
        out.append(
            {
                "rounds": [(o.selected, o.layer_scores, o.reason) for o in result.rounds],
                "screen": result.screen,
                "screened": screen.calls,
            }
        )
    return out


def _worker(rank, world, init_file, out_dir):
    import os

    import torch.distributed as dist

    from lmms_talo.method.parallel import Ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(_screen_all(Ranks(rank, world)), handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_ranks_screen_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    from lmms_talo.method.parallel import Ranks

    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    alone = json.loads(json.dumps(_screen_all(Ranks())))
    zero, first = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for one, a, b in zip(alone, zero, first):
        assert a["rounds"] == b["rounds"] == one["rounds"] and a["screen"] == b["screen"] == one["screen"]
        assert a["screened"] + b["screened"] == one["screened"]  # each doc screened on one rank only


@pytest.mark.e2e
def test_on_the_oracle_task_the_screens_top_layer_is_the_true_one(oracle, tmp_path):  # noqa: F811
    """The oracle task's answers are the tiny LLaVA's with layer 2 knocked out: with screen_top=1
    the screen's ranking alone must put layer 2 in the exact set, and the sweep then selects it."""
    from cli_tasks import run_lmms_eval
    from test_response_cache import ORACLE_LAYER

    model_dir, task = oracle
    report = tmp_path / "report.json"
    args = (
        f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=4,state_dir=none,report={report},"
        f"sweep=screen,screen_top=1"
    )
    run_lmms_eval("talo_llava", args, "talo_cached", task, tmp_path / "out", "--force_simple")
    (group,) = json.loads(report.read_text())["subtasks"]
    assert group["screen"][0]["top"] == [ORACLE_LAYER], group["screen"][0]
    assert group["selected_layer"] == ORACLE_LAYER
