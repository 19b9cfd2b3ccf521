"""Find the language backbone's decoder layers and the self-attention projections TaLo edits.

TaLo only ever touches the language model: vision towers also have `layers.N.self_attn`, so this
module walks to the text decoder explicitly instead of searching module names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Where the text decoder's layer list lives, relative to the loaded model, per layout.
# transformers 5 VLMs: model.model.language_model.layers; causal LMs: model.model.layers;
# InternVL remote code: model.language_model.model.layers.
_DECODER_PATHS = (
    "model.language_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "language_model.layers",
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
)

# Attention module attribute names: transformers layers use self_attn; InternLM2 uses attention.
_ATTENTION_NAMES = ("self_attn", "attention", "attn")

# Projection sets, by naming convention. Every projection's weight and bias (when present) is
# what the `zero`, `uniform` and `mean` interventions act on.
_PROJECTION_SETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("wqkv", "wo"),  # InternLM2 (InternVL2/2.5 remote code)
    ("qkv_proj", "o_proj"),  # Phi-3 style packed projections
)


class UnsupportedModelError(TypeError):
    """The model's language backbone could not be located."""


@dataclass(frozen=True)
class DecoderLayerSite:
    """One decoder layer of the language backbone and the attention module inside it."""

    index: int
    layer: nn.Module
    attention: nn.Module
    projections: tuple[nn.Module, ...]

    def attention_parameters(self) -> list[nn.Parameter]:
        """Weights and biases of q/k/v/o (or the packed equivalents), in a fixed order."""
        params = []
        for proj in self.projections:
            params.append(proj.weight)
            if getattr(proj, "bias", None) is not None:
                params.append(proj.bias)
        return params


def _resolve(model: nn.Module, dotted: str):
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _attention_of(layer: nn.Module) -> nn.Module | None:
    for name in _ATTENTION_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _projections_of(attention: nn.Module) -> tuple[nn.Module, ...] | None:
    for names in _PROJECTION_SETS:
        modules = [getattr(attention, name, None) for name in names]
        if all(isinstance(m, nn.Module) and hasattr(m, "weight") for m in modules):
            return tuple(modules)
    return None


def decoder_layers(model: nn.Module) -> list[DecoderLayerSite]:
    """Every decoder layer of the language backbone, in order, with its attention projections."""
    model = unwrap(model)
    for path in _DECODER_PATHS:
        layers = _resolve(model, path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        sites = []
        for index, layer in enumerate(layers):
            attention = _attention_of(layer)
            projections = _projections_of(attention) if attention is not None else None
            if attention is None or projections is None:
                break
            sites.append(DecoderLayerSite(index, layer, attention, projections))
        else:
            return sites
    raise UnsupportedModelError(
        f"lmms-talo cannot find the language backbone of {type(model).__name__}: looked for a "
        f"decoder layer list at {', '.join(_DECODER_PATHS)}, each layer holding an attention "
        f"module ({', '.join(_ATTENTION_NAMES)}) with projections "
        f"{' | '.join('/'.join(s) for s in _PROJECTION_SETS)}. Supported: LLaVA-1.5, LLaVA-NeXT, "
        f"LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL (HF and remote code) and "
        f"causal LMs such as Llama, Qwen2 and SmolLM2."
    )


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))
