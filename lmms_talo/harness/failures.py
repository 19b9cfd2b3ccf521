"""Failures the base model class swallows during a probe pass, caught so that a probe answer is real
or an error.

lmms-eval's model classes catch exceptions in generation, decoding, image and video preprocessing
and log them at ERROR (loguru) before answering "" or dropping the input; lm-eval's log through
`logging`. Watching those logs, and model.generate, covers every such site, present and future,
without patching each call the classes make.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from loguru import logger as loguru  # lmms-eval's model classes log through loguru

from lmms_talo.method.interventions import BASE, Knockout


class GenerationFailed(RuntimeError):
    """The base class swallowed a failure during a probe pass (generate() raised, or it logged an
    error: decoding, image or video preprocessing) and answered "" or without its input instead."""


def watched_modules(lmm, own_class: type) -> tuple[str, ...]:
    """The harness's model packages and the modules of the base classes of `lmm` (`own_class`'s
    subclasses, TaLo's own, and the standard library's excluded)."""
    bases = {
        c.__module__
        for c in type(lmm).__mro__
        if not issubclass(c, own_class) and c.__module__.split(".")[0] not in sys.stdlib_module_names
    }
    return tuple(sorted(bases | set(lmm.talo_harness.model_packages)))


class _FailureLog(logging.Handler):
    def __init__(self, failures: list):
        super().__init__(level=logging.ERROR)
        self.failures = failures

    def emit(self, record: logging.LogRecord) -> None:
        self.failures.append(record.getMessage())


@contextlib.contextmanager
def watch_failures(model, modules: tuple[str, ...]) -> Iterator[list]:
    """Record what the base class swallows during a pass: exceptions raised by model.generate, and
    the messages `modules` log at ERROR or above (loguru and logging alike). Undone on exit."""
    failures: list = []
    original = model.generate

    def generate(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            failures.append(exc)
            raise

    def watched(record) -> bool:
        name = record["name"] or ""
        return any(name == m or name.startswith(m + ".") for m in modules)

    handler = _FailureLog(failures)
    loggers = [logging.getLogger(m) for m in modules]
    model.generate = generate
    sink = loguru.add(
        lambda message: failures.append(message.record["message"]), level="ERROR", filter=watched, format="{message}"
    )
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield failures
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        loguru.remove(sink)
        del model.generate


def raise_on_failure(failures: list, knockout: Knockout | None) -> None:
    """Stop the run if a probe pass swallowed a failure: a probe is never scored on a failed answer."""
    if not failures:
        return
    first = failures[0]
    cause = first if isinstance(first, BaseException) else None
    what = f"generate() raised {type(first).__name__}: {first}" if cause else f"it logged the error {first!r}"
    raise GenerationFailed(
        f"the base model class failed during a TaLo probe pass ({knockout.label if knockout else BASE}): "
        f"{what} ({len(failures)} failure(s) in the pass); a probe is never scored on a failed answer"
    ) from cause
