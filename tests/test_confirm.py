"""select_rule=confirm, select_stat=margin and the Holm column: planted effects are confirmed, planted
nulls are not (at the stated rate over many seeds), and through the real lmms-eval CLI the report
shows the confirmation record."""

import json

import numpy as np
import pytest
from cli_tasks import run_lmms_eval, write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.method.config import TaloArgumentError, TaloConfig
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.selection import select_knockout
from lmms_talo.method.statistics import holm_adjusted, paired_flip_p, paired_tests
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore
from lmms_talo.outputs.report import GroupReport, summary_table

LAYERS = tuple(range(1, 11))
N_DOCS, SHOTS = 72, 8  # pool 24: round 0 draws 8, the rest confirm


class Table:
    """A model whose answer to (variant, doc) is a fixed (score, margin) pair."""

    def __init__(self, scores: dict, margins: dict | None = None):
        self.scores, self.margins = scores, margins or scores

    def answer(self, knockout, docs):
        label = knockout.label if knockout else "base"
        return {d: [(self.scores[label][d], self.margins[label][d])] for d in docs}

    @staticmethod
    def score(doc, responses):
        return float(responses[0][0])

    @staticmethod
    def margin(doc, responses):
        return float(responses[0][1])


def select(table: Table, seed: int, **config):
    config = TaloConfig(probe_shots=SHOTS, seed=seed, **config)
    split = split_subtask(f"task{seed}", list(range(N_DOCS)), SHOTS, seed)
    statistic = table.margin if config.select_stat == "margin" else None

    def make_sweep():
        return LayerSweep(
            table.answer, table.score, ProbeStore(None, {}), rule=config.selection_rule(), statistic=statistic
        )

    return split, select_knockout(split, config, LAYERS, make_sweep)


def null_table(rng) -> Table:
    """Every layer as good as the base model: pass/fail at random, independently per doc."""
    labels = ["base"] + [str(l) for l in LAYERS]
    return Table({label: {d: float(rng.random() < 0.5) for d in range(N_DOCS)} for label in labels})


def planted_table(rng, layer: int = 3, fix: float = 0.8) -> Table:
    """Layer `layer` turns a share `fix` of the base model's wrong docs right; the others are noise."""
    table = null_table(rng)
    base = table.scores["base"]
    table.scores[str(layer)] = {d: 1.0 if base[d] or rng.random() < fix else 0.0 for d in range(N_DOCS)}
    return table


def test_planted_nulls_are_confirmed_at_most_alpha_of_the_time():
    """No layer helps: the gain rule still knocks one out on most seeds; confirm keeps at most
    alpha = 5% of them (exact sign test: about 3% here), 400 seeds."""
    rng = np.random.default_rng(0)
    gain = confirm = 0
    for seed in range(400):
        table = null_table(rng)
        gain += bool(select(table, seed)[1].layers)
        confirm += bool(select(table, seed, select_rule="confirm")[1].layers)
    assert gain / 400 > 0.9
    assert confirm / 400 <= 0.05


def test_planted_effects_are_confirmed():
    """Layer 3 fixes 80% of the base model's mistakes: the probe rounds pick it on most of 200 seeds,
    and confirm keeps it on at least 75% of those (measured: 147 of 180; the sign test on the ~16
    confirmation docs, of which ~8 are base mistakes)."""
    rng = np.random.default_rng(1)
    picked = kept = 0
    for seed in range(200):
        selection = select(planted_table(rng), seed, select_rule="confirm")[1]
        picked += selection.sweep.selected == 3
        kept += selection.layers == (3,)
    assert picked / 200 >= 0.8 and kept / picked >= 0.75


def test_the_margin_ranks_and_accuracy_confirms():
    """A knockout that raises every margin by 0.6 (noise sd 0.5, margins N(0, 1)): with select_stat
    margin or score, confirm's verdict is the same on every seed, because the confirmation tests the
    per-doc scores (a margin can rise with no more correct answers); with no effect, neither keeps a
    layer on more than alpha of the seeds."""

    def tables(shift):
        rng = np.random.default_rng(2)
        for _ in range(100):
            margins = {
                label: {d: float(rng.normal()) for d in range(N_DOCS)} for label in ["base"] + [str(l) for l in LAYERS]
            }
            margins["3"] = {d: margins["base"][d] + shift + float(rng.normal(0, 0.5)) for d in range(N_DOCS)}
            yield Table(
                {label: {d: float(m > 0) for d, m in values.items()} for label, values in margins.items()}, margins
            )

    def outcomes(shift, stat):
        return [select(t, seed, select_rule="confirm", select_stat=stat)[1] for seed, t in enumerate(tables(shift))]

    margin, score = outcomes(0.6, "margin"), outcomes(0.6, "score")
    assert sum(s.sweep.selected == 3 for s in margin) >= 30
    assert [s.layers for s in margin] == [s.layers for s in score]
    assert all(s.confirmation.stat == "score" for s in margin if s.confirmation is not None)
    for stat in ("margin", "score"):
        assert sum(bool(s.layers) for s in outcomes(0.0, stat)) <= 5


def test_confirmation_docs_are_the_pool_units_no_round_used_and_the_record_says_why():
    split, selection = select(planted_table(np.random.default_rng(3), fix=1.0), 0, select_rule="confirm")
    confirmation = selection.confirmation
    used = {d for r in selection.sweep.probe_rounds for d in r.docs}
    assert confirmation.docs == tuple(split.unused_units(selection.sweep.probe_rounds))
    assert set(confirmation.docs) <= set(split.pool) and not set(confirmation.docs) & used
    assert not set(confirmation.docs) & set(split.test)
    assert len(confirmation.docs) == len(split.pool) - len(used) > 0
    ref = [confirmation.reference[d] for d in confirmation.docs]
    assert confirmation.p_value == paired_flip_p(ref, [confirmation.knocked[d] for d in confirmation.docs])
    assert confirmation.kept and "kept" in confirmation.reason and confirmation.stat == "score"
    # two passes per confirmation doc: the base model's and the knockout's, none seen by the rounds
    assert (confirmation.docs_computed, confirmation.docs_reused) == (2 * len(confirmation.docs), 0)
    # the test set, and the probe rounds, are those of the gain rule: only the decision differs
    gain_split, gain = select(planted_table(np.random.default_rng(3), fix=1.0), 0)
    assert gain_split.test == split.test and gain.sweep.probe_rounds == selection.sweep.probe_rounds


def test_a_knockout_with_no_pool_unit_left_is_dropped_with_that_reason():
    scores = {label: {d: float(d % 2) for d in range(N_DOCS)} for label in ["base"] + [str(l) for l in LAYERS]}
    scores["2"] = {d: 1.0 for d in range(N_DOCS)}
    config = TaloConfig(probe_shots=SHOTS, select_rule="confirm")
    split = split_subtask("small", list(range(3 * SHOTS)), SHOTS, 0)  # pool = k units: round 0 uses them all
    table = Table(scores)
    selection = select_knockout(
        split,
        config,
        LAYERS,
        lambda: LayerSweep(table.answer, table.score, ProbeStore(None, {}), rule=config.selection_rule()),
    )
    assert selection.sweep.selected == 2 and selection.layers == ()
    assert selection.confirmation.docs == () and "no pool unit is left" in selection.confirmation.reason


def test_a_pair_is_confirmed_against_the_full_model():
    rng = np.random.default_rng(4)
    table = planted_table(rng, layer=3, fix=0.5)
    base = table.scores["base"]
    pair = {d: 1.0 if base[d] or rng.random() < 0.95 else 0.0 for d in range(N_DOCS)}
    table.scores.update({"3+" + str(l) if l > 3 else f"{l}+3": dict(table.scores[str(l)]) for l in LAYERS if l != 3})
    table.scores["3+7"] = pair
    _, selection = select(table, 0, select_rule="confirm", max_layers=2)
    assert selection.layers == (3, 7) and selection.confirmation.layers == (3, 7)
    knocked = selection.confirmation.knocked_scores
    assert knocked == {d: pair[d] for d in selection.confirmation.docs}
    assert selection.confirmation.reference_scores == {d: base[d] for d in selection.confirmation.docs}


def test_the_multi_layer_search_tests_the_margin_when_the_rule_does():
    """select_stat=margin reaches the greedy stages: a pair that keeps every pass/fail score but widens
    every margin is significant on the margin and not on the score."""
    rng = np.random.default_rng(7)
    table = planted_table(rng, layer=3, fix=1.0)
    table.margins = {label: {d: s - 0.5 for d, s in scores.items()} for label, scores in table.scores.items()}
    for layer in LAYERS:
        if layer != 3:
            pair = "+".join(map(str, sorted((3, layer))))
            table.scores[pair] = dict(table.scores["3"])
            table.margins[pair] = {d: m + (0.3 if layer == 6 else 0.0) for d, m in table.margins["3"].items()}
    for stat, significant in (("margin", True), ("score", False)):
        _, selection = select(table, 0, select_rule="maxt", select_stat=stat, select_alpha=0.5, max_layers=2)
        (stage,) = selection.stages
        assert (stage.outcome.p_values[6] < 0.05) is significant, stat


def test_holm_adjusted_p_values_hold_the_family_wise_rate_and_keep_real_effects():
    """Every rule's rounds carry each layer's paired test and its Holm adjustment. With no real effect
    (29 layers, 20 docs, 300 seeds) some layer's raw p is below 5% on many seeds (measured 72), a
    Holm-adjusted one on at most 5%; a planted effect keeps its exact p and a Holm p no larger than Bonferroni's."""
    rng = np.random.default_rng(5)
    docs, layers = list(range(20)), range(1, 30)
    raw = adjusted = 0
    for seed in range(300):
        base = {d: float(rng.random() < 0.5) for d in docs}
        tests = paired_tests(docs, base, {l: {d: float(rng.random() < 0.5) for d in docs} for l in layers}, seed, "s")
        raw += min(tests["p_values"].values()) < 0.05
        adjusted += min(tests["holm"].values()) < 0.05
        assert tests["holm"] == holm_adjusted(tests["p_values"])
    assert raw / 300 > 0.15 and adjusted / 300 <= 0.05
    for seed in range(50):  # layer 3 fixes every probe mistake: p = 0.5^(mistakes), Holm at most 10 x that
        outcome = select(planted_table(rng, fix=1.0), seed)[1].sweep.rounds[0]
        mistakes = round((1 - outcome.baseline) * len(outcome.probe_docs))
        assert outcome.p_values[3] == 0.5**mistakes
        assert outcome.p_values[3] <= outcome.holm[3] <= min(1.0, len(LAYERS) * 0.5**mistakes)


def test_the_report_records_the_confirmation_and_the_holm_column():
    rng = np.random.default_rng(6)
    _, selection = select(null_table(rng), 1, select_rule="confirm")
    report = GroupReport("t", "t", None, "loglikelihood", [], 0)
    report.decided(selection)
    data = report.to_dict()
    final = selection.sweep.final
    assert data["interaction_holm_p"] == {str(k): v for k, v in final.holm.items()}
    assert data["rounds"][-1]["holm_p"] == data["interaction_holm_p"]
    record = data["confirmation"]
    assert record["layers"] == [final.selected] and record["kept"] is False and data["selected_layer"] is None
    assert data["selection_reason"] == record["reason"] and record["p_value"] >= 0.05
    table = summary_table({"subtasks": [data]})
    assert "holm p" in table.splitlines()[0]
    assert f"{final.holm[final.tied_layers[0]]:.3f}" in table.splitlines()[2]


def test_confirmation_and_statistic_args_are_checked():
    with pytest.raises(TaloArgumentError, match="select_stat='mean' is unknown"):
        TaloConfig.pop_from({"select_stat": "mean"})
    with pytest.raises(TaloArgumentError, match="select_base_rule=sign_test is only read by select_rule=confirm"):
        TaloConfig.pop_from({"select_base_rule": "sign_test"})
    with pytest.raises(TaloArgumentError, match="cannot decide the probe rounds of select_rule=confirm"):
        TaloConfig.pop_from({"select_rule": "confirm", "select_base_rule": "confirm"})
    with pytest.raises(TaloArgumentError, match="sweep=select prunes"):
        TaloConfig.pop_from({"select_rule": "confirm", "select_base_rule": "sign_test", "sweep": "select"})
    assert TaloConfig.pop_from({"select_rule": "confirm", "sweep": "select"}).selection_rule().base_rule == "gain"


# ---- through the real lmms-eval CLI ----

N_CLI_DOCS, CLI_SHOTS = 30, 4  # pool 10: round 0 draws 4 (threshold -1 always clears), 6 confirm


def _mc_task(tmp_path):
    choices = [["red", "blue", "green"], ["one", "two", "three"]]
    docs = [choices[i % 2] for i in range(N_CLI_DOCS)]
    return write_image_task(
        tmp_path / "mc",
        "talo_confirm_mc",
        [c[i % 3] for i, c in enumerate(docs)],
        output_type="multiple_choice",
        choices=docs,
    ), docs


@pytest.mark.e2e
def test_lmms_eval_cli_confirms_on_the_scores_under_select_stat_margin(tmp_path, tiny_model_dir):
    folder, _ = _mc_task(tmp_path)
    model_dir = tiny_model_dir("smollm2")
    report_path, state = tmp_path / "report.json", tmp_path / "state"
    args = (
        f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['smollm2']},probe_shots={CLI_SHOTS},threshold=-1,"
        f"select_rule=confirm,select_stat=margin,state_dir={state},report={report_path}"
    )
    run_lmms_eval("talo_huggingface", args, "talo_confirm_mc", folder, tmp_path / "out", "--force_simple")
    group = json.loads(report_path.read_text())["subtasks"][0]
    record = group["confirmation"]
    probed = {str(d) for r in group["rounds"] for d in r["probe_docs"]}
    assert record["stat"] == "score" and len(record["docs"]) == 6
    assert set(record["docs"]) <= {str(d) for d in group["pool"]} and not set(record["docs"]) & probed
    assert record["p_value"] == paired_flip_p(
        [record["reference_scores"][d] for d in record["docs"]], [record["knocked_scores"][d] for d in record["docs"]]
    )
    assert record["kept"] == (record["p_value"] < 0.05) and record["reason"].startswith("confirm: layer")
    assert group["selected_layers"] == (record["layers"] if record["kept"] else [])
    # the confirmation's scores are the stored passes' scores
    stored = [json.loads(line) for p in state.glob("*.jsonl") for line in p.read_text().splitlines()]
    checked = set()
    for line in stored:
        if line["doc"] in record["docs"] and line["variant"] == "base":
            assert record["reference_scores"][line["doc"]] == line["score"]
            checked.add(line["doc"])
    assert checked == set(record["docs"]), "every confirmation doc's base score is checked against the store"
    assert set(group["interaction_holm_p"]) == set(group["interaction_vector"])


@pytest.mark.e2e
def test_margin_on_a_generation_task_is_refused_with_the_fix(tmp_path, tiny_model_dir):
    folder = write_image_task(tmp_path / "gen", "talo_confirm_gen", [f"a{i % 3}" for i in range(N_CLI_DOCS)])
    args = (
        f"pretrained={tiny_model_dir('smollm2')},{LMMS_EVAL_MODEL_ARGS['smollm2']},probe_shots={CLI_SHOTS},"
        f"select_stat=margin,state_dir=none"
    )
    with pytest.raises(
        AssertionError, match="select_stat=margin needs a likelihood-scored multiple-choice task.*use select_stat=score"
    ):
        run_lmms_eval("talo_huggingface", args, "talo_confirm_gen", folder, tmp_path / "out", "--force_simple")


@pytest.mark.e2e
def test_both_harnesses_give_the_same_margins(tmp_path, tiny_model_dir):
    """lmms-eval answers losses and lm-eval log-likelihoods (lmms_talo.harness.base: likelihood_is_loss):
    the same BIG-bench-style task through both CLIs gives the same confirmation docs and margins."""
    import subprocess
    import sys

    from cli_tasks import cli_env

    from lmms_talo.demo.bigbench import convert_task

    words = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "haze"]
    examples = [
        {
            "input": f"Which word follows {words[i % 8]} {i}?",
            "target_scores": {words[(i + j) % 8]: int(j == 0) for j in range(3)},
        }
        for i in range(N_CLI_DOCS)
    ]
    convert_task({"examples": examples}, "margins", tmp_path / "tasks")
    model_dir = tiny_model_dir("llama")
    talo = f"probe_shots={CLI_SHOTS},threshold=-1,select_rule=confirm,select_stat=margin,state_dir=none"
    run_lmms_eval(
        "talo_huggingface",
        f"pretrained={model_dir},device=cpu,chat_template=false,{talo},report={tmp_path / 'lmms.json'}",
        "bb_margins",
        tmp_path / "tasks" / "lmms",
        tmp_path / "lmms_out",
        "--force_simple",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_talo",
            "lm-eval",
            "--model",
            "talo_hf",
            "--model_args",
            f"pretrained={model_dir},{talo},report={tmp_path / 'lm.json'}",
            "--tasks",
            "bb_margins",
            "--include_path",
            str(tmp_path / "tasks" / "lm_eval"),
            "--output_path",
            str(tmp_path / "lm_out"),
            "--batch_size",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lmms, lm = (
        json.loads((tmp_path / f"{name}.json").read_text())["subtasks"][0]["confirmation"] for name in ("lmms", "lm")
    )
    assert lmms["docs"] == lm["docs"] and len(lmms["docs"]) == 6 and lmms["layers"] == lm["layers"]
    for key in ("reference", "knocked"):
        assert lmms[key] == pytest.approx(lm[key], abs=1e-4)
    assert any(v != 0 for v in lmms["reference"].values())  # a sign error could not pass as equal
