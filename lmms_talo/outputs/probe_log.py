"""The probe log: every probe pass of a TaLo run, written beside the harness's sample files, and read
back into a report so that the sweep can be re-scored and re-decided without the model.

A log (`<time>_samples_<task>_talo_probe.jsonl` under lmms-eval, `samples_<task>_talo_probe_<time>.jsonl`
under lm-eval) holds, per probed sub-task, one `subtask` row (its candidate layers, each probe
round's units and why they were drawn, the run's own selection, TaLo's args, the model) and then one
`pass` row per probe pass: the stage (`sweep`, `search` for the multi-layer search, `confirm` for
select_rule=confirm), the variant, the probe unit and its docs, the responses as the model gave them
(generated answer or option log-likelihoods), the per-unit score and, with select_stat=margin, the
margin. A user who re-scores the responses with another metric rewrites `score` (and `statistic`).

`report_from_probe_log` re-decides every sub-task from the pass rows with the run's rule, round by
round as the run did (the first round that clears the threshold decides), and returns a dict in
talo_report.json's schema, probe parts only (no test docs), which `lmms-talo analyze` reads like a
report. What the log cannot redo is said in each sub-task's `rescore_note`: rounds the run never drew
(it stopped at a round that decided), and the multi-layer search (its stages are kept as run).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmms_talo.method.config import TaloArgumentError, TaloConfig
from lmms_talo.method.interventions import Knockout
from lmms_talo.method.rules import RoundOutcome, RuleError, SelectionRule
from lmms_talo.outputs.report import GroupReport, decision_fields, round_entry

PROBE_LOG_SUFFIX = "_talo_probe"
SUBTASK_FIELDS = ("task", "subtask", "request_type", "candidate_layers", "selected_layers", "selection_reason")


class ProbeLogError(ValueError):
    """A file is not a probe log, or a row lacks what re-deciding needs."""


def is_probe_log(path: Path) -> bool:
    return path.suffix == ".jsonl" and PROBE_LOG_SUFFIX in path.stem


# --- writing ---


def probe_log_rows(
    group_report: Any, selection: Any, sweep: Any, split: Any, config: Mapping, model: Mapping
) -> list[dict]:
    """The rows of one probed sub-task: `group_report` a decided GroupReport (lmms_talo.outputs.report),
    `selection` its Selection, `sweep` the LayerSweep that holds every pass (every rank's, merged),
    `split` its ProbeSplit (the units' docs)."""
    header = {
        "kind": "subtask",
        **{name: getattr(group_report, name) for name in SUBTASK_FIELDS},
        "rounds": [
            {"round": r["round"], "drawn": r["drawn"], "probe_docs": r["probe_docs"]} for r in group_report.rounds
        ],
        "config": dict(config),
        "model": dict(model),
    }
    rows = [header]
    units = {str(u): u for u in split.pool_units}

    def add(stage: str, label: str, keys) -> None:
        for key in map(str, keys):
            unit = units[key]
            score, responses = sweep.record(label, unit)
            row = {
                "kind": "pass",
                "subtask": group_report.subtask,
                "stage": stage,
                "variant": label,
                "unit": key,
                "doc_ids": list(split.docs_of(unit)),
                "responses": responses,
                "score": score,
            }
            if sweep.statistic is not None:
                row["statistic"] = sweep.statistic(unit, responses)
            rows.append(row)

    for label, scores in selection.sweep.doc_scores.items():
        add("sweep", label, scores)
    for stage in selection.stages:
        for label, scores in stage.doc_scores.items():
            add("search", label, scores)
    if selection.confirmation is not None:
        for label in ("base", Knockout(selection.confirmation.layers).label):
            add("confirm", label, selection.confirmation.docs)
    return rows


# --- reading ---


def read_probe_log(path: Path) -> dict[str, tuple[dict, list[dict]]]:
    """Sub-task name -> (its `subtask` row, its `pass` rows), in file order."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ProbeLogError(f"cannot read {path} ({exc})") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeLogError(
                f"{path}:{number} is not JSON ({exc}): pass a *{PROBE_LOG_SUFFIX}.jsonl written by a TaLo run"
            ) from exc
        kind = row.get("kind") if isinstance(row, dict) else None
        if kind == "subtask":
            groups[row["subtask"]] = (row, [])
        elif kind == "pass":
            if row.get("subtask") not in groups:
                raise ProbeLogError(f"{path}:{number}: a pass of {row.get('subtask')!r} before its subtask row")
            groups[row["subtask"]][1].append(row)
        else:
            raise ProbeLogError(
                f"{path}:{number} is neither a 'subtask' nor a 'pass' row: "
                f"pass a *{PROBE_LOG_SUFFIX}.jsonl written by a TaLo run"
            )
    if not groups:
        raise ProbeLogError(f"{path} holds no probed sub-task")
    return groups


def rule_of(config: Mapping) -> SelectionRule:
    """The run's selection rule, built from its TaLo args as the run built it."""
    known = TaloConfig.arg_names()
    try:
        return TaloConfig(**{k: v for k, v in config.items() if k in known}).selection_rule()
    except (TaloArgumentError, RuleError, TypeError) as exc:
        raise ProbeLogError(f"the log's TaLo args do not build a rule: {exc}") from exc


def _scores(passes: list[dict], stage: str, key: str) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for row in passes:
        if row["stage"] == stage and key in row:
            table.setdefault(row["variant"], {})[row["unit"]] = row[key]
    return table


def _decide(
    rule: SelectionRule, docs: list, base: Mapping, layers: Mapping[int, Mapping], stats: Mapping | None, name: str
) -> RoundOutcome:
    statistic = None
    if rule.stat != "score":
        if stats is None or "base" not in stats:
            raise ProbeLogError(f"{name}: select_stat={rule.stat} needs each pass's 'statistic', and the log has none")
        statistic = (
            {d: stats["base"][str(d)] for d in docs},
            {layer: {d: stats[str(layer)][str(d)] for d in docs} for layer in layers},
        )
    return rule.decide(docs, base, layers, stream=name, statistic=statistic)


def rescore_subtask(header: dict, passes: list[dict], rule: SelectionRule) -> dict:
    """One sub-task re-decided from its passes: a talo_report.json sub-task entry, probe parts only."""
    name = header["subtask"]
    scores, stats = _scores(passes, "sweep", "score"), _scores(passes, "sweep", "statistic")
    if "base" not in scores or not header["rounds"]:
        raise ProbeLogError(f"{name}: the log has no base-model pass or no probe round")
    rounds, notes = [], []
    for drawn in header["rounds"]:
        docs = list(drawn["probe_docs"])  # the units as the run had them (ids keep their JSON type)
        missing = [d for d in docs if str(d) not in scores["base"]]
        if missing:
            raise ProbeLogError(f"{name}: round {drawn['round']} has no base-model pass for {missing}")
        on_docs = lambda table, docs=docs: {d: table[str(d)] for d in docs}  # used in this iteration only
        layers = {
            layer: on_docs(scores[str(layer)])
            for layer in header["candidate_layers"]
            if all(str(d) in scores.get(str(layer), {}) for d in docs)
        }
        outcome = _decide(rule, docs, on_docs(scores["base"]), layers, stats or None, name)
        rounds.append(round_entry(drawn["round"], drawn["drawn"], outcome))
        if outcome.cleared:
            break
    if not outcome.cleared and len(rounds) == len(header["rounds"]) and header["selected_layers"]:
        notes.append(
            "no recorded round clears the threshold under these scores; the run stopped at the round "
            "that decided it, so the rounds it would have drawn next are not in the log"
        )
    if len(rounds) < len(header["rounds"]):
        notes.append(
            f"decided at round {rounds[-1]['round']}; the run went on to round {header['rounds'][-1]['round']}"
        )
    if any(row["stage"] == "search" for row in passes):
        notes.append("the multi-layer search is not redone: its stages' passes are in probe_doc_scores as run")
    pool = sorted({d for row in passes for d in map(str, row["doc_ids"])})
    report = GroupReport(
        header["task"],
        name,
        None,
        header["request_type"],
        pool,
        0,
        candidate_layers=list(header["candidate_layers"]),
        rounds=rounds,
        **decision_fields(outcome),
    )
    report.probe_doc_scores = dict(scores)
    for label, table in _scores(passes, "search", "score").items():
        report.probe_doc_scores.setdefault(label, {}).update(table)
    if rule.confirms and outcome.selected is not None:
        report.record_confirmation(_reconfirm(rule, [outcome.selected], passes, name))
    report.selected_layers = [] if report.selected_layer is None else [report.selected_layer]
    return {
        **report.to_dict(),
        "recorded_selected_layers": list(header["selected_layers"]),
        "recorded_selection_reason": header["selection_reason"],
        "rescore_note": "; ".join(notes),
    }


def _reconfirm(rule: SelectionRule, selected: list[int], passes: list[dict], name: str):
    """select_rule=confirm: the confirmation test on the logged confirmation passes (they exist only
    for the layer the run confirmed; another layer cannot be confirmed offline)."""
    label = Knockout(tuple(selected)).label
    scores = _scores(passes, "confirm", "score")
    if label not in scores:
        raise ProbeLogError(
            f"{name}: re-decided to knock out {label}, but the log has confirmation passes only for "
            f"{', '.join(k for k in scores if k != 'base') or 'no layer'}: confirming another layer needs the model"
        )
    docs = list(scores["base"])
    pair = ({d: scores["base"][d] for d in docs}, {d: scores[label][d] for d in docs})
    return rule.confirm(tuple(selected), docs, pair, stream=name)


def report_from_probe_log(path: Path) -> dict:
    """A talo_report.json-shaped dict (probe parts only) re-decided from a probe log."""
    groups = read_probe_log(path)
    first = next(iter(groups.values()))[0]
    rule = rule_of(first["config"])
    return {
        "source": f"probe log {Path(path).name}, re-decided by select_rule={rule.name}",
        "model": first.get("model", {}),
        "config": first["config"],
        "subtasks": [rescore_subtask(header, passes, rule) for header, passes in groups.values()],
    }
