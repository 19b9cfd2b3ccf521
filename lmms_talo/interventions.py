"""Layer knockouts as reversible context managers.

Paper interventions (all on one decoder layer's self-attention in the language backbone):
  zero     q/k/v/o weights and biases set to 0, so the attention sub-layer adds exactly 0 to the
           residual stream. Implemented as a forward hook that zeroes the attention output while
           the layer still writes its K/V cache (skipping the K/V write breaks transformers' mask
           sizing); the tests prove it bit-identical to the real weight edit.
  uniform  each of those tensors filled with 1/out_features (the authors' "uniform scaling").
  mean     each of those tensors filled with its own scalar mean ("mean substitution").
uniform/mean are real weight edits: the parameter's storage is swapped for a filled tensor and the
original tensor object is put back on exit, so restoring is exact and costs no copy.

Extensions beyond the paper: skip (the whole decoder layer is the identity, K/V still written)
and mlp_zero (the layer's MLP adds 0).

Nothing leaks: hooks are removed and tensors restored in `finally`, exceptions included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
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


# --- tensor fills (shared by the swap-based interventions and by the reference weight edit) ---


def _out_features(site: DecoderLayerSite, param: nn.Parameter) -> int:
    for proj in site.projections:
        if proj.weight is param or getattr(proj, "bias", None) is param:
            return getattr(proj, "out_features", None) or proj.weight.shape[0]
    raise AssertionError("parameter is not one of the site's projections")


def filled_attention_tensors(site: DecoderLayerSite, intervention: str) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The (parameter, replacement) pairs that the weight-level definition of an intervention uses."""
    pairs = []
    for param in site.attention_parameters():
        if intervention == "zero":
            value = 0.0
        elif intervention == "uniform":
            value = 1.0 / _out_features(site, param)
        elif intervention == "mean":
            value = param.detach().double().mean().item()
        else:
            raise InterventionError(f"{intervention!r} has no weight-level definition")
        pairs.append((param, torch.full_like(param, value)))
    return pairs


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


@contextlib.contextmanager
def _swapped(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    originals = []
    try:
        for param, replacement in pairs:
            originals.append((param, param.data))
            param.data = replacement
        yield
    finally:
        for param, original in reversed(originals):
            param.data = original


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
        return _swapped(filled_attention_tensors(site, intervention))
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
    for param, replacement in filled_attention_tensors(sites[layer], intervention):
        param.copy_(replacement)
