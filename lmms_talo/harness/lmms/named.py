"""TaLo model classes: the mixin over lmms-eval's own classes, built on first use.

`simple__llava_hf` is TaloMixin over lmms-eval's simple LlavaHf, `chat__qwen2_5_vl` over the chat
Qwen2_5_VL, and so on for any registered lmms-eval model. Building them lazily keeps one broken
optional model import from breaking the others, and the classes stay picklable by name.
"""

from __future__ import annotations

import importlib

from lmms_eval.api.model import lmms

from lmms_talo.harness.lmms.fixes import BASE_FIXES
from lmms_talo.harness.lmms.lmms_eval_harness import LMMS_EVAL
from lmms_talo.harness.mixin import TaloMixin

_CLASSES: dict[str, type] = {}


def talo_class(base_cls: type, attribute: str, base_name: str = "") -> type:
    """TaloMixin (and any repair of the base, see fixes.py) over `base_cls`, registered in this
    module under `attribute`."""
    if attribute not in _CLASSES:
        fixes = (BASE_FIXES[base_name],) if base_name in BASE_FIXES else ()
        cls = type(
            f"Talo{base_cls.__name__}",
            (TaloMixin, *fixes, base_cls),
            {"__module__": __name__, "talo_harness": LMMS_EVAL},
        )
        cls.__qualname__ = attribute
        _CLASSES[attribute] = cls
    return _CLASSES[attribute]


def _base_class(model_name: str, kind: str) -> type:
    from lmms_eval.models import MODEL_REGISTRY_V2

    manifest = MODEL_REGISTRY_V2.get_manifest(model_name)
    path = manifest.simple_class_path if kind == "simple" else manifest.chat_class_path
    if path is None:
        raise AttributeError(f"lmms-eval model {model_name!r} has no {kind} class")
    module_name, class_name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


def __getattr__(name: str) -> type:
    kind, sep, base = name.partition("__")
    if not sep or kind not in ("simple", "chat"):
        raise AttributeError(name)
    return talo_class(_base_class(base, kind), name, base)


def _build_any(base: str | None, prefer: str, kwargs: dict):
    if not base:
        raise TypeError("model `talo` needs base=<registered lmms-eval model>, e.g. base=llava_hf")
    from lmms_eval.models import MODEL_REGISTRY_V2

    manifest = MODEL_REGISTRY_V2.get_manifest(base)
    kind = prefer if getattr(manifest, f"{prefer}_class_path") else ("chat" if prefer == "simple" else "simple")
    cls = talo_class(_base_class(base, kind), f"{kind}__{base}", base)
    return cls(**kwargs)


class TaloAny(lmms):
    """`--model talo --model_args base=<name>,...`: TaLo over any registered lmms-eval model (chat first)."""

    is_simple = False

    def __new__(cls, base: str | None = None, **kwargs):
        return _build_any(base, "chat", kwargs)


class TaloAnySimple(lmms):
    """The simple-slot twin of TaloAny, picked by --force_simple."""

    is_simple = True

    def __new__(cls, base: str | None = None, **kwargs):
        return _build_any(base, "simple", kwargs)
