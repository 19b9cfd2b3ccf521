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

Each intervention is one `Intervention` subclass with one `@register` line: its hooks, and its
weight fill where it has one (which makes it exportable). Config validation, `lmms-talo export` and
the README's table read the registry. Hooks are removed in `finally`, exceptions included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NewType

import torch
import torch.nn.functional as F
from torch import nn

from lmms_talo.method.backbone import DecoderLayerSite, decoder_layers


class InterventionError(ValueError):
    """Bad intervention name or layer index."""


class Intervention:
    """One way to knock out a decoder layer. A subclass gives its `name`, whether it is one of the
    paper's (`paper`), the forward hooks that apply it (`hooks`), and, where the intervention has a
    weight-level definition, the constant each attention projection tensor is filled with (`fill`):
    that definition is what the hooks are proven equal to and what `lmms-talo export` bakes in."""

    name: str = ""
    paper: bool = False
    summary: str = ""

    def hooks(self, site: DecoderLayerSite) -> list[torch.utils.hooks.RemovableHandle]:
        raise NotImplementedError

    def fill(self, param: torch.Tensor, out_features: int) -> float | None:
        """The constant a projection tensor is filled with; None: no weight-level definition."""
        return None

    @property
    def exportable(self) -> bool:
        return type(self).fill is not Intervention.fill


INTERVENTIONS: dict[str, Intervention] = {}


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make an intervention available by its name (model arg, export, checks)."""
    INTERVENTIONS[cls.name] = cls()
    return cls


def names(paper: bool | None = None, exportable: bool | None = None) -> tuple[str, ...]:
    """Registered names, optionally only the paper's (or the extensions) / only the exportable."""
    return tuple(
        n
        for n, i in INTERVENTIONS.items()
        if (paper is None or i.paper == paper) and (exportable is None or i.exportable == exportable)
    )


def intervention(name: str) -> Intervention:
    if name not in INTERVENTIONS:
        extensions = names(paper=False)
        raise InterventionError(
            f"unknown intervention {name!r}: choose one of {', '.join(names(paper=True))} (the paper's)"
            + (f" or {', '.join(extensions)} (extensions)" if extensions else "")
        )
    return INTERVENTIONS[name]


VariantLabel = NewType("VariantLabel", str)
"""A variant's key in sweep results, probe logs and the probe store: BASE for the unmodified model,
otherwise the knocked-out layers joined by "+" (Knockout.label), e.g. "7" or "3+12"."""
BASE = VariantLabel("base")


def layer_label(layer: int) -> VariantLabel:
    """The variant label of one knocked-out layer."""
    return VariantLabel(str(layer))


@dataclass(frozen=True)
class Knockout:
    """What to knock out: a set of decoder layers and the intervention applied to each."""

    layers: tuple[int, ...]
    intervention: str = "zero"

    def __post_init__(self):
        check_intervention(self.intervention)

    @property
    def label(self) -> VariantLabel:
        return VariantLabel("+".join(map(str, self.layers))) if self.layers else BASE


def check_intervention(name: str) -> str:
    intervention(name)
    return name


def check_layers(layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(layers)
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        named = f"layer {bad[0]} is" if len(bad) == 1 else f"layers {', '.join(map(str, bad))} are"
        raise InterventionError(
            f"{named} out of range: the language backbone has {num_layers} decoder layers, numbered 0..{num_layers - 1}"
        )
    return layers


# --- tensor fills (shared by the hooks and by the reference weight edit) ---


def _readable(module: nn.Module):
    """The module with its real weights in place, also when accelerate offloads them."""
    from accelerate.utils import align_module_device

    return align_module_device(module)


def filled_projection_tensors(proj: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of one projection as the weight-level definition of intervention `name` fills them."""
    chosen = intervention(name)
    if not chosen.exportable:
        raise InterventionError(f"{name!r} has no weight-level definition")
    out_features = getattr(proj, "out_features", None) or proj.weight.shape[0]
    with _readable(proj):
        weight = torch.full_like(proj.weight, chosen.fill(proj.weight, out_features), device=_device_of(proj))
        bias = proj.bias
        if bias is not None:
            bias = torch.full_like(bias, chosen.fill(bias, out_features), device=_device_of(proj))
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


# --- the registry: one class per intervention ---


@register
class Zero(Intervention):
    """The attention output is 0 (K/V still written), which the zero-filled weights give exactly."""

    name, paper, summary = "zero", True, "q/k/v/o weights and biases set to 0: the attention sub-layer adds 0"

    def hooks(self, site):
        return [site.attention.register_forward_hook(_zero_output)]

    def fill(self, param, out_features):
        return 0.0


class ProjectionFill(Intervention):
    """Each projection computes with its filled tensors: `F.linear(x, W_filled, b_filled)`."""

    def hooks(self, site):
        return [
            proj.register_forward_hook(_linear_with(*filled_projection_tensors(proj, self.name)))
            for proj in site.projections
        ]


@register
class Uniform(ProjectionFill):
    name, paper, summary = (
        "uniform",
        True,
        "each q/k/v/o tensor filled with 1/out_features (the authors' uniform scaling)",
    )

    def fill(self, param, out_features):
        return 1.0 / out_features


@register
class Mean(ProjectionFill):
    name, paper, summary = "mean", True, "each q/k/v/o tensor filled with its own scalar mean (mean substitution)"

    def fill(self, param, out_features):
        return param.detach().double().mean().item()


@register
class Skip(Intervention):
    name, summary = "skip", "the whole decoder layer is the identity (K/V still written)"

    def hooks(self, site):
        return [site.layer.register_forward_hook(_identity_output, with_kwargs=True)]


@register
class MlpZero(Intervention):
    name, summary = "mlp_zero", "the layer's MLP adds 0 (attention untouched)"

    def hooks(self, site):
        mlp = getattr(site.layer, "mlp", None) or getattr(site.layer, "feed_forward", None)
        if mlp is None:
            raise InterventionError(f"layer {site.index} has no mlp/feed_forward module for mlp_zero")
        return [mlp.register_forward_hook(_zero_output)]


@contextlib.contextmanager
def knocked_out(model: nn.Module, knockout: Knockout | None) -> Iterator[None]:
    """Run the block with `knockout` applied to `model`; `None` or no layers means the full model."""
    if knockout is None or not knockout.layers:
        yield
        return
    sites = decoder_layers(model)
    check_layers(knockout.layers, len(sites))
    chosen = intervention(knockout.intervention)
    with contextlib.ExitStack() as stack:
        for layer in knockout.layers:
            stack.enter_context(_hooked(lambda site=sites[layer]: chosen.hooks(site)))
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
