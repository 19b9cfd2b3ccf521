"""The whole decision for one sub-task, in one place and harness-neutral.

`select_knockout` takes the sub-task's probe split, TaLo's config and a way to build its layer sweep,
and returns a `Selection` value: the layers to knock out and the evidence behind them. The adapter of
either harness only applies it. The order is fixed: a forced layer needs no probing; a sub-task with
no probe pool is answered by the full model; otherwise the sweep runs the probe rounds, the rule
decides each round (lmms_talo.method.rules), and the greedy multi-layer search (lmms_talo.method.greedy_search)
may add layers on top, decided by the same rule. A confirming rule (select_rule=confirm) then tests
the chosen knockout against the full model on confirmation docs: the pool units no probe round
used, so the test set is the same as under any other rule. Only the rule decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmms_talo.method.config import TaloConfig
from lmms_talo.method.greedy_search import LayerStage, search_more_layers
from lmms_talo.method.interventions import Knockout
from lmms_talo.method.probe_split import ProbeSplit
from lmms_talo.method.rules import Confirmation
from lmms_talo.method.sweep import LayerSweep, SweepResult


@dataclass(frozen=True)
class Selection:
    """What TaLo decided for one sub-task, and why."""

    layers: tuple[int, ...]  # the knockout to evaluate; () keeps the full model
    forced: bool = False
    not_probed: str | None = None  # why the sub-task was not probed (then `sweep` is None)
    sweep: SweepResult | None = None
    stages: tuple[LayerStage, ...] = ()
    confirmation: Confirmation | None = None  # select_rule=confirm: the test of the searched layers

    def knockout(self, intervention: str) -> Knockout | None:
        return Knockout(self.layers, intervention) if self.layers else None

    @property
    def probe_doc_scores(self) -> dict:
        """Per variant label, per probe doc: the sweep's scores, then the multi-layer stages'."""
        merged = {label: dict(scores) for label, scores in (self.sweep.doc_scores if self.sweep else {}).items()}
        for stage in self.stages:
            for label, scores in stage.doc_scores.items():
                merged.setdefault(label, {}).update(scores)
        return merged


def select_knockout(
    split: ProbeSplit,
    config: TaloConfig,
    candidate_layers: Sequence[int],
    make_sweep: Callable[[], LayerSweep],
) -> Selection:
    """Decide the knockout of one sub-task. `make_sweep` is called only when probing is needed."""
    if config.force_layer is not None:
        return Selection((config.force_layer,), forced=True)
    if split.unprobed:
        return Selection((), not_probed=split.unprobed)
    sweep = make_sweep()
    result = sweep.run(split, candidate_layers, config.intervention, config.max_redraws)
    layers, stages = search_more_layers(sweep, result, config.intervention, config.max_layers, split.name)
    confirmation = None
    if sweep.rule.confirms and layers:
        confirmation = confirm_knockout(sweep, split, result, Knockout(layers, config.intervention))
        layers = layers if confirmation.kept else ()
    return Selection(layers, sweep=result, stages=tuple(stages), confirmation=confirmation)


def confirm_knockout(sweep: LayerSweep, split: ProbeSplit, result: SweepResult, knockout: Knockout) -> Confirmation:
    """The full model and `knockout` on the pool units no probe round used (two passes per doc,
    through the sweep's store), and the rule's confirmation test on them."""
    docs = split.unused_units(result.probe_rounds)
    cost = SweepResult((), [])
    scores = (sweep.doc_scores(None, docs, cost), sweep.doc_scores(knockout, docs, cost)) if docs else ({}, {})
    confirmation = sweep.rule.confirm(knockout.layers, docs, scores, stream=split.name)
    return dataclasses.replace(confirmation, docs_computed=cost.docs_computed, docs_reused=cost.docs_reused)
