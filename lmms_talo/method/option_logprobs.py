"""Teacher-forced log-likelihoods of a doc's options after their prompt: the terms of the screen's
differentiable score S (lmms_talo.method.screen), forward and backward.

Two ways to compute them:
  separate  one batch when the options share one text-only prompt, one forward per option otherwise:
            every option pays for the whole prompt (and its backward);
  packed    the prompt once, followed by every option, in one sequence: a 4D attention mask lets each
            option's tokens see the prompt and their own earlier tokens only, and position ids restart
            after the prompt for each option, so every option is computed as if it stood alone. A doc
            with n options and a prompt of P tokens costs about P + n*C tokens instead of n*(P + C),
            images included (they belong to the prompt).
Packing relies on the model honouring a custom 4D mask and explicit position ids (transformers'
SDPA and eager attention do; flash attention and multimodal rotary positions may not).
`PackingCheck` therefore proves packing equal to the separate way on the first packable item of a
sub-task, at run time, and steps aside for the sub-task when it is not (or when the packed forward
fails), saying why.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Option = tuple[dict, list[int]]  # (the prompt's forward kwargs, input_ids of shape 1 x T; continuation ids)

logger = logging.getLogger("lmms_talo")


def gold_option(task: Any, doc: dict) -> int | None:
    """The gold option's index in a multiple-choice doc, as the task's process_results reads
    doc_to_target (an index, or the option's text; of a list, the first); None when it names none or
    the task has no options."""
    if not getattr(getattr(task, "config", None), "doc_to_choice", None):
        return None
    choices = list(task.doc_to_choice(doc))
    target = task.doc_to_target(doc)
    target = target[0] if isinstance(target, list) and target else target
    target = choices.index(target) if isinstance(target, str) and target in choices else target
    return target if isinstance(target, int) and 0 <= target < len(choices) else None


def _text_only(prompt: dict) -> bool:
    return set(prompt) <= {"input_ids", "attention_mask"}


def _same_prompt(a: dict, b: dict) -> bool:
    if a is b:
        return True
    if set(a) != set(b):
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _attention_window(model: nn.Module) -> int | None:
    """The text backbone's sliding attention window, if it has one: a custom mask replaces it."""
    config = getattr(model.config, "text_config", None) or model.config
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def plain_positions(model: nn.Module) -> bool:
    """Whether the text backbone's positions are the plain 1D position ids the packed form restarts
    per option. Multimodal rotary positions (Qwen-VL's get_rope_index, an `mrope_section`) are
    computed from the image grid instead: such a model never packs."""
    config = getattr(model.config, "text_config", None) or model.config
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    inner = getattr(model, "model", None)
    return not (
        any(hasattr(m, "get_rope_index") for m in (model, inner) if m is not None)
        or (isinstance(rope, dict) and "mrope_section" in rope)
    )


def packable(model: nn.Module, options: list[Option]) -> bool:
    """Several options after one prompt with no padding in it (a padded prompt keeps the separate
    way), the packed sequence within any sliding attention window (which the packed mask omits),
    on a model whose positions are plain 1D ids."""
    prompt = options[0][0]
    mask = prompt.get("attention_mask")
    window = _attention_window(model)
    length = prompt["input_ids"].shape[1] + sum(len(c) for _, c in options)
    return (
        len(options) > 1
        and all(_same_prompt(prompt, p) for p, _ in options[1:])
        and (mask is None or bool(mask.all()))
        and (window is None or length <= window)
        and plain_positions(model)
    )


def item_kind(options: list[Option]) -> str:
    """What a packing proof covers: items with or without images (any input beside the token ids),
    with single-token or multi-token options."""
    media = "text only" if _text_only(options[0][0]) else "with images"
    tokens = "single-token options" if all(len(c) == 1 for _, c in options) else "multi-token options"
    return f"{media}, {tokens}"


def _prompt_extras(prompt: dict, appended: int) -> dict:
    """The prompt's other forward kwargs (images, grids), per-token type ids (Qwen-VL's
    mm_token_type_ids) extended over `appended` continuation tokens as text (type 0)."""
    extra = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask")}
    for key, value in extra.items():
        if key.endswith("token_type_ids") and isinstance(value, torch.Tensor):
            extra[key] = torch.cat([value, value.new_zeros(value.shape[0], appended)], dim=1)
    return extra


def _keep_logits(model: nn.Module, count: int) -> dict:
    """Only the last `count` positions' logits, where the model class supports it."""
    return {"logits_to_keep": count} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _gather(logits: torch.Tensor, rows: torch.Tensor, targets: list[int]) -> torch.Tensor:
    logp = F.log_softmax(logits[rows].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logp[torch.arange(len(targets), device=logp.device), torch.tensor(targets, device=logp.device)].sum()


def separate_logprobs(model: nn.Module, options: list[Option]) -> list[torch.Tensor]:
    """Sum log p of each option's continuation: one batch when the options share one text-only prompt,
    one forward per option otherwise."""
    first = options[0][0]
    shared = _text_only(first) and all(_same_prompt(first, p) for p, _ in options[1:])
    groups = [options] if shared else [[option] for option in options]
    out = []
    for group in groups:
        prompt = group[0][0]
        ids = prompt["input_ids"]
        mask = prompt.get("attention_mask", torch.ones_like(ids))
        group = [c for _, c in group]
        longest = max(len(c) for c in group)
        extra = _prompt_extras(prompt, longest)
        rows = torch.stack(
            [
                torch.cat([ids[0], torch.tensor(c + [0] * (longest - len(c)), dtype=ids.dtype, device=ids.device)])
                for c in group
            ]
        )
        masks = torch.stack(
            [
                torch.cat(
                    [
                        mask[0],
                        torch.tensor([1] * len(c) + [0] * (longest - len(c)), dtype=mask.dtype, device=mask.device),
                    ]
                )
                for c in group
            ]
        )
        logits = model(
            input_ids=rows, attention_mask=masks, use_cache=False, **extra, **_keep_logits(model, longest + 1)
        ).logits
        logits = logits[:, -longest - 1 : -1]
        out.extend(_gather(logits[row], torch.arange(len(c), device=logits.device), c) for row, c in enumerate(group))
    return out


def packed_logprobs(model: nn.Module, options: list[Option]) -> list[torch.Tensor]:
    """The same sums from one forward over [prompt, option 1, option 2, ...] (see the module doc)."""
    prompt = options[0][0]
    ids = prompt["input_ids"]
    device, length = ids.device, ids.shape[1]
    continuations = [c for _, c in options]
    packed = torch.cat([ids[0]] + [torch.tensor(c, dtype=ids.dtype, device=device) for c in continuations])[None]
    segment = torch.cat(
        [torch.zeros(length, dtype=torch.long, device=device)]
        + [torch.full((len(c),), j + 1, dtype=torch.long, device=device) for j, c in enumerate(continuations)]
    )
    positions = torch.cat(
        [torch.arange(length, device=device)]
        + [torch.arange(length, length + len(c), device=device) for c in continuations]
    )[None]
    index = torch.arange(packed.shape[1], device=device)
    allowed = (index[None, :] <= index[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[
        None, None
    ]
    extra = _prompt_extras(prompt, packed.shape[1] - length)
    kept = packed.shape[1] - length + 1  # from the prompt's last position on
    logits = model(
        input_ids=packed,
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        **extra,
        **_keep_logits(model, kept),
    ).logits[0, -kept:]
    out, start = [], length  # row r of `logits` is packed position length - 1 + r
    for c in continuations:
        predictors = torch.tensor([length - 1] + list(range(start, start + len(c) - 1)), device=logits.device) - (
            length - 1
        )
        out.append(_gather(logits, predictors, c))
        start += len(c)
    return out


def _tolerance(dtype: torch.dtype) -> float:
    """Relative agreement asked of the two ways: float noise of different attention kernels only."""
    return 1e-3 if torch.finfo(dtype).bits >= 32 else 5e-2


class PackingCheck:
    """Whether one sub-task's screen may pack its options: decided per kind of item (item_kind), on
    the first packable item of that kind, by computing it both ways (no gradients) and comparing."""

    NOT_CHECKED = (
        "not checked: no estimate was computed here for options after one shared prompt "
        "(read from the store, or none shared one)"
    )

    def __init__(self):
        self.verdicts: dict[str, bool] = {}  # item kind -> packed or not
        self.reasons: dict[str, str] = {}  # item kind -> the proof's outcome

    def allows(self, model: nn.Module, options: list[Option]) -> bool:
        if not packable(model, options):
            return False
        kind = item_kind(options)
        if kind not in self.verdicts:
            self.verdicts[kind], self.reasons[kind] = self._prove(model, options)
            if not self.verdicts[kind]:
                logger.warning("sweep=screen: %s are scored option by option here: %s", kind, self.reasons[kind])
        return self.verdicts[kind]

    def to_report(self) -> dict:
        """`packed_options` (item kind -> packed) and `packing_check` (item kind -> why) of a screen entry."""
        return {"packed_options": dict(self.verdicts), "packing_check": dict(self.reasons) or self.NOT_CHECKED}

    @staticmethod
    def _prove(model: nn.Module, options: list[Option]) -> tuple[bool, str]:
        with torch.no_grad():
            reference = [float(v) for v in separate_logprobs(model, options)]
            try:
                packed = [float(v) for v in packed_logprobs(model, options)]
            except Exception as error:  # a model that cannot take the packed form: the separate way stands
                return False, f"the packed forward failed ({type(error).__name__}: {error})"
        tolerance = _tolerance(next(model.parameters()).dtype)
        worst = max(abs(p - r) / max(1.0, abs(r)) for p, r in zip(packed, reference))
        if worst > tolerance:
            return (
                False,
                f"packed option log-likelihoods differ from separate ones by {worst:.2g} "
                f"(relative; allowed {tolerance:g})",
            )
        return True, f"packed option log-likelihoods equal separate ones within {worst:.1g} (relative)"


def option_logprobs(model: nn.Module, options: list[Option], check: PackingCheck | None = None) -> list[torch.Tensor]:
    """Sum log p of each option's continuation, packed where `check` allows it."""
    if check is not None and check.allows(model, options):
        return packed_logprobs(model, options)
    return separate_logprobs(model, options)
