"""Prefix replay gives bit-identical outputs to the naive pass, skips the work it claims to skip,
falls back to full compute when it cannot be exact, and leaves the model as it found it."""

import logging

import pytest
import torch
from tiny_models import (
    ARCHITECTURES,
    TEXT_ARCHITECTURES,
    VLM_ARCHITECTURES,
    example_inputs,
    load_processor,
    load_tiny,
)

from lmms_talo.method.backbone import decoder_layers
from lmms_talo.method.interventions import Knockout, knocked_out
from lmms_talo.method.prefix_replay import PrefixReplay

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
        generated = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
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
    handles = [
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1)) for i, m in enumerate(modules)
    ]
    return counts, handles


def test_replay_skips_the_prefix_and_the_vision_tower(arch_model):
    """Counted independently of the replay's own counters: attention modules that ran, per layer."""
    arch, model, processor = arch_model
    inputs = example_inputs(arch, processor)
    sites = decoder_layers(model)
    counts, handles = _count_calls([site.attention for site in sites])
    vision = getattr(model.model, "vision_tower", None) or getattr(model.model, "visual", None)
    assert (vision is not None) == (arch in VLM_ARCHITECTURES), (
        "every VLM's vision tower is found, so its calls are counted"
    )
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
    if arch in VLM_ARCHITECTURES:
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
    with pytest.raises(RuntimeError, match="boom"), replay.installed(), replay.variant(None), torch.no_grad():
        model(**example_inputs(arch, processor))
        assert replay.records
        raise RuntimeError("boom")
    assert [{k: id(v) for k, v in vars(m).items() if k in names} for m in patched] == before
    assert not replay.records and not replay.vision_records
