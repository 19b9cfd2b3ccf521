"""`hf_causal_lm`: a simple-slot lmms-eval model for plain (text-only) causal language models.

lmms-eval 0.7.3 has no such class: its `huggingface` model is chat-only (so `multiple_choice`
tasks, which need a simple class, cannot run on it), has no `loglikelihood`, always loads
bfloat16, and loads plain LMs without their LM head. This class answers both request paths:

* `loglikelihood`: the continuation is tokenised the way lm-eval's HFLM does it (trailing
  whitespace of the context moves into the continuation; the whole string is encoded and split),
  the context runs once and all continuations of that context run as one batch on its K/V cache;
  with batch_size > 1, batch_size contexts run right-padded in one pass and all their
  continuations in one more (one context alone runs unpadded, as with batch_size=1).
  It returns `(-sum log p(continuation | context), is_greedy)`: lmms-eval's `multiple_choice`
  picks the option with the *smallest* value (its models return losses), so the negated sum
  makes lmms-eval's `acc` and `acc_norm` pick exactly the option lm-eval's `acc` / `acc_norm` pick.
* `generate_until`: greedy batched generation (left padding), cut at the `until` strings.

With `chat_template=true` (the default when the tokenizer has one) every context becomes the user
turn of the tokenizer's chat template, as lm-eval's `--apply_chat_template` does.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lmms_eval.api.model import lmms
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from lmms_talo.method.config import parse_bool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 256


class ModelArgumentError(ValueError):
    """A model arg of hf_causal_lm has a bad value."""


def _as_bool(value) -> bool:
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise ModelArgumentError(str(exc)) from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (bfloat16 matmuls are slow there), bfloat16 on accelerators."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelArgumentError(f"dtype={dtype!r} is not supported: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


# Padding is computed like real tokens: a batch of contexts may hold at most this many padded
# positions per real one, past which a shorter context waits for a batch of its own length.
PADDING_SLACK = 0.25


def length_buckets(contexts: list, batch_size: int) -> list[list]:
    """Contexts sorted by length, cut into batches of at most batch_size whose padding stays within
    PADDING_SLACK of their real tokens (on a CPU the padded positions cost as much as real ones)."""
    batches: list[list] = []
    for context in contexts:
        batch = batches[-1] if batches else None
        if batch is not None and len(batch) < batch_size:
            real = sum(len(c) for c in batch) + len(context)
            if len(context) * (len(batch) + 1) <= (1 + PADDING_SLACK) * real:
                batch.append(context)
                continue
        batches.append([context])
    return batches


class _StopStrings(StoppingCriteria):
    """Done rows: those whose generated text contains a stop string. transformers' own `stop_strings`
    preprocesses the whole vocabulary on every generate() call (seconds for a 49k vocabulary);
    decoding the few new tokens of each row is cheap."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


class CausalLM(lmms):
    """Any `AutoModelForCausalLM` checkpoint as an lmms-eval simple model (visuals are ignored)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        device_map: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        chat_template: bool | str | None = None,
        system_prompt: str | None = None,
        trust_remote_code: bool | str = False,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ModelArgumentError(
                f"hf_causal_lm got unknown model args {sorted(kwargs)}; it takes pretrained, device, device_map, "
                f"dtype, batch_size, chat_template, system_prompt, trust_remote_code"
            )
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ModelArgumentError(f"batch_size must be a positive integer, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ModelArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        trust = _as_bool(trust_remote_code)
        load = {"dtype": resolve_dtype(str(dtype), self._device), "trust_remote_code": trust}
        if device_map:
            load["device_map"] = device_map
        self._model = AutoModelForCausalLM.from_pretrained(pretrained, **load).eval()
        if not device_map:
            self._model.to(self._device)
        self._tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust)
        has_template = bool(getattr(self._tokenizer, "chat_template", None))
        self.use_chat_template = has_template if chat_template in (None, "", "auto") else _as_bool(chat_template)
        if self.use_chat_template and not has_template:
            raise ModelArgumentError(f"chat_template=true, but the tokenizer of {pretrained} has no chat template")
        self.system_prompt = system_prompt.replace("\\n", "\n") if system_prompt else None
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token

    # --- what lmms-eval and the TaLo mixin read ---

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # --- prompts and tokens ---

    def prompt(self, context: str) -> str:
        """The text the model sees: the context itself, or the context as the chat template's user turn."""
        if not self.use_chat_template:
            return context
        messages = [{"role": "user", "content": context}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        """The tokenizer's own special-token rule, except that a text already starting with BOS gets no second one."""
        bos = self._tokenizer.bos_token
        if bos and text.startswith(bos):
            return self._tokenizer.encode(text, add_special_tokens=False)
        return self._tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing whitespace joins the continuation; encode the whole, cut at the context."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            raise ModelArgumentError("loglikelihood needs a non-empty context (after its trailing whitespace)")
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return context_ids, whole[len(context_ids) :]

    # --- loglikelihood ---

    @torch.no_grad()
    def _score_continuations(self, context_ids: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum log p, is_greedy) of each continuation after one shared context pass."""
        model, device = self._model, self.device
        out = model(torch.tensor([context_ids], device=device), use_cache=True, logits_to_keep=1)
        first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
        longest = max(len(c) for c in continuations)
        rest = None
        if longest > 1:
            # transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (argument and output).
            # Not out.get("cache", out.past_key_values): that reads the default eagerly, and on 5.24
            # `past_key_values` is a deprecated alias that logs a warning (an output may also lack it).
            cache = out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401 (lazy fallback)
            cache.batch_repeat_interleave(len(continuations))
            pad = self._tokenizer.pad_token_id
            rows = [c[:-1] + [pad] * (longest - len(c)) for c in continuations]
            mask = torch.ones(len(rows), len(context_ids) + longest - 1, dtype=torch.long, device=device)
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            rest = model(torch.tensor(rows, device=device), attention_mask=mask, **{name: cache}).logits
            rest = F.log_softmax(rest.float(), dim=-1)
        results = []
        for row, tokens in enumerate(continuations):
            total, greedy = first[tokens[0]].item(), bool(first.argmax().item() == tokens[0])
            for position, token in enumerate(tokens[1:]):
                step = rest[row, position]
                total += step[token].item()
                greedy = greedy and bool(step.argmax().item() == token)
            results.append((total, greedy))
        return results

    @torch.no_grad()
    def _score_context_batch(
        self, contexts: list[list[int]], continuations: list[list[list[int]]]
    ) -> list[list[tuple[float, bool]]]:
        """(sum log p, is_greedy) of each context's continuations, for several contexts at once: the
        contexts right-padded in one pass, then every continuation of every context in one pass on
        that cache (each row on its context's cache row; the padding masked, positions given)."""
        model, device, pad = self._model, self.device, self._tokenizer.pad_token_id
        width = max(len(c) for c in contexts)
        ids = torch.tensor([c + [pad] * (width - len(c)) for c in contexts], device=device)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in contexts], device=device)
        last = torch.tensor([[len(c) - 1] for c in contexts], device=device)
        out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=last)
        first = F.log_softmax(out.logits[:, 0].float(), dim=-1)
        rows = [(i, tokens) for i, members in enumerate(continuations) for tokens in members]
        longest = max(len(tokens) for _, tokens in rows)
        rest = None
        if longest > 1:
            cache = out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401 (see _score_continuations)
            owners = torch.tensor([i for i, _ in rows], device=device)
            cache.reorder_cache(owners)
            tokens = torch.tensor([t[:-1] + [pad] * (longest - len(t)) for _, t in rows], device=device)
            rows_mask = torch.cat(
                [mask[owners], torch.ones(len(rows), longest - 1, dtype=mask.dtype, device=device)], 1
            )
            positions = torch.tensor(
                [[len(contexts[i]) + p for p in range(longest - 1)] for i, _ in rows], device=device
            )
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            rest = model(tokens, attention_mask=rows_mask, position_ids=positions, **{name: cache}).logits
            rest = F.log_softmax(rest.float(), dim=-1)
        results: list[list] = [[] for _ in contexts]
        for row, (i, tokens) in enumerate(rows):
            total, greedy = first[i, tokens[0]].item(), bool(first[i].argmax().item() == tokens[0])
            for position, token in enumerate(tokens[1:]):
                step = rest[row, position]
                total += step[token].item()
                greedy = greedy and bool(step.argmax().item() == token)
            results[i].append((total, greedy))
        return results

    @torch.no_grad()
    def _score_next_tokens(self, contexts: list[list[int]], tokens: list[list[int]]) -> list[list[tuple[float, bool]]]:
        """(log p, is_greedy) of one-token continuations: a batch of contexts, right-padded (a
        real token never attends to the padding after it), logits only at each row's last token."""
        device = self.device
        width = max(len(c) for c in contexts)
        ids = torch.tensor([c + [self._tokenizer.pad_token_id] * (width - len(c)) for c in contexts], device=device)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in contexts], device=device)
        last = torch.tensor([[len(c) - 1] for c in contexts], device=device)
        logprobs = F.log_softmax(
            self._model(ids, attention_mask=mask, logits_to_keep=last).logits[:, 0].float(), dim=-1
        )
        best = logprobs.argmax(dim=-1)
        return [
            [(logprobs[row, t].item(), bool(best[row].item() == t)) for t in row_tokens]
            for row, row_tokens in enumerate(tokens)
        ]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        by_context: dict[tuple, list] = defaultdict(list)  # context ids -> [(request index, continuation ids)]
        for index, request in enumerate(requests):
            context, continuation = request.args[0], request.args[1]
            context_ids, continuation_ids = self.encode_pair(self.prompt(context), continuation)
            if not continuation_ids:
                raise ModelArgumentError(
                    f"empty continuation after tokenisation for request {index} ({continuation!r})"
                )
            by_context[tuple(context_ids)].append((index, continuation_ids))
        results: list = [None] * len(requests)

        def store(members, scores):
            for (index, _), (logprob, greedy) in zip(members, scores):
                results[index] = (-logprob, greedy)

        # contexts whose continuations are all one token need one pass each, so they share batches
        single = sorted((c for c, m in by_context.items() if all(len(ids) == 1 for _, ids in m)), key=len)
        for chunk in length_buckets(single, self.batch_size_per_gpu):
            batch = self._score_next_tokens(
                [list(c) for c in chunk], [[ids[0] for _, ids in by_context[c]] for c in chunk]
            )
            for context, scores in zip(chunk, batch):
                store(by_context[context], scores)
        # the others: batch_size contexts per pass, then their continuations in one pass on its cache
        longer = sorted((c for c in by_context if c not in set(single)), key=len)
        for chunk in length_buckets(longer, self.batch_size_per_gpu):
            members = [[ids for _, ids in by_context[c]] for c in chunk]
            if len(chunk) == 1:  # one context: no padding at all
                batch = [self._score_continuations(list(chunk[0]), members[0])]
            else:
                batch = self._score_context_batch([list(c) for c in chunk], members)
            for context, scores in zip(chunk, batch):
                store(by_context[context], scores)
        return results

    # --- generation ---

    @torch.no_grad()
    def _generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(
            gen_kwargs.pop("max_new_tokens", None) or gen_kwargs.pop("max_gen_toks", None) or DEFAULT_MAX_NEW_TOKENS
        )
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        for key in ("top_p", "top_k", "num_beams", "repetition_penalty"):
            if gen_kwargs.get(key) is not None and (key != "top_p" or temperature > 0):
                sampling[key] = gen_kwargs[key]
        tokenizer = self._tokenizer
        encoded = [self._encode(self.prompt(c)) for c in contexts]
        width = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id  # left padding: every row's answer starts at column `width`
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
        if until:  # stop each row as soon as it has produced a stop string (it is cut off below)
            sampling["stopping_criteria"] = StoppingCriteriaList([_StopStrings(tokenizer, until, width)])
        output = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling
        )
        answers = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [_cut_at_stops(a, until) for a in answers]

    def generate_until(self, requests) -> list[str]:
        results: list = [None] * len(requests)
        by_settings: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            by_settings[repr(sorted((request.args[1] or {}).items()))].append(index)
        for indices in by_settings.values():
            # longest first: similar lengths share a batch, and a memory problem shows up at once
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start : start + self.batch_size_per_gpu]
                gen_kwargs = requests[chunk[0]].args[1] or {}
                for index, answer in zip(chunk, self._generate_batch([requests[i].args[0] for i in chunk], gen_kwargs)):
                    results[index] = answer
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("hf_causal_lm answers single-turn requests only")
