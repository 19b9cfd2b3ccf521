"""The analysis (`lmms-talo analyze`): statistics on hand-built reports with known answers, and the
command end to end on reports written by TaLo runs of a tiny model through the real lmms-eval CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmms_talo.analysis.agreement import between_runs, intervention_pairs
from lmms_talo.analysis.clustering import adjusted_rand_index, bootstrap_stability, cluster
from lmms_talo.analysis.robustness import selection_distribution
from lmms_talo.analysis.rule_comparison import rule_choices, summarize
from lmms_talo.analysis.transfer import transfer_matrix
from lmms_talo.harness.heldout import HeldOutScores
from lmms_talo.method.config import TaloConfig
from lmms_talo.method.probe_split import FIRST_DRAW, ProbeRound
from lmms_talo.method.selection import Selection
from lmms_talo.method.sweep import SweepResult
from lmms_talo.outputs.report import GroupReport, TaloReport
from lmms_talo.outputs.report_reader import ReportError, load_runs

# --- hand-built reports -------------------------------------------------------------------------


def doc_scores_with_gains(gains: dict, n_docs: int) -> tuple[dict, dict]:
    """Binary per-doc scores whose mean gain per layer is exactly gains[layer] (a multiple of 1/n_docs,
    at most 0.5 in size): half the docs are right under the full model; a positive gain turns wrong
    docs right, a negative one turns right docs wrong."""
    half = n_docs // 2
    base = {str(d): float(d < half) for d in range(n_docs)}
    layers = {}
    for layer, gain in gains.items():
        flips = round(abs(gain) * n_docs)
        assert flips <= half and abs(flips / n_docs - abs(gain)) < 1e-9, (
            "gain must be a multiple of 1/n_docs, |gain| <= 0.5"
        )
        scores = dict(base)
        changed = range(half, half + flips) if gain > 0 else range(flips)
        for d in changed:
            scores[str(d)] = 1.0 - scores[str(d)]
        layers[layer] = scores
    return base, layers


def subtask_report(
    task: str, name: str, base: dict, layers: dict, test_scores: dict | None = None, pool: list | None = None
) -> GroupReport:
    """A GroupReport filled through the adapter's own recording path (decided/scored/scored_variant).
    `test_scores`: variant label ('base', '3') -> {doc: score} on test docs."""
    from lmms_talo.method.rules import make_rule

    docs = list(base)
    outcome = make_rule("gain").decide(docs, base, layers, stream=name)
    result = SweepResult(
        tuple(layers),
        [outcome],
        {"base": dict(base), **{str(l): dict(s) for l, s in layers.items()}},
        pruned=[{}],
        probe_rounds=[ProbeRound(0, tuple(docs), FIRST_DRAW)],
    )
    report = GroupReport(
        task=task,
        subtask=name,
        category=name.split("/")[-1],
        request_type="generate_until",
        pool=pool or docs,
        test_doc_count=len(next(iter((test_scores or {"": {}}).values()))),
    )
    report.decided(Selection(() if outcome.selected is None else (outcome.selected,), sweep=result))
    if test_scores:
        pool_set = set(report.pool)

        def scored(scores):  # the task's metric: a mean over the test docs, as `acc` aggregates
            test = [s for d, s in scores.items() if d not in pool_set]
            return HeldOutScores(scores, pool_set, {"acc,none": sum(test) / len(test)}, "acc,none")

        report.scored("base", scored(test_scores["base"]))
        report.scored("talo", scored(test_scores[report.selected_layers and str(report.selected_layers[0]) or "base"]))
        for label, scores in test_scores.items():
            report.scored_variant(label, scored(scores))
    return report


def write_run(path, groups: list[GroupReport], digest: str = "d1", **config) -> str:
    report = TaloReport(
        {"name_or_path": "hand/built-model", "class": "Hand", "num_layers": 8, "digest": digest},
        TaloConfig(**config).to_dict(),
        "Hand",
    )
    for group in groups:
        report.add(group)
    report.config["report"] = str(path)
    report.write()
    return str(path)


PROTOTYPES = {  # three planted capabilities over layers 1..7, gains in units of 1/20
    "a": [8, 6, 2, -2, -4, -6, -8],
    "b": [-8, -6, -2, 2, 4, 6, 8],
    "c": [-6, 4, 8, 4, -6, 0, -6],
}


def planted_run(tmp_path, intervention="zero", noise_seed=7):
    """Twelve sub-tasks in three planted clusters; each is its prototype plus a one-doc change at one layer."""
    rng = np.random.default_rng(noise_seed)
    groups, truth = [], []
    for cluster_name, proto in PROTOTYPES.items():
        for i in range(4):
            units = list(proto)
            units[int(rng.integers(0, 7))] += int(rng.choice([-1, 1]))
            gains = {layer: u / 40 for layer, u in zip(range(1, 8), units)}
            base, layers = doc_scores_with_gains(gains, 40)
            groups.append(subtask_report(f"bench_{cluster_name}", f"bench_{cluster_name}/s{i}", base, layers))
            truth.append(cluster_name)
    return write_run(tmp_path / f"{intervention}.json", groups, intervention=intervention), truth


# --- statistics with known answers --------------------------------------------------------------


def test_adjusted_rand_index_matches_known_values():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 9, 9]) == 1.0
    assert adjusted_rand_index([0, 0, 0, 0], [1, 1, 1, 1]) == 1.0
    # Hubert & Arabie's example value for this pair, as sklearn computes it: 0.5714285714285714
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 4, 30), rng.integers(0, 5, 30)
        assert adjusted_rand_index(a, b) == pytest.approx(sklearn.adjusted_rand_score(a, b), abs=1e-12)


def test_planted_clusters_are_recovered_and_stable(tmp_path):
    path, truth = planted_run(tmp_path)
    (run,) = load_runs([path])
    subs = run.swept_subtasks()
    differences = [s.differences() for s in subs]
    result = cluster([s.name for s in subs], np.stack([d.mean(axis=1) for d in differences]), 3)
    assert adjusted_rand_index(result.labels, truth) == 1.0
    within = [result.corr[i, j] for i in range(12) for j in range(12) if i != j and truth[i] == truth[j]]
    assert min(within) > 0.9
    stability = bootstrap_stability(differences, result, resamples=50, seed=0)
    assert stability.summary()["mean"] > 0.8
    same = np.array([[t == u for u in truth] for t in truth])
    assert stability.co_clustered[same].mean() > stability.co_clustered[~same].mean() + 0.5


def test_recomputed_interaction_vectors_equal_the_stored_ones(tmp_path):
    path, _ = planted_run(tmp_path)
    (run,) = load_runs([path])
    for sub in run.subtasks:
        assert {str(l): g for l, g in sub.gains().items()} == sub.data["interaction_vector"]


def test_identical_interventions_agree_perfectly_and_others_less(tmp_path):
    zero, _ = planted_run(tmp_path, "zero")
    uniform, _ = planted_run(tmp_path, "uniform")
    runs = load_runs([zero, uniform])
    (pair,) = intervention_pairs(runs)
    result = between_runs(*pair)
    assert len(result.x) == 12 * 7
    assert result.pearson == pytest.approx(1.0, abs=1e-12)
    assert result.spearman == pytest.approx(1.0, abs=1e-12)
    # Other one-doc changes on top of the same prototypes: close, but no longer identical.
    other, _ = planted_run(tmp_path, "mean", noise_seed=8)
    result = between_runs(*intervention_pairs(load_runs([zero, other]))[0])
    assert 0.9 < result.pearson < 1.0 and 0.9 < result.spearman < 1.0


def test_runs_on_other_probe_splits_are_not_paired(tmp_path):
    zero, _ = planted_run(tmp_path, "zero")
    other = tmp_path / "other"
    other.mkdir()
    text = Path(zero).read_text().replace('"intervention": "zero"', '"intervention": "uniform"')
    (other / "r.json").write_text(text.replace('"probe_shots": 10', '"probe_shots": 15'))
    assert intervention_pairs(load_runs([zero, other / "r.json"])) == []
    (other / "r.json").write_text(text)
    assert len(intervention_pairs(load_runs([zero, other / "r.json"]))) == 1


def test_a_layer_that_wins_every_resample_gets_100_percent(tmp_path):
    # Layer 3 turns every wrong doc right and touches no right doc: every resample with a wrong doc
    # in it picks layer 3; other layers only ever lose.
    base = {str(d): float(d % 2) for d in range(20)}
    layers = {1: {d: 0.0 for d in base}, 2: dict(base), 3: {d: 1.0 for d in base}}
    path = write_run(tmp_path / "r.json", [subtask_report("t", "t/x", base, layers)])
    (run,) = load_runs([path])
    dist = selection_distribution(run.subtasks[0], run.rule("gain"), resamples=300, seed=1)
    assert dist.chosen == 3
    assert dist.win_rate == 1.0
    assert dist.counts == {3: 300}


def test_a_noise_layer_wins_a_share_of_resamples(tmp_path):
    base = {str(d): 0.0 for d in range(10)}
    layers = {1: {**base, "0": 1.0}, 2: {**base, "1": 1.0, "2": 1.0, "3": 0.0}}
    path = write_run(tmp_path / "r.json", [subtask_report("t", "t/x", base, layers)])
    (run,) = load_runs([path])
    dist = selection_distribution(run.subtasks[0], run.rule("gain"), resamples=400, seed=0)
    assert dist.chosen == 2
    assert 0.5 < dist.win_rate < 1.0
    assert dist.counts[1] > 0 and sum(dist.counts.values()) == 400


def _transfer_run(tmp_path):
    """Two sub-tasks: A selects layer 1, B selects layer 2; test scores known for every layer."""
    test_docs = [str(d) for d in range(100, 110)]

    def scores(right: int) -> dict:
        return {d: float(i < right) for i, d in enumerate(test_docs)}

    a_base, a_layers = doc_scores_with_gains({1: 0.3, 2: -0.1}, 10)
    b_base, b_layers = doc_scores_with_gains({1: -0.2, 2: 0.4}, 10)
    a = subtask_report("t", "t/A", a_base, a_layers, {"base": scores(5), "1": scores(8), "2": scores(4)})
    b = subtask_report("t", "t/B", b_base, b_layers, {"base": scores(3), "1": scores(1), "2": scores(6)})
    return write_run(tmp_path / "transfer.json", [a, b], digest="d2", transfer=True)


def test_transfer_modes_score_the_base_model_too():
    assert TaloConfig.pop_from({"transfer": "true"}).compare_base
    assert TaloConfig.pop_from({"test_all_layers": "1"}).compare_base
    assert not TaloConfig.pop_from({}).compare_base


def test_transfer_matrix_holds_test_gains_of_each_selection_on_each_subtask(tmp_path):
    (run,) = load_runs([_transfer_run(tmp_path)])
    matrix = transfer_matrix(run)
    assert matrix.sources == ["t/A", "t/B"] and matrix.source_labels == ["1", "2"]
    assert np.allclose(matrix.gains, [[0.3, -0.2], [-0.1, 0.3]])


def test_rule_comparison_looks_up_each_rules_choice_on_the_test_docs(tmp_path):
    (run,) = load_runs([_transfer_run(tmp_path)])
    choices = {(c.subtask, c.rule): c for c in rule_choices(run)}
    assert choices[("t/A", "gain")].layer == 1 and choices[("t/A", "gain")].test_gain == pytest.approx(0.3)
    # 3 discordant docs of 10, all for layer 1: sign test p = 1/8, not below 0.05 -> keep the model.
    assert choices[("t/A", "sign_test")].layer is None and choices[("t/A", "sign_test")].test_gain == 0.0
    # 4 of 4 for layer 2 on B: p = 1/16, still not below 0.05.
    assert choices[("t/B", "sign_test")].layer is None
    summary = {s.rule: s for s in summarize(list(choices.values()))}
    assert (summary["gain"].knocked_out, summary["gain"].helped, summary["gain"].hurt) == (2, 2, 0)
    assert summary["gain"].mean_test_gain == pytest.approx(0.3)
    assert summary["sign_test"].knocked_out == 0 and summary["sign_test"].mean_test_gain == 0.0


@pytest.mark.e2e
def test_report_command_writes_every_section_and_figure(tmp_path):
    from lmms_talo.cli import main

    zero, _ = planted_run(tmp_path, "zero")
    uniform, _ = planted_run(tmp_path, "uniform")
    transfer = _transfer_run(tmp_path)
    out = tmp_path / "analysis"
    assert main(["analyze", zero, uniform, transfer, "-o", str(out), "--resamples", "20"]) == 0
    markdown = (out / "report.md").read_text()
    for heading in (
        "Results on the test docs",
        "Task-layer interaction vectors",
        "Clusters of interaction vectors",
        "Robustness of the selection",
        "Cross-task transfer",
        "Selection rules on the test docs",
        "Agreement between interventions",
    ):
        assert heading in markdown
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "run1_interaction_heatmap.png" in pngs and "agreement_run1_run2.png" in pngs
    assert "run1_correlation.png" in pngs and "run1_cluster_stability.png" in pngs
    assert "run3_transfer.png" in pngs and "run1_selection_robustness.png" in pngs
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"({png.name})" in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs) and 'src="run' not in page
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["agreement"][0]["pearson"] == pytest.approx(1.0)
    assert np.allclose(numbers["runs"]["run3"]["transfer"]["gains"], [[0.3, -0.2], [-0.1, 0.3]])


def test_report_command_names_bad_input(tmp_path, capsys):
    from lmms_talo.cli import main

    assert main(["analyze", str(tmp_path / "missing.json"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "holds no talo_report.json" in capsys.readouterr().err
    (tmp_path / "x.json").write_text('{"results": {}}')
    with pytest.raises(ReportError, match="not a TaLo report"):
        load_runs([tmp_path / "x.json"])


# --- end to end: TaLo runs of a tiny model through the real lmms-eval CLI, then `lmms-talo analyze` ---

N_PER_CATEGORY = 9
SHOTS = 3
CATEGORIES = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model_dir):
    """Two TaLo runs of tiny LLaVA on a four-category task whose answers are what the model says with
    layer 2 knocked out (all of alpha and beta, every other doc of gamma, none of delta):
    run A zero-knockout with the gain rule, max_layers=2, transfer and test_all_layers; run B the
    uniform intervention with the maxt rule. Returns (report A, report B, their folder)."""
    from cli_tasks import run_lmms_eval, samples, write_image_task
    from tiny_models import LMMS_EVAL_MODEL_ARGS

    root = tmp_path_factory.mktemp("analysis_e2e")
    model_dir = tiny_model_dir("llava")
    common = f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots={SHOTS},state_dir=none"
    n = N_PER_CATEGORY * len(CATEGORIES)
    # The seed task's docs are the first docs of the analysis task (same image and question per index).
    seed_task = write_image_task(root / "seed_task", "talo_seed", ["?"] * (n - N_PER_CATEGORY))
    run_lmms_eval("talo_llava", f"{common},force_layer=2", "talo_seed", seed_task, root / "seed_out", "--force_simple")
    said = {
        s["doc_id"]: (s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]).strip()
        for s in samples(root / "seed_out", "talo_seed")
    }
    answers, categories = [], []
    for i in range(n):
        category = CATEGORIES[i // N_PER_CATEGORY]
        keep = category in ("alpha", "beta") or (category == "gamma" and i % 2 == 0)
        answers.append(said[i] if keep else "?")  # delta (the last category) is never right
        categories.append(category)
    task = write_image_task(root / "task", "talo_analysis", answers, categories)
    reports = root / "reports"
    by_category = "granularity=category,category_field=category"
    run_lmms_eval(
        "talo_llava",
        f"{common},{by_category},max_layers=2,transfer=true,test_all_layers=true,"
        f"report={reports / 'zero' / 'talo_report.json'}",
        "talo_analysis",
        task,
        root / "out_zero",
        "--force_simple",
    )
    run_lmms_eval(
        "talo_llava",
        f"{common},{by_category},intervention=uniform,select_rule=maxt,compare_base=true,"
        f"report={reports / 'uniform' / 'talo_report.json'}",
        "talo_analysis",
        task,
        root / "out_uniform",
        "--force_simple",
    )
    return (
        json.loads((reports / "zero" / "talo_report.json").read_text()),
        json.loads((reports / "uniform" / "talo_report.json").read_text()),
        reports,
    )


@pytest.mark.e2e
def test_transfer_and_all_layer_modes_record_test_scores_of_every_variant(tiny_runs):
    zero, _, _ = tiny_runs
    subtasks = {g["subtask"]: g for g in zero["subtasks"]}
    assert set(subtasks) == {f"talo_analysis/{c}" for c in CATEGORIES}
    selected = {"+".join(map(str, g["selected_layers"])) for g in zero["subtasks"] if g["selected_layers"]}
    for g in zero["subtasks"]:
        test_docs = set(map(str, range(N_PER_CATEGORY * len(CATEGORIES)))) - set(map(str, g["pool"]))
        assert set(g["test_variants"]) >= {"base", "1", "2", "3"} | selected
        for entry in g["test_variants"].values():
            assert {d for d in entry["doc_scores"] if d not in set(map(str, g["pool"]))} <= test_docs
            assert entry["n"] == g["test_doc_count"] == N_PER_CATEGORY - SHOTS
        own = "+".join(map(str, g["selected_layers"])) or "base"
        assert g["test_variants"][own]["score"] == g["test"]["talo"]["score"]
        assert g["test_variants"]["base"]["score"] == g["test"]["base"]["score"]
    # The answers are layer 2's: under layer 2 the alpha and beta test docs are all right.
    for name in ("alpha", "beta"):
        assert subtasks[f"talo_analysis/{name}"]["test_variants"]["2"]["score"] == 1.0
        assert subtasks[f"talo_analysis/{name}"]["selected_layer"] == 2


@pytest.mark.e2e
def test_two_layer_search_is_recorded_with_its_cost(tiny_runs):
    zero, _, _ = tiny_runs
    searched = [g for g in zero["subtasks"] if g["selected_layer"] is not None]
    assert searched
    for g in searched:
        (stage,) = g["layer_stages"]
        assert stage["base_layers"] == [g["selected_layer"]] and stage["passes"] == 2
        assert stage["docs_computed"] + stage["docs_reused"] == 3 * SHOTS
        pairs = {"+".join(map(str, sorted((g["selected_layer"], l)))) for l in (1, 2, 3) if l != g["selected_layer"]}
        assert pairs <= set(g["probe_doc_scores"])
        assert g["selected_layers"] == sorted(
            [g["selected_layer"]] + ([stage["selected"]] if stage["selected"] else [])
        )
    # alpha: layer 2 is already perfect on the probe docs, so no pair can beat it.
    alpha = next(g for g in searched if g["subtask"].endswith("alpha"))
    assert alpha["layer_stages"][0]["selected"] is None and alpha["selected_layers"] == [2]


@pytest.mark.e2e
def test_guarded_rule_decisions_are_reproduced_offline(tiny_runs):
    _, uniform, reports = tiny_runs
    assert uniform["config"]["select_rule"] == "maxt"
    (run,) = load_runs([reports / "uniform"])
    swept = [sub for sub in run.subtasks if sub.swept]
    assert "talo_analysis/delta" in {sub.name for sub in swept}, "delta is never right: its baseline is not perfect"
    for sub in swept:
        outcome = sub.decide(run.rule())
        assert outcome.selected == sub.data["selected_layer"]
        assert {str(l): v for l, v in outcome.evidence.items()} == sub.data["rounds"][-1]["evidence"]
        assert {str(l): g for l, g in sub.gains().items()} == sub.data["interaction_vector"]


@pytest.mark.e2e
def test_report_command_end_to_end_on_tiny_model_runs(tiny_runs, tmp_path):
    from lmms_talo.cli import main

    _, _, reports = tiny_runs
    out = tmp_path / "analysis"
    assert main(["analyze", str(reports), "-o", str(out), "--resamples", "30"]) == 0
    markdown = (out / "report.md").read_text()
    for name in CATEGORIES:
        assert f"talo_analysis/{name}" in markdown
    for heading in (
        "Results on the test docs",
        "Multi-layer search",
        "Cross-task transfer",
        "Selection rules on the test docs",
        "Agreement between interventions",
    ):
        assert heading in markdown
    numbers = json.loads((out / "analysis.json").read_text())
    (agreement,) = numbers["agreement"]
    assert agreement["interventions"] == ["uniform", "zero"] or agreement["interventions"] == ["zero", "uniform"]
    assert agreement["n"] == len(CATEGORIES) * 3
    zero_key = next(k for k, r in numbers["runs"].items() if "zero" in r["label"])
    summary = {s["rule"]: s for s in numbers["runs"][zero_key]["rules"]["summary"]}
    assert all(s["unknown"] == 0 for s in summary.values())  # test_all_layers scored every choice
    assert numbers["runs"][zero_key]["transfer"]["gains"]
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 8 and all(p.stat().st_size > 5000 for p in pngs)
    assert (out / "report.html").read_text().count("data:image/png;base64,") == len(pngs)


def test_analyze_never_advises_an_arg_the_run_already_used():
    """Missing test scores are explained by what the run was: a probe log holds none; a transfer run
    leaves the other request type's cells unscored; only a run without the arg is told to use it."""
    from lmms_talo.analysis.build import _why_unscored
    from lmms_talo.outputs.report_reader import Run

    def run(config, source=""):
        return Run(Path("r.json"), {"config": config, "source": source})

    assert "a probe log holds the probe passes only" in _why_unscored(
        run({}, "probe log x.jsonl, re-decided"), "compare_base"
    )
    assert "transfer stays within one request type" in _why_unscored(run({"transfer": True}), "transfer")
    assert "run TaLo with `transfer=true`" in _why_unscored(run({}), "transfer")
    assert "the run had `compare_base=true`" in _why_unscored(run({"compare_base": True}), "compare_base")
    assert "run TaLo with `compare_base=true`" in _why_unscored(run({"compare_base": False}), "compare_base")
