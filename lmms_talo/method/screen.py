"""A gradient screen for the layer sweep (sweep=screen): one forward and one backward pass of the base
model per probe doc estimate every candidate layer's knockout effect at once, and only the layers
the screen favours (plus a few seeded random others) are then run exactly.

The estimate is first order (attribution patching): with h_l the output of decoder layer l and h'_l
its output under the intervention, computed from the same layer input,
    effect_l ~ sum((h'_l - h_l) * dS/dh_l)
for a differentiable per-doc score S. h'_l comes from re-running layer l under the intervention's
own hooks (lmms_talo.method.interventions), so every registered intervention is screened the way it runs,
and the difference includes the layer's MLP reacting to the changed attention output. Gradients are
taken with respect to activations only: a zero tensor added to every candidate layer's output is the
only thing differentiated (torch.autograd.grad), so no parameter gets a gradient and no weight is
written. Memory stays near plain evaluation's: the parameters are frozen for the pass (requires_grad
restored in `finally`), or autograd would keep every linear layer's input for a weight gradient
nobody asks for, the vision tower's whole graph included; and each decoder layer is checkpointed
(torch.utils.checkpoint: only its input is kept, its forward runs again in the backward), which
costs one more forward of the prompt. On the realistic VLM of benchmarks/ (576 image tokens) the
pass peaked at 1.74x plain evaluation's memory with neither (benchmarks/README.md).

S per doc (`ScreenItem`):
  loglikelihood    the gold option's log-likelihood margin over the best wrong option, each option
                   tokenised by the model class's own pair encoder (hf_causal_lm's encode_pair,
                   lm-eval HFLM's _encode_pair);
  generate_until   the teacher-forced log-likelihood of the task's target minus that of the base
                   model's own answer, both appended to the prompt exactly as the model class built
                   it (captured by a forward pre-hook on the first model call of the request, which
                   is then cut short: images, chat template and processor included).
A doc the base model answers with the target itself has S = 0 for generation: the screen sees no
signal there (the exact confirmation still scores it). An item's options share their prompt: they
are packed into one sequence after it wherever that is proved equal to scoring them one by one
(lmms_talo.method.option_logprobs), so the prompt, images included, is run and differentiated once.

The ranking (`predicted_scores`, `chosen_layers`): per layer, the probe score the estimates predict
(a doc right when S plus its estimated change is positive), then the summed estimate. Nothing here
decides: the sweep (lmms_talo.method.sweep) runs the chosen layers exactly and lets the selection rule
decide among them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from lmms_talo.method.backbone import decoder_layers, unwrap
from lmms_talo.method.interventions import intervention as get_intervention
from lmms_talo.method.option_logprobs import PackingCheck, gold_option, packed_logprobs, separate_logprobs


class ScreenError(RuntimeError):
    """The screen cannot build its score for these requests."""


# Model-call kwargs that belong to one incremental call, not to the prompt: dropped from a captured prompt.
_CALL_STATE = (
    "past_key_values",
    "cache",
    "use_cache",
    "cache_position",
    "position_ids",
    "logits_to_keep",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "rope_deltas",
)


@dataclass
class ScreenItem:
    """One doc's part of S: log p(option `gold`) minus the best of the other options' log p. An option
    is (prompt, continuation ids): the prompt's forward kwargs (input_ids of shape 1 x T, images etc.)."""

    options: list[tuple[dict, list[int]]]
    gold: int


# --- the per-doc score and its gradient ---


def _item_score(model: nn.Module, item: ScreenItem, packed: bool = False) -> torch.Tensor:
    logp = (packed_logprobs if packed else separate_logprobs)(model, item.options)
    rivals = [lp for i, lp in enumerate(logp) if i != item.gold]
    return logp[item.gold] - torch.stack(rivals).max()


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module):
    """Parameters that require grad stop requiring it for the block, and are restored after it."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextlib.contextmanager
def _checkpointed_layers(model: nn.Module):
    """Every decoder layer's forward runs under activation checkpointing for the block. The module's
    own hooks stay outside the checkpointed forward, so the recomputation in the backward does not
    fire them again."""
    layers = [site.layer for site in decoder_layers(model)]
    own = {
        id(layer): layer.__dict__["forward"] for layer in layers if "forward" in layer.__dict__
    }  # accelerate's offload hooks

    def checkpointed(forward):
        return lambda *args, **kwargs: torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    try:
        for layer in layers:
            layer.forward = checkpointed(layer.forward)
        yield
    finally:
        for layer in layers:
            if id(layer) in own:
                layer.forward = own[id(layer)]
            else:
                layer.__dict__.pop("forward", None)


@contextlib.contextmanager
def _perturbable(model: nn.Module, layers: Sequence[int], intervention: str):
    """Forward hooks on the candidate layers: each adds a zero tensor z (the one thing differentiated)
    to the layer's output and keeps h' - h, the layer's output under the intervention minus its own."""
    sites = decoder_layers(model)
    chosen = get_intervention(intervention)
    taken: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in layers}
    inside: list = []

    def hook_for(site):
        def hook(module, args, kwargs, output):
            if inside:  # the intervention's own re-run of this layer
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            inside.append(site.index)
            handles = []
            try:
                handles = chosen.hooks(site)
                with torch.no_grad():
                    alt = module(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
                inside.pop()
            alt = alt[0] if isinstance(alt, tuple) else alt
            z = torch.zeros_like(hidden, requires_grad=True)
            taken[site.index].append((z, (alt - hidden).detach()))
            moved = hidden + z
            return (moved,) + tuple(output[1:]) if isinstance(output, tuple) else moved

        return hook

    handles = [sites[layer].layer.register_forward_hook(hook_for(sites[layer]), with_kwargs=True) for layer in layers]
    try:
        yield taken
    finally:
        for handle in handles:
            handle.remove()


def doc_effects(
    model: nn.Module,
    items: Sequence[ScreenItem],
    layers: Sequence[int],
    intervention: str,
    packing: PackingCheck | None = None,
) -> tuple[float, dict[int, float]]:
    """(S of one doc, {layer: estimated change of S under the knockout}): one forward and one
    backward over the doc's items, gradients with respect to activations only; each item's options
    packed into one sequence where `packing` has proved that equal (lmms_talo.method.option_logprobs)."""
    model = unwrap(model)
    items = [item for item in items if len(item.options) > 1]
    if not items:
        return 0.0, {layer: 0.0 for layer in layers}
    packed = [packing is not None and packing.allows(model, item.options) for item in items]  # before the hooks go on
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        _frozen_parameters(model),
        _checkpointed_layers(model),
        _perturbable(model, layers, intervention) as taken,
    ):
        score = torch.stack([_item_score(model, item, pack) for item, pack in zip(items, packed)]).sum()
        pairs = [(layer, z, delta) for layer in layers for z, delta in taken[layer]]
        grads = torch.autograd.grad(score, [z for _, z, _ in pairs], allow_unused=True)
    effects = {layer: 0.0 for layer in layers}
    for (layer, _, delta), grad in zip(pairs, grads):
        if grad is not None:
            effects[layer] += float((delta.double() * grad.double()).sum())
    return float(score.detach()), effects


# --- S's inputs from the harness's requests ---


class _PromptTaken(BaseException):
    """Raised by the capture hook once the prompt's model call has been seen. A BaseException: the
    model classes' `except Exception` around generation (which logs "Error in generating") lets it
    pass, so cutting the call short logs nothing."""


def capture_prompt(model: nn.Module, run: Callable[[], Any]) -> dict:
    """The kwargs of the first model call `run()` makes (the prompt's prefill), the run cut short there."""
    model = unwrap(model)
    taken: dict = {}

    def hook(module, args, kwargs):
        if not taken:
            taken.update(kwargs)
            if args:
                taken["input_ids"] = args[0]
        raise _PromptTaken

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _PromptTaken:
        pass
    finally:
        handle.remove()
    if "input_ids" not in taken or not isinstance(taken["input_ids"], torch.Tensor):
        raise ScreenError(
            "sweep=screen: the model class's first model call carried no input_ids (inputs_embeds only?): "
            "screen it with sweep=full"
        )
    if taken["input_ids"].shape[0] != 1:
        raise ScreenError(
            f"sweep=screen: one request's prompt came as a batch of {taken['input_ids'].shape[0]} rows: "
            "screen it with sweep=full"
        )
    return {
        k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
        for k, v in taken.items()
        if k not in _CALL_STATE and v is not None
    }


def tokenizer_of(lm: Any):
    for path in ("tokenizer", "_tokenizer", "processor.tokenizer", "_processor.tokenizer", "tok"):
        obj = lm
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and callable(getattr(obj, "encode", None)):
            return obj
    raise ScreenError(f"sweep=screen: found no tokenizer on {type(lm).__name__} (tokenizer, processor.tokenizer)")


def pair_encoder(lm: Any) -> Callable[[str, str], tuple[list[int], list[int]]] | None:
    """(context ids, continuation ids) exactly as the model class tokenises a loglikelihood request;
    None when the class has no pair encoder (its captured call's labels then mark the continuation)."""
    if callable(getattr(lm, "encode_pair", None)) and callable(getattr(lm, "prompt", None)):
        return lambda context, continuation: lm.encode_pair(lm.prompt(context), continuation)
    if callable(getattr(lm, "_encode_pair", None)):  # lm-eval's HFLM
        return lambda context, continuation: tuple(lm._encode_pair(context, continuation))
    return None


def target_text(task: Any, doc: Any) -> Any:
    """A generation doc's target as a text (an option index names its option's text)."""
    target = task.doc_to_target(doc)
    target = target[0] if isinstance(target, list) and target else target
    choices = list(task.doc_to_choice(doc)) if getattr(getattr(task, "config", None), "doc_to_choice", None) else None
    return choices[target] if choices and isinstance(target, int) and 0 <= target < len(choices) else target


def _gold_index(task: Any, doc: Any, count: int) -> int:
    gold = gold_option(task, doc)
    if gold is None or gold >= count:
        raise ScreenError(
            f"sweep=screen: the task's target {task.doc_to_target(doc)!r} is not an option index "
            f"of the doc's {count} options"
        )
    return gold


def encoded_option(encode, request, device) -> tuple[dict, list[int]]:
    """A loglikelihood request as the model class's pair encoder tokenises it."""
    context, continuation = encode(request.args[0], request.args[1])
    return {"input_ids": torch.tensor([list(context)], device=device)}, list(continuation)


def labelled_option(prompt: dict) -> tuple[dict, list[int]]:
    """A loglikelihood request from its captured model call, whose `labels` mark the continuation
    (-100 over the context: lmms-eval's LLaVA and others)."""
    labels = prompt.pop("labels", None)
    if labels is None:
        raise ScreenError(
            "sweep=screen: the model class has no pair encoder (encode_pair, _encode_pair) and its loglikelihood "
            "call carries no labels marking the continuation: screen it with sweep=full"
        )
    scored = (labels[0] != -100).nonzero().flatten()
    if len(scored) == 0 or not torch.equal(scored, torch.arange(int(scored[0]), labels.shape[1], device=scored.device)):
        raise ScreenError("sweep=screen: the captured labels do not mark one continuation at the end of the input")
    start = int(scored[0])
    ids = prompt["input_ids"]
    prompt = dict(prompt, input_ids=ids[:, :start])
    if "attention_mask" in prompt:
        prompt["attention_mask"] = prompt["attention_mask"][:, :start]
    return prompt, ids[0, start:].tolist()


def generation_item(prompt: dict, tokenizer, gold: Any, answer: str) -> ScreenItem:
    if isinstance(gold, int):
        raise ScreenError(f"sweep=screen: a generation task's target is the option index {gold}, not a text")
    wanted = [tokenizer.encode(str(text), add_special_tokens=False) for text in (gold, answer)]
    wanted = [ids or [tokenizer.eos_token_id or 0] for ids in wanted]
    if wanted[0] == wanted[1]:
        return ScreenItem([(prompt, wanted[0])], 0)  # answered with the target: no signal
    return ScreenItem([(prompt, ids) for ids in wanted], 0)


# --- which layers run exactly ---


def predicted_scores(
    base: Mapping[Hashable, float],
    signal: Mapping[Hashable, float],
    estimates: Mapping[Hashable, Mapping[int, float]],
    layers: Sequence[int],
) -> dict[int, float]:
    """Per layer, the mean probe score that the first-order estimate predicts under its knockout, in
    the units of the rule's gains: a doc counts right when its S plus the layer's estimated change of S
    is positive (S > 0: the gold option leads, or the target outscores the answer given); a doc with
    no signal (S = 0 and no change: no scorable item, or a generation answered with the target
    itself) keeps its base score. The summed estimate alone ranks layers poorly for a pass/fail
    score: a large margin change on a doc that stays right (or wrong) counts as much as one that
    flips it, and only flips change the probe score (benchmarks/README.md measures both rankings)."""

    def right(doc, layer) -> float:
        s, e = signal[doc], estimates[doc][layer]
        return base[doc] if s == 0 and e == 0 else float(s + e > 0)

    return {layer: sum(right(d, layer) for d in base) / len(base) for layer in layers}


def chosen_layers(
    predicted: dict[int, float], totals: dict[int, float], top: int, others: int, seed: str
) -> tuple[list[int], list[int]]:
    """(the `top` layers with the highest predicted probe score, then summed estimate; `others`
    further layers drawn with `seed`); ties go to the lower layer."""
    ranked = sorted(totals, key=lambda layer: (-predicted[layer], -totals[layer], layer))
    best = sorted(ranked[:top])
    rest = sorted(ranked[top:])
    drawn = sorted(random.Random(seed).sample(rest, min(others, len(rest))))
    return best, drawn


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None below 3 points or with a constant side."""
    if len(x) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


@dataclass
class Screen:
    """What the sweep needs to screen a sub-task: the model, the items of a probe unit (from its
    base responses), how many layers run exactly, and whether its options may be packed."""

    model: nn.Module
    items: Callable[[Hashable, list], list[ScreenItem]]
    top: int = 3
    others: int = 2
    seed: int = 0
    packing: PackingCheck = field(default_factory=PackingCheck)

    def effects(
        self, unit: Hashable, responses: list, layers: Sequence[int], intervention: str
    ) -> tuple[float, dict[int, float]]:
        return doc_effects(self.model, self.items(unit, responses), layers, intervention, self.packing)


def task_screen(lm: Any, model: nn.Module, group: Any, run_one: Callable[[Any], Any], config: Any) -> Screen:
    """The screen of one sub-task (a TaloGroup): its probe units' items from the task's targets, the
    model class's own tokenisation, and (generation) each request's prompt as the class builds it;
    `run_one(request)` runs the base class on a fresh copy of one request."""
    model = unwrap(model)
    device = next(model.parameters()).device
    task = group.task
    likelihood = group.reqtype == "loglikelihood"
    encode = pair_encoder(lm) if likelihood else None
    tokenizer = None if likelihood else tokenizer_of(lm)

    def items(unit, responses) -> list[ScreenItem]:
        out = []
        for doc_id, answers in group.rows_of(unit, responses):
            requests = group.doc_requests[doc_id]
            doc = task.eval_docs[doc_id]
            if likelihood:
                options = [
                    encoded_option(encode, r, device)
                    if encode
                    else labelled_option(capture_prompt(model, lambda r=r: run_one(r)))
                    for r in requests
                ]
                out.append(ScreenItem(options, _gold_index(task, doc, len(options))))
                continue
            for request, answer in zip(requests, answers):
                prompt = capture_prompt(model, lambda r=request: run_one(r))
                out.append(generation_item(prompt, tokenizer, target_text(task, doc), answer))
        return out

    return Screen(model, items, config.screen_top, config.screen_random, config.seed)
