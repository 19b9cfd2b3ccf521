"""Entry point of group `lmms_eval.models`: the TaLo model manifests.

lmms-eval imports this module when it builds its model registry, so it imports nothing heavy;
the classes themselves are built on first use by `lmms_talo.lmms.named`.
"""

from lmms_eval.models.registry_v2 import ModelManifest

# TaLo model name -> (lmms-eval base model, has a simple class, has a chat class). A string in the
# simple slot names the model whose simple class to use: lmms-eval's `huggingface` has none, so
# talo_huggingface's simple slot (--force_simple) is TaLo over lmms-talo's own `hf_causal_lm`.
NAMED_MODELS = {
    "talo_llava": ("llava_hf", True, True),
    "talo_qwen2_vl": ("qwen2_vl", True, False),
    "talo_qwen2_5_vl": ("qwen2_5_vl", True, True),
    "talo_qwen3_vl": ("qwen3_vl", True, True),
    "talo_internvl": ("internvl_hf", False, True),
    "talo_huggingface": ("huggingface", "hf_causal_lm", True),
}

_NAMED = "lmms_talo.lmms.named"


def manifests() -> list[ModelManifest]:
    found = [
        ModelManifest(
            model_id=name,
            simple_class_path=f"{_NAMED}.simple__{simple if isinstance(simple, str) else base}" if simple else None,
            chat_class_path=f"{_NAMED}.chat__{base}" if chat else None,
        )
        for name, (base, simple, chat) in NAMED_MODELS.items()
    ]
    # Not a TaLo model: plain causal LMs (loglikelihood + generate_until) for lmms-eval's simple slot
    found.append(ModelManifest(model_id="hf_causal_lm", simple_class_path="lmms_talo.lmms.text_model.CausalLM"))
    found.append(
        ModelManifest(
            model_id="talo",
            simple_class_path=f"{_NAMED}.TaloAnySimple",
            chat_class_path=f"{_NAMED}.TaloAny",
        )
    )
    return found
