"""What differs between the harnesses TaLo runs in, behind one small object per harness.

The TaLo mixin (lmms_talo.harness.mixin) is harness-neutral. Each TaLo model class names its harness in
`talo_harness`, and the mixin asks it only for what lmms-eval and lm-eval do differently:
  install()        scope every `evaluate()` call of the harness (lmms_talo.harness.evaluation_scope): its
                   Task objects, CLI args and probe splits, and any repair the harness needs
  unwrap(output)   one raw answer of the base class, as the Task's filters and process_results take it
  request(...)     another rank's request rebuilt as this harness's Instance (lmms_talo.method.parallel)
  model_packages   where the harness's model classes log the failures they swallow
Both harnesses' --predict_only strips a task's scoring before the model sees it; `own_scoring` gives
it back to TaLo while it scores probe and test docs (`remember_own_scoring`, called by install()).
  likelihood_is_loss  whether its loglikelihood answers are losses (select_stat=margin's sign)
The two live in lmms_talo.harness.lmms.lmms_eval_harness and lmms_talo.harness.lm_eval.lm_eval_harness;
neither imports the other's harness, so the lm-eval path runs where lmms-eval is not installed.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any


class Harness(abc.ABC):
    """One harness (lmms-eval or lm-eval), as the mixin sees it: the module docstring lists the
    members. Subclasses implement install() and request(); the rest has defaults."""

    name: str = ""  # the distribution, as the report names it: "lmms-eval" or "lm-eval"
    likelihood_is_loss: bool = False  # loglikelihood answers are negated log-likelihoods (lmms-eval's)
    model_packages: tuple[str, ...] = ()

    @abc.abstractmethod
    def install(self) -> None:
        """Scope every evaluate() of the harness (idempotent): see the module docstring."""

    def unwrap(self, output: Any) -> Any:
        """One raw answer of the base class, as the task's filters and process_results take it."""
        return output

    @abc.abstractmethod
    def request(self, task: Any, request_type: str, arguments: Sequence[Any], idx: int, metadata: Any) -> Any:
        """Another rank's request rebuilt as this harness's Instance (lmms_talo.method.parallel)."""


# --- --predict_only: the harnesses replace a task's scoring with a `bypass` metric before the model
# sees the task (Task.override_metric); TaLo still scores its probe docs, with the task's own scoring.

SCORING_STATE = ("_metric_fn_list", "_aggregation_list", "_metric_fn_kwargs", "_higher_is_better")
CONFIG_SCORING = ("metric_list", "process_results")


def _scoring_of(task: Any) -> tuple[dict, dict]:
    return {a: getattr(task, a) for a in SCORING_STATE}, {a: getattr(task._config, a, None) for a in CONFIG_SCORING}


def _set_scoring(task: Any, state: dict, config: dict) -> None:
    for name, value in state.items():
        setattr(task, name, value)
    for name, value in config.items():
        setattr(task._config, name, value)


def remember_own_scoring(task_class: type) -> None:
    """Wrap the harness's `Task.override_metric` so that a task keeps its own scoring aside when
    --predict_only replaces it; the harness sees exactly its own behaviour. Idempotent."""
    override = task_class.override_metric
    if getattr(override, "__talo_wrapped__", False):
        return

    @functools.wraps(override)
    def overriding(task, metric_name):
        if not hasattr(task, "_talo_own_scoring"):
            task._talo_own_scoring = _scoring_of(task)
        return override(task, metric_name)

    overriding.__talo_wrapped__ = True
    task_class.override_metric = overriding


def scoring_replaced(task: Any) -> bool:
    """Whether the harness replaced the task's scoring (--predict_only)."""
    return hasattr(task, "_talo_own_scoring")


@contextlib.contextmanager
def own_scoring(task: Any) -> Iterator[None]:
    """The task's own scoring while the block runs (where --predict_only replaced it), then the
    harness's again, exceptions included."""
    saved = getattr(task, "_talo_own_scoring", None)
    if saved is None:
        yield
        return
    current = _scoring_of(task)
    _set_scoring(task, *saved)
    try:
        yield
    finally:
        _set_scoring(task, *current)
