"""Interventions on a model dispatched by accelerate with CPU and disk offload."""

import pytest
import torch
from tiny_models import example_inputs, load_processor, load_tiny
from transformers import AutoModelForCausalLM

from lmms_talo.method.interventions import Knockout, knocked_out


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    path = tiny_model_dir("llama")
    resident = load_tiny("llama", path)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path_factory.mktemp("offload"))
    ).eval()
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    return resident, offloaded, load_processor("llama", path)


@pytest.mark.parametrize("intervention", ["zero", "uniform", "mean", "skip", "mlp_zero"])
@pytest.mark.parametrize("layer", [1, 2])  # 1 lives on disk, 2 on the CPU
def test_offloaded_knockout_equals_resident(models, intervention, layer):
    resident, offloaded, tokenizer = models
    inputs = example_inputs("llama", tokenizer, batch=2)
    with torch.no_grad():
        with knocked_out(resident, Knockout((layer,), intervention)):
            want = resident(**inputs).logits
        with knocked_out(offloaded, Knockout((layer,), intervention)):
            got = offloaded(**inputs).logits
            tokens = offloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
        with knocked_out(resident, Knockout((layer,), intervention)):
            want_tokens = resident.generate(**inputs, max_new_tokens=4, do_sample=False)
        plain = offloaded(**inputs).logits
    assert torch.equal(got, want)
    assert torch.equal(tokens, want_tokens)
    assert not torch.equal(plain, want)
    with torch.no_grad():
        assert torch.equal(plain, resident(**inputs).logits), "nothing leaks into the offloaded weights"


@pytest.mark.parametrize("intervention", ["zero", "uniform"])
def test_offloaded_screen_equals_resident(models, intervention):
    """The gradient screen (parameters frozen, layers checkpointed) on accelerate-dispatched layers:
    the same estimates, and the layers' own offload forwards are back in place afterwards."""
    from lmms_talo.method.option_logprobs import PackingCheck
    from lmms_talo.method.screen import ScreenItem, doc_effects

    resident, offloaded, tokenizer = models
    prompt = {"input_ids": example_inputs("llama", tokenizer)["input_ids"]}
    item = ScreenItem([(prompt, tokenizer.encode(text, add_special_tokens=False)) for text in (" red", " blue sky")], 0)
    forwards = [layer.__dict__.get("forward") for layer in offloaded.model.layers]
    want = doc_effects(resident, [item], [1, 2, 3], intervention, PackingCheck())
    got = doc_effects(offloaded, [item], [1, 2, 3], intervention, PackingCheck())
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got[1] == pytest.approx(want[1], rel=1e-5, abs=1e-7)
    assert [layer.__dict__.get("forward") for layer in offloaded.model.layers] == forwards
    assert all(f is not None for f in forwards)  # accelerate's own, kept
    assert all(p.requires_grad for p in resident.parameters())
