"""Layer knockouts as reversible context managers.

Paper interventions (all on one decoder layer's self-attention in the language backbone):
  zero     q/k/v/o weights and biases set to 0, so the attention sub-layer adds exactly 0 to the
           residual stream. A forward hook zeroes the attention output while the layer still
           writes its K/V cache (skipping the K/V write breaks transformers' mask sizing).
  uniform  each of those tensors filled with 1/out_features (the authors' "uniform scaling").
  mean     each of those tensors filled with its own scalar mean ("mean substitution").
uniform and mean are forward hooks on the projections that recompute each output with the filled
tensors (`F.linear(x, W_filled, b_filled)`, the very call the edited module would make). No weight
is ever written, so nothing can leak into the model, and the hooks work unchanged when accelerate
offloads weights to CPU or disk. The tests prove every intervention bit-identical to the real
weight edit (`edit_weights_in_place`).

Extensions beyond the paper: skip (the whole decoder layer is the identity, K/V still written)
and mlp_zero (the layer's MLP adds 0).

Hooks are removed in `finally`, exceptions included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DecoderLayerSite, decoder_layers

PAPER_INTERVENTIONS = ("zero", "uniform", "mean")
EXTENSION_INTERVENTIONS = ("skip", "mlp_zero")
INTERVENTIONS = PAPER_INTERVENTIONS + EXTENSION_INTERVENTIONS


class InterventionError(ValueError):
    """Bad intervention name or layer index."""


@dataclass(frozen=True)
class Knockout:
    """What to knock out: a set of decoder layers and the intervention applied to each."""

    layers: tuple[int, ...]
    intervention: str = "zero"

    def __post_init__(self):
        check_intervention(self.intervention)

    @property
    def label(self) -> str:
        return "+".join(str(layer) for layer in self.layers) if self.layers else "base"


def check_intervention(name: str) -> str:
    if name not in INTERVENTIONS:
        raise InterventionError(
            f"unknown intervention {name!r}: choose one of {', '.join(PAPER_INTERVENTIONS)} "
            f"(the paper's) or {', '.join(EXTENSION_INTERVENTIONS)} (extensions)"
        )
    return name


def check_layers(layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(layers)
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        named = f"layer {bad[0]} is" if len(bad) == 1 else f"layers {', '.join(map(str, bad))} are"
        raise InterventionError(
            f"{named} out of range: the language backbone has {num_layers} decoder layers, "
            f"numbered 0..{num_layers - 1}"
        )
    return layers


# --- tensor fills (shared by the hooks and by the reference weight edit) ---


def _fill_value(param: torch.Tensor, out_features: int, intervention: str) -> float:
    if intervention == "zero":
        return 0.0
    if intervention == "uniform":
        return 1.0 / out_features
    if intervention == "mean":
        return param.detach().double().mean().item()
    raise InterventionError(f"{intervention!r} has no weight-level definition")


def _readable(module: nn.Module):
    """The module with its real weights in place, also when accelerate offloads them."""
    from accelerate.utils import align_module_device

    return align_module_device(module)


def filled_projection_tensors(proj: nn.Module, intervention: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of one projection as the weight-level definition of `intervention` fills them."""
    out_features = getattr(proj, "out_features", None) or proj.weight.shape[0]
    with _readable(proj):
        weight = torch.full_like(proj.weight, _fill_value(proj.weight, out_features, intervention), device=_device_of(proj))
        bias = proj.bias
        if bias is not None:
            bias = torch.full_like(bias, _fill_value(bias, out_features, intervention), device=_device_of(proj))
    return weight, bias


def _device_of(proj: nn.Module) -> torch.device:
    hook = getattr(proj, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else proj.weight.device


# --- hooks ---


def _zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def _identity_output(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def _linear_with(weight: torch.Tensor, bias: torch.Tensor | None):
    def hook(module, args, output):
        return F.linear(args[0], weight, bias)

    return hook


@contextlib.contextmanager
def _hooked(register: Callable[[], Iterable[torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    handles = []
    try:
        handles.extend(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


def _apply_one(site: DecoderLayerSite, intervention: str) -> contextlib.AbstractContextManager:
    if intervention == "zero":
        return _hooked(lambda: [site.attention.register_forward_hook(_zero_output)])
    if intervention in ("uniform", "mean"):
        return _hooked(lambda: [
            proj.register_forward_hook(_linear_with(*filled_projection_tensors(proj, intervention)))
            for proj in site.projections
        ])
    if intervention == "skip":
        return _hooked(lambda: [site.layer.register_forward_hook(_identity_output, with_kwargs=True)])
    if intervention == "mlp_zero":
        mlp = getattr(site.layer, "mlp", None) or getattr(site.layer, "feed_forward", None)
        if mlp is None:
            raise InterventionError(f"layer {site.index} has no mlp/feed_forward module for mlp_zero")
        return _hooked(lambda: [mlp.register_forward_hook(_zero_output)])
    raise InterventionError(f"unknown intervention {intervention!r}")


@contextlib.contextmanager
def knocked_out(model: nn.Module, knockout: Knockout | None) -> Iterator[None]:
    """Run the block with `knockout` applied to `model`; `None` or no layers means the full model."""
    if knockout is None or not knockout.layers:
        yield
        return
    sites = decoder_layers(model)
    check_layers(knockout.layers, len(sites))
    with contextlib.ExitStack() as stack:
        for layer in knockout.layers:
            stack.enter_context(_apply_one(sites[layer], knockout.intervention))
        yield


@torch.no_grad()
def edit_weights_in_place(model: nn.Module, layer: int, intervention: str) -> None:
    """The weight-level definition, applied irreversibly (reference for tests and for export)."""
    sites = decoder_layers(model)
    check_layers([layer], len(sites))
    for proj in sites[layer].projections:
        weight, bias = filled_projection_tensors(proj, intervention)
        proj.weight.copy_(weight)
        if bias is not None:
            proj.bias.copy_(bias)
