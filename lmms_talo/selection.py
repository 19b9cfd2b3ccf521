"""The whole decision for one sub-task, in one place and harness-neutral.

`select_knockout` takes the sub-task's probe split, TaLo's config and a way to build its layer sweep,
and returns a `Selection` value: the layers to knock out and the evidence behind them. The adapter of
either harness only applies it. The order is fixed: a forced layer needs no probing; a sub-task with
no probe pool is answered by the full model; otherwise the sweep runs the probe rounds, the rule
decides each round (lmms_talo.rules), and the greedy multi-layer search (lmms_talo.greedy_search)
may add layers on top, decided by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .config import TaloConfig
from .greedy_search import LayerStage, search_more_layers
from .interventions import Knockout
from .probe import ProbeSplit
from .sweep import LayerSweep, SweepResult


@dataclass(frozen=True)
class Selection:
    """What TaLo decided for one sub-task, and why."""

    layers: tuple[int, ...]  # the knockout to evaluate; () keeps the full model
    forced: bool = False
    not_probed: str | None = None  # why the sub-task was not probed (then `sweep` is None)
    sweep: SweepResult | None = None
    stages: tuple[LayerStage, ...] = ()

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
    return Selection(layers, sweep=result, stages=tuple(stages))
