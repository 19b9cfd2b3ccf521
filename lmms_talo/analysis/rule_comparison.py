"""Each selection rule's choice, decided offline from the per-doc probe records, and what that choice
does on the test docs (which needs the test score of the chosen layer: `test_all_layers=true` gives
every layer's; otherwise only the layers the run evaluated are known)."""

from __future__ import annotations

from dataclasses import dataclass

from lmms_talo.method.rules import probe_only_rules
from lmms_talo.outputs.report_reader import Run


@dataclass
class RuleChoice:
    subtask: str
    rule: str
    layer: int | None
    probe_gain: float | None
    test_gain: float | None  # None: the run has no test score for that layer; 0 when no layer is chosen


@dataclass
class RuleSummary:
    rule: str
    subtasks: int
    knocked_out: int
    helped: int
    hurt: int
    unchanged: int  # knocked out with no change in test score
    unknown: int  # knocked out, but the layer was not scored on the test docs
    mean_test_gain: float | None  # over the sub-tasks whose outcome is known (keeping the model = 0)


def rule_choices(run: Run) -> list[RuleChoice]:
    choices = []
    for sub in run.swept_subtasks():
        for name in probe_only_rules():
            outcome = sub.decide(run.rule(name))
            layer = outcome.selected
            test_gain = sub.test_gain("base" if layer is None else str(layer))
            choices.append(
                RuleChoice(sub.name, name, layer, None if layer is None else outcome.gains[layer], test_gain)
            )
    return choices


def summarize(choices: list[RuleChoice]) -> list[RuleSummary]:
    summaries = []
    for name in probe_only_rules():
        mine = [c for c in choices if c.rule == name]
        chosen = [c for c in mine if c.layer is not None]
        known = [c.test_gain for c in mine if c.test_gain is not None]
        summaries.append(
            RuleSummary(
                name,
                len(mine),
                len(chosen),
                sum(1 for c in chosen if c.test_gain is not None and c.test_gain > 0),
                sum(1 for c in chosen if c.test_gain is not None and c.test_gain < 0),
                sum(1 for c in chosen if c.test_gain == 0),
                sum(1 for c in chosen if c.test_gain is None),
                sum(known) / len(known) if known else None,
            )
        )
    return summaries
