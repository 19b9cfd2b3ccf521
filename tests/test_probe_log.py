"""The probe log read back: re-deciding a run from its logged passes gives the run's own decision
(every round, the multi-layer search's passes, the confirmation test on the margin), re-scored passes
change it, and what the log cannot redo is said. Runs through the real harnesses are in
test_lmms_eval_e2e.py and test_lm_eval.py."""

import json

import numpy as np
import pytest
from test_confirm import LAYERS, N_DOCS, SHOTS, Table, null_table, planted_table

from lmms_talo.method.config import TaloConfig
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.selection import select_knockout
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_log import ProbeLogError, probe_log_rows, report_from_probe_log
from lmms_talo.outputs.probe_store import ProbeStore
from lmms_talo.outputs.report import GroupReport
from lmms_talo.outputs.report_reader import ReportError, load_run


def run_and_log(table: Table, seed: int, path, **args):
    """Decide one sub-task on `table`, write its probe log to `path`; return the report's entry."""
    config = TaloConfig(probe_shots=SHOTS, seed=seed, **args)
    split = split_subtask(f"task{seed}", list(range(N_DOCS)), SHOTS, seed)
    statistic = table.margin if config.select_stat == "margin" else None
    sweeps = []

    def make_sweep():
        sweeps.append(
            LayerSweep(
                table.answer, table.score, ProbeStore(None, {}), rule=config.selection_rule(), statistic=statistic
            )
        )
        return sweeps[-1]

    selection = select_knockout(split, config, LAYERS, make_sweep)
    report = GroupReport(split.name, split.name, None, "loglikelihood", list(split.pool), len(split.test))
    report.decided(selection)
    rows = probe_log_rows(report, selection, sweeps[0], split, config.to_dict(), {"name_or_path": "table"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return report.to_dict()


def redecided(path) -> dict:
    (entry,) = report_from_probe_log(path)["subtasks"]
    return entry


def same_decision(entry: dict, recorded: dict) -> None:
    for key in (
        "selected_layers",
        "selection_reason",
        "interaction_vector",
        "interaction_holm_p",
        "probe_docs",
        "tied_layers",
    ):
        assert entry[key] == recorded[key], key
    keys = ("round", "drawn", "probe_docs", "baseline", "layer_scores", "selected", "reason", "p_values", "holm_p")
    assert [{k: r[k] for k in keys} for r in entry["rounds"]] == [{k: r[k] for k in keys} for r in recorded["rounds"]]


def test_every_round_of_the_authors_protocol_is_redecided_as_run(tmp_path):
    rounds = []
    for seed in range(6):
        recorded = run_and_log(
            null_table(np.random.default_rng(seed)), seed, tmp_path / "t_talo_probe.jsonl", threshold=0.4
        )
        rounds.append(len(recorded["rounds"]))
        entry = redecided(tmp_path / "t_talo_probe.jsonl")
        same_decision(entry, recorded)
        assert entry["probe_doc_scores"] == recorded["probe_doc_scores"] and entry["rescore_note"] == ""
    assert max(rounds) > 1, rounds  # the redraws were walked, not only round 0


@pytest.mark.parametrize("stat", ["score", "margin"])
def test_a_confirmed_selection_is_reconfirmed_from_the_logged_confirmation_passes(tmp_path, stat):
    rng = np.random.default_rng(2)
    table = planted_table(rng)
    table.margins = {
        label: {d: s + rng.normal(0, 0.1) for d, s in scores.items()} for label, scores in table.scores.items()
    }
    recorded = run_and_log(table, 0, tmp_path / "c_talo_probe.jsonl", select_rule="confirm", select_stat=stat)
    entry = redecided(tmp_path / "c_talo_probe.jsonl")
    same_decision(entry, recorded)
    counters = ("docs_computed", "docs_reused")  # the run's cost, not re-run offline
    assert recorded["selected_layers"] == [3] and recorded["confirmation"]["docs_computed"] > 0
    assert {k: v for k, v in entry["confirmation"].items() if k not in counters} == {
        k: v for k, v in recorded["confirmation"].items() if k not in counters
    }


def test_rescored_passes_change_the_decision_and_the_note_says_what_the_log_lacks(tmp_path):
    log = tmp_path / "p_talo_probe.jsonl"
    recorded = run_and_log(planted_table(np.random.default_rng(5), fix=1.0), 0, log)
    assert recorded["selected_layers"] == [3] and len(recorded["rounds"]) == 1
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for row in rows[1:]:
        row["score"] = (
            1.0 if row["variant"] in ("base", "7") else 0.0
        )  # re-scored: only layer 7 keeps the base's answers
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    entry = redecided(log)
    assert entry["selected_layers"] == [] and entry["recorded_selected_layers"] == [3]
    assert entry["interaction_vector"]["7"] == 0.0 and entry["interaction_vector"]["3"] == -1.0
    assert "the rounds it would have drawn next are not in the log" in entry["rescore_note"]


def test_the_multi_layer_search_is_kept_as_run_and_said(tmp_path):
    base = null_table(np.random.default_rng(3)).scores["base"]
    table = Table({str(layer): base for layer in LAYERS} | {"base": base})  # no layer but 3 changes anything
    table.scores["3"] = {d: 1.0 if base[d] or d % 2 else 0.0 for d in range(N_DOCS)}
    for first in LAYERS:  # a pair answers as its lower layer does, except 3+4, which is always right
        for second in LAYERS:
            table.scores[f"{min(first, second)}+{max(first, second)}"] = table.scores[str(min(first, second))]
    table.scores["3+4"] = {d: 1.0 for d in range(N_DOCS)}
    recorded = run_and_log(table, 0, tmp_path / "m_talo_probe.jsonl", max_layers=2)
    entry = redecided(tmp_path / "m_talo_probe.jsonl")
    assert recorded["selected_layers"] == [3, 4] and entry["probe_doc_scores"] == recorded["probe_doc_scores"]
    assert entry["selected_layers"] == [3]  # the single-layer decision, re-made
    assert "the multi-layer search is not redone" in entry["rescore_note"]


def test_a_probe_log_loads_as_a_run_and_bad_files_say_what_is_wrong(tmp_path):
    log = tmp_path / "samples_x_talo_probe_2026.jsonl"
    run_and_log(planted_table(np.random.default_rng(5), fix=1.0), 0, log)
    run = load_run(log)
    assert run.subtasks[0].selected_layer == 3 and run.subtasks[0].gains()[3] > 0
    bad = tmp_path / "y_talo_probe.jsonl"
    bad.write_text('{"doc_id": 0}\n')
    with pytest.raises(ReportError, match="neither a 'subtask' nor a 'pass' row"):
        load_run(bad)
    lines = log.read_text().splitlines()
    (tmp_path / "z_talo_probe.jsonl").write_text("\n".join(line for line in lines if '"variant": "base"' not in line))
    with pytest.raises(ProbeLogError, match="no base-model pass"):
        report_from_probe_log(tmp_path / "z_talo_probe.jsonl")


def test_the_analysis_of_a_confirm_run_re_decides_only_the_probe_only_rules(tmp_path):
    """A confirming rule needs docs no probe round used: the offline rule comparison leaves it out
    and says so, and the robustness figure follows its base rule."""
    from lmms_talo.analysis.build import write_analysis
    from lmms_talo.method.rules import probe_only_rules

    log = tmp_path / "c_talo_probe.jsonl"
    run_and_log(planted_table(np.random.default_rng(2)), 0, log, select_rule="confirm", select_base_rule="sign_test")
    assert load_run(log).probe_rule_name == "sign_test"
    text = write_analysis([log], tmp_path / "analysis").read_text()
    assert "confirm" not in probe_only_rules() and "confirm: choice" not in text
    assert all(f"{name}: choice" in text for name in probe_only_rules())
    assert "A confirming rule (select_rule=confirm) is not re-decided offline" in text
