"""Prefix replay proves itself at run time instead of trusting a transformers pin: under a change it
does not follow (a renamed KV cache argument, a decoder layer that writes K/V without
`Cache.update`), on the `generate` path and on the forward-then-continue path (a context, then
continuations on its cache), the answers stay exactly the naive sweep's and replay says it is off.

The changes are simulated by monkeypatching transformers' classes of a tiny model (undone after each
test); the naive answers are computed under the same simulation, or without it (the simulations
change no arithmetic, only the calling convention)."""

import functools
import inspect
import json
import logging

import pytest
from cli_tasks import write_image_task
from test_replay import _context_then_continuations, assert_identical, outputs
from tiny_models import LMMS_EVAL_MODEL_ARGS, example_inputs, load_processor, load_tiny

import lmms_talo.method.prefix_replay
from lmms_talo.method.backbone import decoder_layers
from lmms_talo.method.interventions import Knockout
from lmms_talo.method.prefix_replay import PrefixReplay, disabled_reason
from lmms_talo.outputs.report import summary_table

ARCH = "smollm2"  # lmms-talo's own hf_causal_lm class runs it: generate_until and loglikelihood
LAYERS = (1, 2, 3)
NEW_NAME = "kv_cache"


def cache_name(forward) -> str:
    """The installed transformers' name of the KV cache argument (5.24 renamed `past_key_values` to `cache`)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def rename_cache_argument(monkeypatch, model) -> None:
    """As if a transformers release renamed the KV cache argument of the text model and of its decoder
    layers (to `kv_cache`, as 5.24 renamed `past_key_values` to `cache`): callers pass the new name."""
    for cls in {type(model.get_decoder()), type(decoder_layers(model)[0].layer)}:
        call, forward, old = cls.__call__, cls.forward, cache_name(cls.forward)

        def renamed_call(self, *args, _call=call, _old=old, **kwargs):
            if _old in kwargs:
                kwargs[NEW_NAME] = kwargs.pop(_old)
            return _call(self, *args, **kwargs)

        def renamed_forward(self, *args, _forward=forward, _old=old, **kwargs):
            if NEW_NAME in kwargs:
                kwargs[_old] = kwargs.pop(NEW_NAME)
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", renamed_call)
        monkeypatch.setattr(cls, "forward", functools.wraps(forward)(renamed_forward))


class _DirectWrites:
    """What the attention gets instead of the cache: `update` writes K/V straight into the cache's
    layer, as a model that bypasses `Cache.update` would."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, keys, values, layer_idx, *args, **kwargs):
        return self.cache.layers[layer_idx].update(keys, values, *args, **kwargs)


def write_kv_without_cache_update(monkeypatch, model) -> None:
    attention = type(decoder_layers(model)[0].attention)
    forward, name = attention.forward, cache_name(attention.forward)

    def direct(self, *args, **kwargs):
        if kwargs.get(name) is not None:
            kwargs[name] = _DirectWrites(kwargs[name])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", functools.wraps(forward)(direct))


SIMULATIONS = {
    "renamed_cache_argument": rename_cache_argument,
    "kv_written_without_update": write_kv_without_cache_update,
}


def _generate(model, processor, knockout):
    return outputs(model, example_inputs(ARCH, processor), knockout)


def _continue(model, processor, knockout):
    return _context_then_continuations(model, knockout)


PATHS = {"generate": _generate, "forward_then_continue": _continue}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("simulation", sorted(SIMULATIONS))
def test_replay_refuses_a_layer_with_a_cache_but_no_recorded_write(
    tiny_model_dir, monkeypatch, caplog, simulation, path
):
    model = load_tiny(ARCH, tiny_model_dir(ARCH))  # its own instance: the off switch belongs to the model
    processor = load_processor(ARCH, tiny_model_dir(ARCH))
    SIMULATIONS[simulation](monkeypatch, model)
    run = PATHS[path]
    naive = {layer: run(model, processor, Knockout((layer,))) for layer in LAYERS}
    replay = PrefixReplay(model)
    with caplog.at_level(logging.WARNING, logger="lmms_talo"), replay.installed():
        with replay.variant(None):
            run(model, processor, None)
        for layer in LAYERS:
            with replay.variant(Knockout((layer,))):
                assert_identical(run(model, processor, Knockout((layer,))), naive[layer])
    assert replay.stats.layers_replayed == 0 and replay.stats.calls_recorded == 0
    reason = disabled_reason(model)
    layer_forward = type(decoder_layers(model)[0].layer).forward
    expected = f"argument `{NEW_NAME if simulation == 'renamed_cache_argument' else cache_name(layer_forward)}`"
    assert reason.startswith("decoder layer 0 was given a KV cache") and expected in reason
    assert replay.stats.status == f"disabled ({reason})"
    assert caplog.text.count("prefix replay is off for the rest of the run") == 1
    later = PrefixReplay(model)  # a later sub-task of the same run
    assert later.stats.status == f"disabled ({reason})"
    with later.installed():
        assert "forward" not in vars(later.text_model), "a disabled replay patches nothing"


def test_an_unchanged_model_keeps_replay_on(tiny_model_dir):
    model = load_tiny(ARCH, tiny_model_dir(ARCH))
    processor = load_processor(ARCH, tiny_model_dir(ARCH))
    replay = PrefixReplay(model)
    with replay.installed():
        for run in PATHS.values():
            with replay.variant(None):
                run(model, processor, None)
            with replay.variant(Knockout((3,))):
                run(model, processor, Knockout((3,)))
    assert disabled_reason(model) is None and replay.stats.status == "on"
    # generate's prefill, the plain forward, the context, and the continuations on its cache
    assert replay.stats.calls_replayed == 4 and replay.stats.calls_replayed_on_cache == 1


# --- through lmms-eval: the sweep's probe answers, the store and the report ---


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """A generate_until task and a likelihood-scored multiple-choice task, 9 docs each. Without the
    chat template, " one" / " two" are one token each (hf_causal_lm scores them in one pass) and
    " red apple" / " blue sky" several (a context pass, then the continuations on its cache). The
    probe docs (0, 2, 6 under the default seed) hold both kinds, the first doc the single-pass kind."""
    from lmms_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    write_image_task(folder / "gen", "talo_guard_gen", [f"a{i % 3}" for i in range(9)])
    choices = [["one", "two"], ["red apple", "blue sky"]]
    docs = [choices[i % 3 == 2] for i in range(9)]
    write_image_task(
        folder / "mc",
        "talo_guard_mc",
        [c[i % 2] for i, c in enumerate(docs)],
        output_type="multiple_choice",
        choices=docs,
    )
    return TaskManager(include_path=[str(folder / "gen"), str(folder / "mc")])


def _sweep(tmp_path, name, tiny_model_dir, manager, monkeypatch=None, simulation=None, **talo_args):
    """One in-process lmms-eval run of both tasks; returns ({store file: {(variant, doc): (score,
    responses)}}, report sub-tasks)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model

    args = ",".join(f"{k}={v}" for k, v in talo_args.items())
    lm = get_model("talo_huggingface", True).create_from_arg_string(
        f"pretrained={tiny_model_dir(ARCH)},{LMMS_EVAL_MODEL_ARGS[ARCH]},probe_shots=3,"
        f"chat_template=false,state_dir={tmp_path / name},report={tmp_path / name}.json,{args}"
    )
    if simulation:
        SIMULATIONS[simulation](monkeypatch, lm.model)
    simple_evaluate(
        model=lm, tasks=["talo_guard_gen", "talo_guard_mc"], task_manager=manager, batch_size=1, force_simple=True
    )
    stores = {}
    for path in (tmp_path / name).glob("*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        stores[path.name] = {(r["variant"], r["doc"]): (r["score"], r["responses"]) for r in lines}
    return stores, json.loads((tmp_path / f"{name}.json").read_text())["subtasks"]


@pytest.fixture(scope="module")
def naive(tmp_path_factory, tiny_model_dir, task_manager):
    return _sweep(tmp_path_factory.mktemp("naive"), "naive", tiny_model_dir, task_manager, replay="false")


def _assert_naive_answers(stores, naive_stores, groups):
    assert len(stores) == 2 and stores == naive_stores
    assert all(group["rounds"][-1]["layer_scores"] for group in groups), "no layer was swept: nothing was tested"


@pytest.mark.e2e
def test_a_sound_replay_passes_its_check_in_every_sweep(tmp_path, tiny_model_dir, task_manager, naive):
    stores, groups = _sweep(tmp_path, "replay", tiny_model_dir, task_manager)
    _assert_naive_answers(stores, naive[0], groups)
    for group in groups:
        assert group["sweep_replay"]["status"] == "on" and group["sweep_replay"]["layers_replayed"] > 0
    by_type = {group["request_type"]: group["sweep_replay"]["checks"] for group in groups}
    # generation: one shape of pass; likelihood: a single-pass doc first, then a context-then-continuations doc
    assert by_type == {"generate_until": 1, "loglikelihood": 2}


@pytest.mark.e2e
@pytest.mark.parametrize("simulation", sorted(SIMULATIONS))
def test_lmms_eval_answers_stay_naive_and_the_report_says_replay_is_off(
    tmp_path, tiny_model_dir, task_manager, naive, monkeypatch, simulation
):
    stores, groups = _sweep(tmp_path, "replay", tiny_model_dir, task_manager, monkeypatch, simulation)
    _assert_naive_answers(stores, naive[0], groups)
    for group in groups:
        assert group["sweep_replay"]["status"].startswith("disabled (decoder layer 0 was given a KV cache")
        assert group["sweep_replay"]["layers_replayed"] == 0
    table = summary_table({"subtasks": groups})
    assert table.count("prefix replay: disabled (decoder layer 0 was given a KV cache") == 1


@pytest.mark.e2e
def test_the_run_time_check_catches_what_record_time_cannot_see(
    tmp_path, tiny_model_dir, task_manager, naive, monkeypatch
):
    """A renamed cache of a kind replay cannot recognise at all (the record-time guard is blinded):
    continuations then run on a cache the replayed layers never filled, and only the comparison with
    a full pass shows it. The first likelihood doc passes its check (one pass, no cache): the doc of
    the other kind is checked anew, and that check catches it."""
    monkeypatch.setattr(lmms_talo.method.prefix_replay, "_cache_given", lambda args, kwargs: None)
    stores, groups = _sweep(tmp_path, "replay", tiny_model_dir, task_manager, monkeypatch, "renamed_cache_argument")
    _assert_naive_answers(stores, naive[0], groups)
    statuses = [group["sweep_replay"]["status"] for group in groups]
    assert any(status.startswith("disabled (on probe doc") and "with replay gave" in status for status in statuses)
