"""The sweep's interventions equal real weight edits bit for bit, and never leak."""

import copy

import pytest
import torch
from tiny_models import ARCHITECTURES, example_inputs, get_decoder_layers, load_processor, load_tiny

from lmms_talo.method.backbone import UnsupportedModelError, decoder_layers
from lmms_talo.method.interventions import (
    InterventionError,
    Knockout,
    edit_weights_in_place,
    knocked_out,
)

GENERATE = dict(max_new_tokens=6, do_sample=False, use_cache=True)


def _state(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _hooks(model):
    """Every hook on every module (transformers registers some of its own: compare, don't expect none)."""
    return [(name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()]


def _assert_same_state(model, reference):
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(state[name], value), f"{name} changed"


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request, tiny_model_dir):
    arch = request.param
    path = tiny_model_dir(arch)
    model = load_tiny(arch, path)
    processor = load_processor(arch, path)
    with torch.no_grad():  # transformers adds its own hooks lazily, on the first calls
        for batch in (1, 2):
            model(**example_inputs(arch, processor, batch=batch))
            model.generate(**example_inputs(arch, processor, batch=batch), **GENERATE)
    return arch, model, processor


def test_backbone_is_the_language_model(arch_model):
    arch, model, _ = arch_model
    sites = decoder_layers(model)
    expected = get_decoder_layers(model, arch)
    assert [s.layer for s in sites] == list(expected)
    vision = [m for name, m in model.named_modules() if "vision" in name or "visual" in name]
    assert not any(s.attention is v for s in sites for v in vision)


@pytest.mark.parametrize("intervention", ["zero", "uniform", "mean"])
def test_knockout_equals_weight_edit(arch_model, intervention):
    arch, model, processor = arch_model
    before, hooks = _state(model), _hooks(model)
    for batch in (1, 2):
        inputs = example_inputs(arch, processor, batch=batch)
        for layer in (0, 2):
            edited = copy.deepcopy(model)
            edit_weights_in_place(edited, layer, intervention)
            with torch.no_grad():
                want_logits = edited(**inputs).logits
                want_tokens = edited.generate(**inputs, **GENERATE)
                with knocked_out(model, Knockout((layer,), intervention)):
                    got_logits = model(**inputs).logits
                    got_tokens = model.generate(**inputs, **GENERATE)
                plain = model(**inputs).logits
            assert torch.equal(got_logits, want_logits), f"{arch} {intervention} layer {layer} batch {batch}"
            assert torch.equal(got_tokens, want_tokens), f"{arch} {intervention} layer {layer} batch {batch}"
            assert not torch.equal(plain, want_logits), "the knockout must change something"
    _assert_same_state(model, before)
    assert _hooks(model) == hooks


def test_nothing_leaks_after_an_exception(arch_model):
    arch, model, processor = arch_model
    before, hooks = _state(model), _hooks(model)
    inputs = example_inputs(arch, processor)
    for intervention in ("zero", "uniform", "mean", "skip", "mlp_zero"):
        with pytest.raises(RuntimeError, match="boom"), knocked_out(model, Knockout((1, 3), intervention)):
            with torch.no_grad():
                model(**inputs)
            raise RuntimeError("boom")
        _assert_same_state(model, before)
        assert _hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)


def test_bad_layer_and_intervention_names(arch_model):
    _, model, _ = arch_model
    hooks = _hooks(model)
    with (
        pytest.raises(InterventionError, match="out of range.*4 decoder layers"),
        knocked_out(model, Knockout((4,), "zero")),
    ):
        pass
    with pytest.raises(InterventionError, match="unknown intervention 'zeroes'"):
        Knockout((1,), "zeroes")
    assert _hooks(model) == hooks


def test_unknown_architecture_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="Sequential.*decoder layer list"):
        decoder_layers(model)
