"""Interventions on a model dispatched by accelerate with CPU and disk offload."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmms_talo.interventions import Knockout, knocked_out
from tiny_models import example_inputs, load_processor, load_tiny


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    path = tiny_model_dir("llama")
    resident = load_tiny("llama", path)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk"}
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
