"""The report's test metric is the task's own aggregation, never a judge; request types TaLo cannot
probe stop the run. (The bundled talo_* tasks' figures are checked against lmms-eval's printed ones
in test_task_configs.py.)"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import benchmark_fixtures as fixtures
import pytest
from cli_tasks import write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.harness.benchmark_metric import NEEDS_JUDGE, benchmark_metrics, needs_judge, primary
from lmms_talo.harness.heldout import HeldOutScores
from lmms_talo.outputs.report import GroupReport, summary_table


def _stock_task(tmp_path_factory, name: str, builtin: str, split: str, data_name: str, dataset):
    """lmms-eval's own task `builtin` (a YAML under lmms_eval/tasks), renamed `name`, on local data."""
    import lmms_eval
    from lmms_eval.tasks import TaskManager, get_task_dict

    folder = tmp_path_factory.mktemp(name)
    data = fixtures.write_fixture(folder, data_name, dataset)
    path = Path(lmms_eval.__file__).parent / "tasks" / builtin
    (folder / f"{name}.yaml").write_text(
        textwrap.dedent(f"""
        include: {path}
        task: {name}
        dataset_path: parquet
        dataset_name: null
        dataset_kwargs:
          data_files:
            {split}: {data}
        """)
    )
    return get_task_dict([name], TaskManager(include_path=str(folder)))[name]


@pytest.fixture(scope="module")
def stock_mmbench(tmp_path_factory):
    """lmms-eval's own mmbench_en_dev task (GPT-judged metric + submission file) on local MMBench-shaped data."""
    dataset = fixtures.mmbench_en_dev({"ocr": 6})
    return _stock_task(
        tmp_path_factory, "stock_mmbench", "mmbench/mmbench_en_dev.yaml", "dev", "mmbench_en_dev", dataset
    )


def test_judge_aggregations_are_detected_by_their_code_not_their_docstring():
    from lmms_eval.api.metrics import mean
    from lmms_eval.tasks.mmbench import en_utils
    from lmms_eval.tasks.mmmu.utils import mmmu_aggregate_results
    from lmms_eval.tasks.mmstar.utils import mmstar_aggregate_results

    from lmms_talo.task_configs import benchmarks as B

    assert needs_judge(en_utils.mmbench_aggregate_dev_results_eval)  # eval_method="openai"
    assert not needs_judge(en_utils.mmbench_aggregate_dev_results_static)  # its docstring says "no OpenAI API needed"
    for aggregate in (
        mean,
        mmstar_aggregate_results,
        mmmu_aggregate_results,
        B.mmbench_static_accuracy,
        B.talo_mmbench_en_dev_aggregation,
        B.talo_mmstar_aggregation,
    ):
        assert not needs_judge(aggregate), aggregate.__name__


@pytest.mark.e2e
def test_stock_mmbench_judge_metric_is_not_computed_and_its_files_land_in_a_scratch_folder(
    stock_mmbench, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stock_mmbench, "args", SimpleNamespace(output_path=str(out)), raising=False)
    docs = stock_mmbench.eval_docs
    records = {d: {"none": stock_mmbench.process_results(docs[d], [docs[d]["answer"]])} for d in range(len(docs))}

    metrics = benchmark_metrics(stock_mmbench, records)

    assert list(metrics) == ["gpt_eval_score,none", "submission,none"]  # metric_list order
    assert metrics["gpt_eval_score,none"] == NEEDS_JUDGE
    assert metrics["submission,none"] is None  # it ran (it returns nothing) ...
    assert os.listdir(tmp_path) == []  # ... and wrote its xlsx neither under output_path nor in the current folder
    assert os.getcwd() == str(tmp_path)
    assert primary(stock_mmbench, metrics) == ("gpt_eval_score,none", None)

    # the report keeps the per-doc mean beside the missing metric, and the summary says why it is missing
    report = GroupReport(
        task="stock_mmbench",
        subtask="stock_mmbench",
        category=None,
        request_type="generate_until",
        pool=[0],
        test_doc_count=len(docs) - 1,
    )
    report.scored("talo", HeldOutScores({d: 1.0 for d in records}, {0}, metrics, "gpt_eval_score,none"))
    entry = report.to_dict()["test"]["talo"]
    assert (entry["score"], entry["doc_mean"], entry["n"]) == (None, 1.0, len(docs) - 1)
    row = summary_table({"subtasks": [report.to_dict()]}).splitlines()[-1].split()
    assert row[row.index("gpt_eval_score") + 1 : row.index("gpt_eval_score") + 3] == ["(judge)", "-"]


def test_every_lmms_eval_request_type_is_answered_or_refused():
    from lmms_eval.api.task import ALL_OUTPUT_TYPES

    from lmms_talo.harness.mixin import TaloMixin

    handled = {"generate_until", "loglikelihood", "multiple_choice"}  # multiple_choice sends loglikelihood
    for reqtype in set(ALL_OUTPUT_TYPES) - handled:
        assert reqtype in TaloMixin.__dict__, f"{reqtype}: add it to TaloMixin (answered under TaLo, or refused)"


@pytest.mark.e2e
def test_multi_round_requests_stop_the_run_naming_the_type_and_task(tiny_model_dir, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from lmms_talo.harness.mixin import UnsupportedRequestType

    folder = write_image_task(tmp_path, "talo_dialogue", ["a"] * 6)
    yaml = folder / "talo_dialogue.yaml"
    yaml.write_text(yaml.read_text().replace("output_type: generate_until", "output_type: generate_until_multi_round"))
    cls = get_model("talo_llava", force_simple=True)
    lm = cls.create_from_arg_string(
        f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},state_dir=none"
    )
    with pytest.raises(
        UnsupportedRequestType,
        match="task talo_dialogue sends generate_until_multi_round requests, which TaLo does not handle",
    ):
        simple_evaluate(
            model=lm, tasks=["talo_dialogue"], task_manager=TaskManager(include_path=str(folder)), batch_size=1
        )


@pytest.fixture(scope="module")
def stock_mmstar(tmp_path_factory):
    """lmms-eval's own mmstar task (each category's metric declared before `average`) on local data."""
    dataset = fixtures.mmstar({"coarse perception": 4, "math": 6})
    return _stock_task(tmp_path_factory, "stock_mmstar", "mmstar/mmstar.yaml", "val", "mmstar", dataset)


@pytest.mark.e2e
def test_the_primary_metric_of_stock_mmstar_is_its_aggregate_not_the_first_category(stock_mmstar):
    """granularity=task: every category's records are there, but "coarse perception" covers only
    its own docs; the task's aggregate is `average`, which covers them all."""
    docs = stock_mmstar.eval_docs
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    answers = [
        docs[d]["answer"] if docs[d]["category"] == "coarse perception" else wrong[docs[d]["answer"]]
        for d in range(len(docs))
    ]
    records = {d: {"none": stock_mmstar.process_results(docs[d], [answers[d]])} for d in range(len(docs))}
    metrics = benchmark_metrics(stock_mmstar, records)
    assert list(metrics)[0] == "coarse perception,none" and metrics["coarse perception,none"] == 1.0
    assert primary(stock_mmstar, metrics, records) == ("average,none", metrics["average,none"])
    assert metrics["average,none"] < 1.0
    one_category = {d: r for d, r in records.items() if docs[d]["category"] == "math"}
    math_metrics = benchmark_metrics(stock_mmstar, one_category)
    assert primary(stock_mmstar, math_metrics, one_category)[0] == "math,none", "a category sub-task's own metric"


def test_a_per_doc_score_outside_0_1_is_an_error_unless_the_task_declares_a_percentage():
    from lmms_talo.harness.scoring import ScoringError, TaskScorer

    def task(percent=None):
        metadata = {"talo": {"percent_metrics": percent}} if percent else {}
        return SimpleNamespace(config=SimpleNamespace(metric_list=[{"metric": "rating"}], metadata=metadata))

    with pytest.raises(ScoringError, match=r"metric 'rating' gave 7 for a doc.*percent_metrics: \[rating\]"):
        TaskScorer(task(), "t").primary_metric({"rating": 7})
    assert TaskScorer(task(["rating"]), "t").percent_metrics == {"rating"}
    scorer = TaskScorer(task(["rating"]), "t")
    assert scorer.primary_metric({"rating": 70.0}) == "rating"
    with pytest.raises(ScoringError, match="metric 'cider' gave 1.3"):
        TaskScorer(SimpleNamespace(config=SimpleNamespace(metric_list=["cider"], metadata={})), "t").primary_metric(
            {"cider": 1.3}
        )
