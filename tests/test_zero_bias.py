"""`zero` on a model whose attention projections have biases (the tiny Llama has q/k/v/o biases):
the knocked-out attention sub-layer adds exactly 0 to the residual stream, because every q/k/v/o
weight and bias is zeroed. An edit of the weights alone (as the authors' code makes it, which zeroes
q/k/v biases only on Qwen) would leave o_proj's bias in the residual stream: this is the deliberate
difference docs/method.md states."""

import torch
from tiny_models import example_inputs, load_processor, load_tiny

from lmms_talo.method.backbone import decoder_layers
from lmms_talo.method.interventions import Knockout, knocked_out

LAYER = 2


def _attention_output(model, inputs) -> torch.Tensor:
    captured = {}
    site = decoder_layers(model)[LAYER]

    def keep(module, args, output):  # returns None: the output is only read
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = site.attention.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured["out"]


def test_zero_knocks_out_the_biased_attention_exactly(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = load_tiny("llama", path)
    inputs = example_inputs("llama", load_processor("llama", path))
    o_proj = decoder_layers(model)[LAYER].attention.o_proj
    assert o_proj.bias is not None and bool(o_proj.bias.abs().sum() > 0), "the test model has an o_proj bias"

    with knocked_out(model, Knockout((LAYER,), "zero")):
        ours = _attention_output(model, inputs)
    assert torch.count_nonzero(ours) == 0, "zero: the attention sub-layer adds exactly 0"

    weights_only = {name: p.detach().clone() for name, p in decoder_layers(model)[LAYER].attention.named_parameters()}
    with torch.no_grad():
        for name, param in decoder_layers(model)[LAYER].attention.named_parameters():
            if name.endswith("weight"):
                param.zero_()
        theirs = _attention_output(model, inputs)
        for name, param in decoder_layers(model)[LAYER].attention.named_parameters():
            param.copy_(weights_only[name])
    assert torch.equal(theirs, o_proj.bias.expand_as(theirs)), "zeroed weights alone leave o_proj's bias"
