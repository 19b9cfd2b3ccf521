"""Entry point of group `lmms_eval.models`: the TaLo model manifests.

lmms-eval imports this module when it builds its model registry, so it imports nothing heavy;
the classes themselves are built on first use by `lmms_talo.harness.lmms.named`.
"""

from dataclasses import dataclass

from lmms_eval.models.registry_v2 import ModelManifest


@dataclass(frozen=True)
class NamedModel:
    """A TaLo model over one lmms-eval model: which of its classes (simple, chat) TaLo wraps.
    `simple_base` names another model whose simple class fills the simple slot: lmms-eval's
    `huggingface` has none, so talo_huggingface's (--force_simple) is TaLo over lmms-talo's own
    `hf_causal_lm`."""

    base: str
    simple: bool = True
    chat: bool = True
    simple_base: str | None = None

    def manifest(self, name: str) -> ModelManifest:
        return ModelManifest(
            model_id=name,
            simple_class_path=f"{_NAMED}.simple__{self.simple_base or self.base}" if self.simple else None,
            chat_class_path=f"{_NAMED}.chat__{self.base}" if self.chat else None,
        )


NAMED_MODELS = {
    "talo_llava": NamedModel("llava_hf"),
    "talo_qwen2_vl": NamedModel("qwen2_vl", chat=False),
    "talo_qwen2_5_vl": NamedModel("qwen2_5_vl"),
    "talo_qwen3_vl": NamedModel("qwen3_vl"),
    "talo_internvl": NamedModel("internvl_hf", simple=False),
    "talo_huggingface": NamedModel("huggingface", simple_base="hf_causal_lm"),
}

_NAMED = "lmms_talo.harness.lmms.named"


def manifests() -> list[ModelManifest]:
    found = [named.manifest(name) for name, named in NAMED_MODELS.items()]
    # Not a TaLo model: plain causal LMs (loglikelihood + generate_until) for lmms-eval's simple slot
    found.append(ModelManifest(model_id="hf_causal_lm", simple_class_path="lmms_talo.harness.lmms.text_model.CausalLM"))
    found.append(
        ModelManifest(
            model_id="talo",
            simple_class_path=f"{_NAMED}.TaloAnySimple",
            chat_class_path=f"{_NAMED}.TaloAny",
        )
    )
    return found
