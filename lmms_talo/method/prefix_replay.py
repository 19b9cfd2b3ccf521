"""Prefix replay: a knockout of layer l cannot change the vision tower or decoder layers < l, so
their work is recorded once per model call in the baseline pass and replayed for variant l.

How it plugs in: `PrefixReplay(model).installed()` patches, for its duration only, three kinds of
bound methods on the Hugging Face model (restored in `finally`, exceptions included):
  - the text model's `forward` (the module that owns the decoder layer list): it looks for a record
    whose inputs equal this call's inputs exactly (every tensor compared with torch.equal: input
    embeddings, which already hold the image features, attention mask, position ids (Qwen2-VL's
    3D rope positions), Qwen3-VL's deepstack features, ...). A call on a non-empty KV cache (the
    continuations scored on a shared context's cache, a chunked prefill) must also find, in every
    cache entry the replayed layers write, exactly the K/V the recorded call found there. Decode
    steps (one new position) always compute in full: replaying one would save one position's work
    and cost a comparison of the whole cache;
  - each decoder layer's `forward`: in the base pass it records the layer's output and every K/V
    write it makes (`cache.update(...)` arguments); in variant l, layers < l return their recorded
    output and repeat their recorded K/V writes into the live cache (so decoding stays exact and the
    cache length seen by the mask and 3D rope code is right), layers >= l compute;
  - `get_image_features` / `get_video_features` of the multimodal model: the vision tower and
    projector run once per distinct input; interventions never touch them.
Between replayed layers the text model still runs its own code (Qwen3-VL adds its deepstack
features after early layers there), which is why records hold each layer's own output.

A call whose inputs match no record, or that replay cannot reproduce exactly (attention weights
requested, a legacy tuple cache, cache writes other than `update`, a positional call), is computed
in full: never a silently different answer. Each such case is logged once.

Replay does not trust the transformers release to keep this calling convention: it checks itself.
  - At record time: a decoder layer that was handed a KV cache (a `Cache` object under any argument
    name, positional or keyword) and wrote nothing through `update` of the cache argument replay
    knows (CACHE_KWARGS) writes its K/V some other way (a renamed cache argument, a direct write):
    replay could not repeat those writes, so it is turned off.
  - At run time: the sweep (lmms_talo.method.sweep) computes one knockout variant of the first replayed
    probe doc of each sweep (and of the first doc whose calls take another route: a context then
    continuations on its cache, a call that matched no record) both with replay and in full; any
    difference turns replay off.
Off means off for the rest of the run: the flag belongs to the model (`disabled_reason`), so the
PrefixReplay of every later sub-task of the same model starts disabled; a disabled replay patches
nothing, every pass is computed in full, the log says why once, and its stats carry
`status: "disabled (reason)"` (the report's `sweep_replay`).

Memory bound: records live until `forget()`, which the sweep calls after each doc. For one doc they
hold, per recorded model call of that doc (a generate_until request's prefill; each loglikelihood
forward, or a shared context and its continuation batch), for each layer below `replay_below`: the
layer output (batch x new positions x hidden) and its K/V (2 x batch x kv_heads x new positions x
head_dim); for a call on a non-empty cache, a copy of that cache as the call found it; and the
vision features of the doc's images.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from lmms_talo.logs import log
from lmms_talo.method.backbone import decoder_layers, unwrap
from lmms_talo.method.interventions import Knockout

VISION_METHODS = ("get_image_features", "get_video_features")
# Cache methods that change state beyond K/V writes (linear-attention and indexer caches): replay
# does not reproduce them, so a record that saw one is dropped.
UNREPLAYABLE_CACHE_WRITES = ("update_conv_state", "update_recurrent_state", "update_indexer")
RECORD = "record"
# model -> why prefix replay was turned off for it: every later PrefixReplay of that model is inert.
_DISABLED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


# Rotary embeddings whose state changes with the inputs they saw: a record of one call may not hold
# for the next (transformers' dynamic_rope_update grows or resets inv_freq by sequence length).
STATEFUL_ROPE_TYPES = ("dynamic", "longrope")


def stateful_module(model: nn.Module) -> str | None:
    """Why replay cannot trust records on this model: a module that keeps state between calls."""
    for name, module in model.named_modules():
        rope_type = getattr(module, "rope_type", None)
        kinds = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}  # per layer type, or one
        if kinds & set(STATEFUL_ROPE_TYPES):
            return (
                f"{name or type(module).__name__} keeps state between calls (rope_type={rope_type}): "
                f"a recorded layer output may not hold for the next call"
            )
    return None


def disabled_reason(model: nn.Module) -> str | None:
    """Why prefix replay is off for this model (None while it is on)."""
    return _DISABLED.get(unwrap(model))


def fresh(value: Any) -> Any:
    """A copy whose tensors nobody else holds: records are never aliased by the model's own buffers."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, ModelOutput):
        return type(value)(**{k: fresh(v) for k, v in value.items()})
    if isinstance(value, dict):
        items = {k: fresh(v) for k, v in value.items()}
        return items if type(value) is dict else type(value)(items)
    if isinstance(value, (list, tuple)):
        items = [fresh(v) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    return value


def same(a: Any, b: Any) -> bool:
    """Exact equality of model inputs: tensors bit for bit (dtype, shape and device included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # objects whose == is not a plain truth value: not provably equal
        return False


@dataclass
class LayerRecord:
    output: Any
    cache_writes: list  # [(args, kwargs)] of each cache.update call the layer made


@dataclass
class CallRecord:
    key: dict
    layers: list  # LayerRecord per layer below replay_below (None until recorded)
    cache_before: list | None = None  # a non-empty cache's (keys, values) per entry, as the call found it
    replayable: bool = True

    def complete(self) -> bool:
        return self.replayable and all(layer is not None for layer in self.layers)


@dataclass
class ReplayStats:
    """Work done and saved while installed; decode steps count as computed layer calls."""

    layers_computed: int = 0  # decoder-layer forwards of the patched layers that ran
    layers_replayed: int = 0  # decoder-layer forwards answered from a record
    calls_recorded: int = 0
    calls_replayed: int = 0
    calls_replayed_on_cache: int = 0  # of those, calls on a filled KV cache (continuations, chunked prefill)
    calls_unmatched: int = 0  # variant calls with no matching record: computed in full
    vision_computed: int = 0
    vision_replayed: int = 0
    checks: int = 0  # replayed variants compared with a full pass (identical, or replay is off)
    status: str = "on"  # or "disabled (reason)"


@dataclass
class _Recording:
    record: CallRecord


@dataclass
class _Replaying:
    record: CallRecord
    start: int


@dataclass
class _VisionRecord:
    key: tuple
    output: Any


# The KV cache argument of the text model and decoder layers: transformers 5.24 renamed
# `past_key_values` to `cache` (the old name still reaches the top-level model, which passes it on
# under the new one). Missing it would replay layers without their K/V writes.
CACHE_KWARGS = ("past_key_values", "cache")


def _cache_of(kwargs: dict) -> Any:
    return next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _cache_given(args: tuple, kwargs: dict) -> str | None:
    """Where a call got a KV cache, under any name ("argument `x`", "positional argument 2"), or None."""
    named = next((f"argument `{name}`" for name, value in kwargs.items() if _is_cache(value)), None)
    return named or next((f"positional argument {i}" for i, value in enumerate(args) if _is_cache(value)), None)


def _owner_of(root: nn.Module, child: nn.Module) -> nn.Module | None:
    for module in root.modules():
        if any(c is child for c in module.children()):
            return module
    return None


def _new_positions(kwargs: dict) -> int:
    """Positions per row this call adds to the sequence."""
    tokens = kwargs.get("inputs_embeds")
    tokens = tokens if tokens is not None else kwargs.get("input_ids")
    return tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else 0


def _cache_contents(cache: Any) -> list | None:
    """(keys, values) of every cache entry ((None, None) while unwritten); None if an entry keeps
    its state another way (quantized, linear attention)."""
    contents = []
    for layer in getattr(cache, "layers", None) or []:
        if not getattr(layer, "is_initialized", False):
            contents.append((None, None))
            continue
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
            return None
        contents.append((keys, values))
    return contents or None


def _written_entries(record: CallRecord, below: int) -> set | None:
    """The cache entries that decoder layers < `below` wrote in the recorded call."""
    entries = set()
    for layer in record.layers[:below]:
        for args, kwargs in layer.cache_writes:
            entry = args[2] if len(args) > 2 else kwargs.get("layer_idx")
            if not isinstance(entry, int):
                return None
            entries.add(entry)
    return entries


def _cache_matches(record: CallRecord, before: list | None, start: int) -> bool:
    """A call on a non-empty cache may replay layers < start only if the cache entries they write
    (the ones they attend over) hold what they held when the call was recorded; the entries of
    later layers differ under a knockout, and do not matter."""
    if record.cache_before is None or before is None:
        return record.cache_before is None and before is None
    entries = _written_entries(record, start)
    if entries is None or len(record.cache_before) != len(before) or any(e >= len(before) for e in entries):
        return False
    return all(same(record.cache_before[e], before[e]) for e in entries)


@contextlib.contextmanager
def _patched(obj: Any, name: str, replacement: Callable) -> Iterator[None]:
    """Shadow a bound method with an instance attribute; restore exactly what was there."""
    had_own = name in obj.__dict__
    previous = obj.__dict__.get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _capturing_writes(cache: Any, record: CallRecord) -> Iterator[list]:
    """Record the arguments of every cache.update call made inside the block."""
    writes: list = []
    if cache is None:
        yield writes
        return
    original = cache.update

    def update(*args, **kwargs):
        writes.append((fresh(args), fresh(kwargs)))
        return original(*args, **kwargs)

    def refusing(name):
        method = getattr(cache, name)

        def call(*args, **kwargs):
            record.replayable = False
            return method(*args, **kwargs)

        return call

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(cache, "update", update))
        for name in UNREPLAYABLE_CACHE_WRITES:
            if callable(getattr(cache, name, None)):
                stack.enter_context(_patched(cache, name, refusing(name)))
        yield writes


class PrefixReplay:
    """Record the base pass's model calls; replay their unchanged prefix of layers in knockout variants.

    Use: `with replay.installed():` around the sweep; `with replay.variant(knockout):` around each
    pass (None = the base pass, which records); `replay.forget()` when a doc is done.
    """

    def __init__(self, model: nn.Module, replay_below: int | None = None):
        self.model = unwrap(model)
        sites = decoder_layers(self.model)
        self.layers = [site.layer for site in sites]
        self.replay_below = len(sites) if replay_below is None else max(0, min(replay_below, len(sites)))
        layer_list = _owner_of(self.model, self.layers[0])
        self.text_model = _owner_of(self.model, layer_list) if layer_list is not None else None
        self.vision_owner = self._find_vision_owner()
        reason = _DISABLED.get(self.model)
        self.stats = ReplayStats(status="on" if reason is None else f"disabled ({reason})")
        self.records: list[CallRecord] = []
        self.vision_records: list[_VisionRecord] = []
        self._phase: str | int | None = None  # None: pass through; RECORD; int: replay layers below it
        self._active: _Recording | _Replaying | None = None
        self._in_vision = False
        self._warned: set[str] = set()
        stateful = stateful_module(self.model)
        if stateful is not None:
            self.disable(stateful)

    def _find_vision_owner(self) -> nn.Module | None:
        """The multimodal model whose forward calls self.get_image_features and then its text model."""
        if self.text_model is None:
            return None
        owner = _owner_of(self.model, self.text_model)
        if owner is not None and any(callable(getattr(owner, name, None)) for name in VISION_METHODS):
            return owner
        return None

    # --- lifecycle ---

    @property
    def enabled(self) -> bool:
        return self.model not in _DISABLED

    def disable(self, reason: str) -> None:
        """Turn replay off for this model for the rest of the run (this and every later PrefixReplay)."""
        if self.enabled:
            _DISABLED[self.model] = reason
            log.warning(
                "lmms-talo prefix replay is off for the rest of the run: %s; every pass is computed in full", reason
            )
        self.stats.status = f"disabled ({_DISABLED[self.model]})"
        self.forget()

    @contextlib.contextmanager
    def installed(self) -> Iterator[PrefixReplay]:
        """Patch the model for the block; on exit every patch is undone and every record freed."""
        if not self.enabled:
            yield self
            return
        if self.text_model is None:
            self._note("the text model that owns the decoder layers was not found: prefix replay is off")
            yield self
            return
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(_patched(self.text_model, "forward", self._wrap_text(self.text_model.forward)))
                for index, layer in enumerate(self.layers[: self.replay_below]):
                    stack.enter_context(_patched(layer, "forward", self._wrap_layer(index, layer.forward)))
                if self.vision_owner is not None:
                    for name in VISION_METHODS:
                        method = getattr(self.vision_owner, name, None)
                        if callable(method):
                            stack.enter_context(_patched(self.vision_owner, name, self._wrap_vision(name, method)))
                yield self
            finally:
                self.forget()
                self._phase = None
                self._active = None

    @contextlib.contextmanager
    def variant(self, knockout: Knockout | None) -> Iterator[None]:
        """The pass of one variant: the base pass records, a knockout replays layers below its lowest
        layer; once replay is disabled, every pass is computed in full."""
        if not self.enabled:
            self._phase = None
        elif knockout is None or not knockout.layers:
            self._phase = RECORD
        else:
            self._phase = min(min(knockout.layers), self.replay_below)
        try:
            yield
        finally:
            self._phase = None

    def saves_work(self, knockouts) -> bool:
        """Whether replaying these knockouts skips more layer forwards than recording costs (one
        extra base pass, when the base result is already known)."""
        skipped = sum(min(min(k.layers), self.replay_below) for k in knockouts if k.layers)
        return skipped > len(self.layers)

    def forget(self) -> None:
        self.records.clear()
        self.vision_records.clear()

    @contextlib.contextmanager
    def logits_trace(self) -> Iterator[list[str]]:
        """The SHA-256 of every model call's logits during the block, in call order: what the run-time
        check compares beside the answers (a generated string or a score can hide a changed logit)."""
        digests: list[str] = []

        def hook(module, args, output):
            logits = getattr(output, "logits", None)
            if isinstance(logits, torch.Tensor):
                data = logits.detach().float().cpu().contiguous().numpy().tobytes()
                digests.append(hashlib.sha256(data).hexdigest())

        handle = self.model.register_forward_hook(hook)
        try:
            yield digests
        finally:
            handle.remove()

    def _note(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("lmms-talo prefix replay: %s; those passes are computed in full", reason)

    # --- the patched methods ---

    def _unreplayable(self, args: tuple, kwargs: dict) -> str | None:
        if args:
            return "the text model was called with positional arguments"
        config = getattr(self.text_model, "config", None)
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            return "attention weights were requested (replayed layers compute none)"
        cache = _cache_of(kwargs)
        if cache is not None and not _is_cache(cache):
            return f"the KV cache is a {type(cache).__name__}, not a transformers Cache"
        return None

    def _wrap_text(self, original: Callable) -> Callable:
        @functools.wraps(original)  # transformers inspects signatures (generate pre-encodes images)
        def forward(*args, **kwargs):
            phase = self._phase
            if phase is None or self._active is not None or not self.enabled:
                return original(*args, **kwargs)
            reason = self._unreplayable(args, kwargs)
            if reason:
                self._note(reason)
                return original(*args, **kwargs)
            cache = _cache_of(kwargs)
            before = None
            if cache is not None and cache.get_seq_length() > 0:
                if _new_positions(kwargs) < 2:
                    return original(**kwargs)  # a decode step: computed in full
                before = _cache_contents(cache)
                if before is None:
                    self._note(f"the entries of a {type(cache).__name__} cannot be compared")
                    return original(**kwargs)
            key = {name: value for name, value in kwargs.items() if name not in CACHE_KWARGS}
            key["__cache__"] = type(cache)
            if phase == RECORD:
                return self._record(original, key, before, kwargs)
            if phase == 0:
                return original(**kwargs)
            record = next((r for r in self.records if same(r.key, key) and _cache_matches(r, before, phase)), None)
            if record is None:
                self.stats.calls_unmatched += 1
                log.debug("lmms-talo prefix replay: no recorded call matches this one; computing it in full")
                return original(**kwargs)
            self._active = _Replaying(record, phase)
            try:
                output = original(**kwargs)
            finally:
                self._active = None
            self.stats.calls_replayed += 1
            self.stats.calls_replayed_on_cache += before is not None
            return output

        return forward

    def _record(self, original: Callable, key: dict, before: list | None, kwargs: dict) -> Any:
        record = CallRecord(fresh(key), [None] * self.replay_below, fresh(before))
        self._active = _Recording(record)
        try:
            output = original(**kwargs)
        finally:
            self._active = None
        if not self.enabled:
            return output  # disable() has said why
        if record.complete():
            self.records.append(record)
            self.stats.calls_recorded += 1
        elif not record.replayable:
            self._note("the KV cache was changed by a method other than update (linear attention / indexer caches)")
        else:
            self._note("a decoder layer was not called during the call")
        return output

    def _wrap_layer(self, index: int, original: Callable) -> Callable:
        @functools.wraps(original)
        def forward(*args, **kwargs):
            active = self._active
            if isinstance(active, _Replaying) and index < active.start:
                layer = active.record.layers[index]
                cache = _cache_of(kwargs)
                for write_args, write_kwargs in layer.cache_writes:
                    cache.update(*fresh(write_args), **fresh(write_kwargs))
                self.stats.layers_replayed += 1
                return fresh(layer.output)
            self.stats.layers_computed += 1
            if isinstance(active, _Recording):
                with _capturing_writes(_cache_of(kwargs), active.record) as writes:
                    output = original(*args, **kwargs)
                given = _cache_given(args, kwargs)
                if given and not writes:
                    self.disable(
                        f"decoder layer {index} was given a KV cache ({given}) but wrote nothing through "
                        f"`update` of a cache argument replay knows ({', '.join(CACHE_KWARGS)}): it writes "
                        f"its K/V some other way, which replay cannot repeat"
                    )
                active.record.layers[index] = LayerRecord(fresh(output), writes)
                return output
            return original(*args, **kwargs)

        return forward

    def _wrap_vision(self, name: str, original: Callable) -> Callable:
        @functools.wraps(original)
        def method(*args, **kwargs):
            if self._phase is None or self._in_vision:
                return original(*args, **kwargs)
            key = (name, args, kwargs)
            hit = next((r for r in self.vision_records if same(r.key, key)), None)
            if hit is not None:
                self.stats.vision_replayed += 1
                return fresh(hit.output)
            self._in_vision = True  # Qwen3-VL's get_video_features calls get_image_features
            try:
                output = original(*args, **kwargs)
            finally:
                self._in_vision = False
            self.stats.vision_computed += 1
            self.vision_records.append(_VisionRecord(fresh(key), fresh(output)))
            return output

        return method
