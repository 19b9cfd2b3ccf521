"""Prefix replay gives bit-identical outputs to the naive pass, skips the work it claims to skip,
falls back to full compute when it cannot be exact, and leaves the model as it found it."""

import json
import logging

import pytest
import torch

from harness import write_image_task
from lmms_talo.backbone import decoder_layers
from lmms_talo.interventions import Knockout, knocked_out
from lmms_talo.replay import PrefixReplay
from tiny_models import (
    ARCHITECTURES, LMMS_EVAL_MODEL_ARGS, TEXT_ARCHITECTURES, VLM_ARCHITECTURES, example_inputs, load_processor, load_tiny,
)

LAYERS = (1, 2, 3)
NEW_TOKENS = 3


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request, tiny_model_dir):
    arch = request.param
    path = tiny_model_dir(arch)
    return arch, load_tiny(arch, path), load_processor(arch, path)


def outputs(model, inputs, knockout):
    """Everything a harness reads: generated ids, per-step logits, and full-sequence logits."""
    with torch.no_grad(), knocked_out(model, knockout):
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        logits = model(**inputs).logits
    return generated.sequences, torch.stack(generated.logits), logits


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize("intervention", ["zero", "uniform", "mean"])
def test_replay_is_bit_identical_to_the_naive_pass(arch_model, intervention):
    arch, model, processor = arch_model
    for batch in (1, 2) if intervention == "zero" else (1,):  # batch 2: left-padded prompts of different lengths
        inputs = example_inputs(arch, processor, batch=batch)
        naive = {layer: outputs(model, inputs, Knockout((layer,), intervention)) for layer in LAYERS}
        replay = PrefixReplay(model)
        with replay.installed():
            with replay.variant(None):
                outputs(model, inputs, None)
            for layer in LAYERS:
                knockout = Knockout((layer,), intervention)
                with replay.variant(knockout):
                    assert_identical(outputs(model, inputs, knockout), naive[layer])
        assert replay.stats.calls_replayed == 2 * len(LAYERS)  # generate's prefill and the forward
        assert replay.stats.calls_unmatched == 0


def _count_calls(modules):
    counts = [0] * len(modules)
    handles = [m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1)) for i, m in enumerate(modules)]
    return counts, handles


def test_replay_skips_the_prefix_and_the_vision_tower(arch_model):
    """Counted independently of the replay's own counters: attention modules that ran, per layer."""
    arch, model, processor = arch_model
    inputs = example_inputs(arch, processor)
    sites = decoder_layers(model)
    counts, handles = _count_calls([site.attention for site in sites])
    vision = getattr(model.model, "vision_tower", None) or getattr(model.model, "visual", None)
    vision_counts, vision_handles = _count_calls([vision] if vision is not None else [])
    replay = PrefixReplay(model)
    try:
        with replay.installed(), torch.no_grad():
            with replay.variant(None):
                model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert counts == [NEW_TOKENS] * len(sites)  # prefill + decode steps, every layer
            for layer in LAYERS:
                counts[:] = [0] * len(sites)
                with replay.variant(Knockout((layer,))):
                    model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
                # layers below the knockout skip the prefill; decode steps run every layer
                assert counts == [NEW_TOKENS - 1] * layer + [NEW_TOKENS] * (len(sites) - layer)
    finally:
        for handle in handles + vision_handles:
            handle.remove()
    if arch in VLM_ARCHITECTURES and vision is not None:
        assert vision_counts == [1], "the vision tower runs once per input, in the base pass"
    assert replay.stats.layers_replayed == sum(LAYERS)


def test_records_are_bounded_and_freed(arch_model):
    arch, model, processor = arch_model
    inputs = example_inputs(arch, processor)
    replay = PrefixReplay(model, replay_below=2)
    with replay.installed(), torch.no_grad():
        with replay.variant(None):
            model(**inputs)
        (record,) = replay.records
        assert len(record.layers) == 2  # only the layers a knockout of layers <= 2 replays
        replay.forget()
        assert not replay.records and not replay.vision_records
        with replay.variant(Knockout((2,))):
            model(**inputs)
    assert replay.stats.calls_unmatched == 1  # forgotten: computed in full


def test_inputs_that_match_no_record_are_computed_in_full(arch_model):
    arch, model, processor = arch_model
    one, two = example_inputs(arch, processor, batch=2), example_inputs(arch, processor, batch=1)
    naive = outputs(model, two, Knockout((2,)))
    replay = PrefixReplay(model)
    with replay.installed():
        with replay.variant(None):
            outputs(model, one, None)
        with replay.variant(Knockout((2,))):
            assert_identical(outputs(model, two, Knockout((2,))), naive)
    assert replay.stats.calls_unmatched == 2 and replay.stats.calls_replayed == 0


def _context_then_continuations(model, knockout, tamper=False):
    """A likelihood harness's pattern: one context pass, then three continuations as one batch on the
    context's KV cache (repeated per row). `tamper` nudges the cache in between."""
    context = torch.tensor([[5, 17, 33, 41, 8, 29, 77]])
    rows = torch.tensor([[12, 40, 3], [7, 7, 90], [64, 2, 18]])
    with torch.no_grad(), knocked_out(model, knockout):
        first = model(input_ids=context, use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(rows))
        if tamper:
            cache.layers[0].keys.add_(1e-3)
        mask = torch.ones(len(rows), context.shape[1] + rows.shape[1], dtype=torch.long)
        rest = model(input_ids=rows, past_key_values=cache, attention_mask=mask)
    return first.logits, rest.logits


# The Qwen-VL models need 3D position ids for text on a cache, which this plain harness does not build.
CONTEXT_CACHE_ARCHS = set(TEXT_ARCHITECTURES) | {"llava", "llava_next", "llava_onevision", "internvl"}


def test_continuations_on_a_shared_context_cache_are_replayed(arch_model):
    arch, model, _ = arch_model
    if arch not in CONTEXT_CACHE_ARCHS:
        pytest.skip("this harness pattern does not fit the model")
    naive = {layer: _context_then_continuations(model, Knockout((layer,))) for layer in LAYERS}
    replay = PrefixReplay(model)
    with replay.installed():
        with replay.variant(None):
            _context_then_continuations(model, None)
        for layer in LAYERS:
            with replay.variant(Knockout((layer,))):
                assert_identical(_context_then_continuations(model, Knockout((layer,))), naive[layer])
    assert replay.stats.calls_recorded == 2 and replay.stats.calls_replayed == 2 * len(LAYERS)
    assert replay.stats.calls_unmatched == 0


def test_a_cache_that_differs_from_the_recorded_one_is_not_replayed(arch_model):
    arch, model, _ = arch_model
    if arch not in CONTEXT_CACHE_ARCHS:
        pytest.skip("this harness pattern does not fit the model")
    naive = _context_then_continuations(model, Knockout((2,)), tamper=True)
    replay = PrefixReplay(model)
    with replay.installed():
        with replay.variant(None):
            _context_then_continuations(model, None)
        with replay.variant(Knockout((2,))):
            assert_identical(_context_then_continuations(model, Knockout((2,)), tamper=True), naive)
    assert replay.stats.calls_replayed == 1 and replay.stats.calls_unmatched == 1  # the context only


def test_unreplayable_calls_fall_back_with_a_log_line(arch_model, caplog):
    arch, model, processor = arch_model
    inputs = example_inputs(arch, processor)
    with torch.no_grad(), knocked_out(model, Knockout((2,))):
        naive = model(**inputs, output_attentions=True)
    replay = PrefixReplay(model)
    with caplog.at_level(logging.WARNING, logger="lmms_talo"), replay.installed(), torch.no_grad():
        with replay.variant(None):
            model(**inputs, output_attentions=True)
        with replay.variant(Knockout((2,))), knocked_out(model, Knockout((2,))):
            replayed = model(**inputs, output_attentions=True)
    assert torch.equal(replayed.logits, naive.logits)
    assert all(torch.equal(a, b) for a, b in zip(replayed.attentions, naive.attentions))
    assert replay.stats.calls_recorded == 0 and replay.stats.layers_replayed == 0
    assert "attention weights were requested" in caplog.text


def test_nothing_leaks_even_after_an_exception(arch_model):
    arch, model, processor = arch_model
    patched = [site.layer for site in decoder_layers(model)]
    replay = PrefixReplay(model)
    patched += [replay.text_model] + ([replay.vision_owner] if replay.vision_owner is not None else [])
    names = {"forward", "get_image_features", "get_video_features"}
    before = [{k: id(v) for k, v in vars(m).items() if k in names} for m in patched]
    with pytest.raises(RuntimeError, match="boom"):
        with replay.installed(), replay.variant(None), torch.no_grad():
            model(**example_inputs(arch, processor))
            assert replay.records
            raise RuntimeError("boom")
    assert [{k: id(v) for k, v in vars(m).items() if k in names} for m in patched] == before
    assert not replay.records and not replay.vision_records


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
    write_image_task(folder / "mc", "talo_replay_mc", [c[i % 2] for i, c in enumerate(docs)],
                     output_type="multiple_choice", choices=docs)
    return TaskManager(include_path=[str(folder / "gen"), str(folder / "mc")])


LMMS_EVAL_MODELS = {"llava": "talo_llava", "qwen2_vl": "talo_qwen2_vl", "smollm2": "talo_huggingface"}
# lmms-eval 0.7.3's Qwen2-VL class has no loglikelihood: its likelihood path is the forward pass
# checked bit for bit above. The plain causal LM ignores the images.
LMMS_EVAL_TASKS = {
    "llava": ["talo_replay_gen", "talo_replay_mc"],
    "qwen2_vl": ["talo_replay_gen"],
    "smollm2": ["talo_replay_gen", "talo_replay_mc"],
}


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
        _lmms_eval_run(arch, tiny_model_dir(arch), task_manager, LMMS_EVAL_TASKS[arch], tmp_path / name,
                       intervention=intervention, report=tmp_path / f"{name}.json", **args)
        stores[name] = {p.name: _store_records(p) for p in (tmp_path / name).glob("*.jsonl")}
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["subtasks"]
    assert len(stores["naive"]) == len(LMMS_EVAL_TASKS[arch])  # one probe store per sub-task
    assert stores["replay"] == stores["naive"]
    for group in reports["replay"]:
        assert group["sweep_replay"]["layers_replayed"] > 0 and group["sweep_replay"]["calls_unmatched"] == 0
    if "select" in stores:
        for name, records in stores["select"].items():
            assert all(stores["naive"][name][key] == value for key, value in records.items())
        assert [g["selected_layer"] for g in reports["select"]] == [g["selected_layer"] for g in reports["naive"]]
        assert all(g["sweep_mode"] == "select" for g in reports["select"])
