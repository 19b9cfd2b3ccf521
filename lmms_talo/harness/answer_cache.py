"""The harness's response cache (lmms-eval's `--use_cache`, lm-eval's `--use_cache`), as TaLo uses it.

A harness caches answers by request and model args, and serves a cached answer without calling the
model. For a TaLo model that is quietly wrong three ways: a run served from the cache makes no
decision, writes no report and tags its sample rows as the full model's; a partly served run leaves
the served docs out of its test score; and an answer made under one knockout could be served to a
run that selected another. So, for a TaLo model, the harness's cache step is redirected: the TaLo
model gets every request (it groups, probes, decides and reports as always; the probe store spares
it the probe passes it already ran), and only its answers under the selected knockout are looked
up and stored, under TaLo's own key (`variant_key`): the model's identity, its harness class and
args (TaLo's own args, output-only ones included, are not part of it), the knockout and the
intervention. A harness's cache hook, which would file knocked-out answers under the full model's
key, is never given to a TaLo model (TaloMixin.set_cache_hook).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

# computes the answers of the requests the cache does not hold
Compute = Callable[[Sequence], list]


class AnswerCache(Protocol):
    """One harness call's response cache, as TaLo's answer step uses it."""

    def answers(self, requests: Sequence, variant_key: str, compute: Compute) -> tuple[list, int]:
        """(the answers of `requests` under the variant, in order; how many came from the cache):
        cached ones where the cache holds them under `variant_key`, compute(the rest) stored."""


def variant_key(model_identity: dict, harness_model: dict, versions: dict, label: str, intervention: str) -> str:
    """What a TaLo answer is keyed by in a harness's response cache: everything that makes it."""
    payload = [model_identity.get("digest"), harness_model, versions, label, intervention]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def as_answer(reqtype: str, value: Any) -> Any:
    """A cached answer as the model class gave it: JSON stores a loglikelihood pair as a list."""
    return tuple(value) if reqtype == "loglikelihood" and isinstance(value, list) else value


@contextlib.contextmanager
def serving(lm: Any, cache: AnswerCache) -> Iterator[None]:
    """TaLo's answers of this harness call go through `cache` (lm: a TaloMixin model)."""
    lm.talo_answer_cache = cache
    try:
        yield
    finally:
        lm.talo_answer_cache = None
