"""The bundled talo_* task configs: generated from lmms-eval's own tasks, honest splits, discoverable.

End to end, the real lmms-eval CLI runs a tiny LLaVA on fixture copies of the five benchmarks (same
columns and feature types as the real datasets). The model is restricted to answering one letter
A-D, so lmms-eval's own scorers give varied per-doc scores and pool exclusion is visible.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import benchmark_fixtures as fixtures
import pytest
from cli_tasks import cli_env, run_lmms_eval, samples
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.harness import evaluation_scope, pool_exclusion
from lmms_talo.method.probe_split import pool_size, split_subtask
from lmms_talo.task_configs import benchmarks as B
from lmms_talo.task_configs import generate

SHOTS = 3
N = 24  # docs per sub-task in the end-to-end runs: pool min(24 // 3, 4 * 3) = 8, test 16
LMMS_TALO = [sys.executable, "-m", "lmms_talo"]
RUN_TASKS = {  # sub-task -> its benchmark: two per benchmark (and MMMU's discipline grouping)
    "talo_mmstar_math": B.MMSTAR,
    "talo_mmstar_coarse_perception": B.MMSTAR,
    "talo_mmbench_en_dev_ocr": B.MMBENCH_EN_DEV,
    "talo_mmbench_en_dev_image_scene": B.MMBENCH_EN_DEV,
    "talo_mmmu_val_art": B.MMMU_VAL,
    "talo_mmmu_val_discipline_science": B.MMMU_VAL_DISCIPLINE,
    "talo_scienceqa_img_magnets": B.SCIENCEQA_IMG,
    "talo_scienceqa_img_materials": B.SCIENCEQA_IMG,
    "talo_seedbench_instances_counting": B.SEEDBENCH,
    "talo_seedbench_text_understanding": B.SEEDBENCH,
}


def _lmms_talo(*args, env=None, check=True):
    proc = subprocess.run([*LMMS_TALO, *args], capture_output=True, text=True, env=env or cli_env(), timeout=900)
    if check:
        assert proc.returncode == 0, f"lmms-talo {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory) -> dict[str, Path]:
    """Parquet stand-ins for each benchmark: the run's categories with N docs, a few more that are small."""
    folder = tmp_path_factory.mktemp("benchmark_data")
    made = {
        "mmstar": fixtures.mmstar({"math": N, "coarse perception": N, "instance reasoning": 5}),
        "mmbench_en_dev": fixtures.mmbench_en_dev({"ocr": N, "image_scene": N, "physical_relation": 4}),
        "mmmu_val": fixtures.mmmu_val({"Art": N, "Math": N, "Physics": 4}),
        "scienceqa_img": fixtures.scienceqa_img({"Magnets": N, "Materials": N, "Not a listed category": 3}),
        "seedbench": fixtures.seedbench({5: N, 9: N, 1: 4}),
    }
    return {bench: fixtures.write_fixture(folder, bench, ds) for bench, ds in made.items()}


def _data_args(fixture_data, *benches) -> list[str]:
    return [arg for bench in benches or fixture_data for arg in ("--data", f"{bench}={fixture_data[bench]}")]


@pytest.fixture(scope="module")
def letter_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny LLaVA, allowed to generate only the tokens 'A'-'D': one-letter answers every scorer reads."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("letter_llava") / "model"
    shutil.copytree(tiny_model_dir("llava"), folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    letters = {tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"}
    assert len(letters) == 4 and tokenizer.unk_token_id not in letters
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["suppress_tokens"] = [i for i in range(len(tokenizer)) if i not in letters]
    config_path.write_text(json.dumps(config))
    return folder


# --- the configs themselves ---


def test_generated_configs_are_current():
    """Regenerating from benchmarks.py and the installed lmms-eval gives exactly the shipped files."""
    shipped = generate.bundled_folder()
    for bench in B.BENCHMARKS:
        configs = generate.benchmark_configs(bench)
        on_disk = sorted(p.name for p in (shipped / bench.folder).glob("*.yaml"))
        assert on_disk == sorted(configs), f"{bench.folder}: run python task_configs/generate.py"
        for name, config in configs.items():
            assert (shipped / bench.folder / name).read_text() == generate.render(bench, config), name


def test_category_lists_are_the_benchmarks_own():
    from lmms_eval.tasks.mmmu.utils import DOMAIN_CAT2SUB_CAT
    from lmms_eval.tasks.mmstar.utils import eval_type_dict

    assert [name for name, _ in B.MMSTAR.categories] == list(eval_type_dict)
    assert {d: tuple(s) for d, s in DOMAIN_CAT2SUB_CAT.items()} == B.MMMU_SUBJECTS
    assert [v for _, (v,) in B.SEEDBENCH.categories] == list(range(1, 10))
    assert len(B.MMBENCH_EN_DEV.categories) == 20 and len(B.MMMU_VAL.categories) == 30
    names = [task for bench in B.BENCHMARKS for task, _, _ in bench.subtasks()]
    assert len(names) == len(set(names)), "sub-task names must be unique"


def test_configs_reuse_lmms_eval_and_cap_generation():
    """Prompts and scoring resolve to lmms-eval's own functions; no task can generate 1024 tokens;
    MMBench scores by rule (mmbench_en_dev_static), never with the GPT judge."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    for path in sorted(generate.bundled_folder().glob("*/talo_*.yaml")):
        config = yaml.load(path.read_text(), Loader=Loader)
        assert config["generation_kwargs"]["max_new_tokens"] <= 128, path.name
        for key in ("doc_to_visual", "doc_to_text", "process_docs", "process_results"):
            kind, dotted = config[key]
            module, _, name = dotted.rpartition(".")
            assert callable(getattr(importlib.import_module(module), name)), f"{path.name}: {key} -> {dotted}"
        (metric,) = config["metric_list"]
        assert metric["aggregation"][1].startswith("lmms_talo.task_configs.benchmarks.")
        assert config["metadata"]["talo"]["category_field"]
    mmbench = B.MMBENCH_EN_DEV
    assert mmbench.aggregation.endswith("mmbench_static_accuracy") and "static" in mmbench.builtin_yaml


def test_subtask_docs_select_and_mark(fixture_data):
    import datasets

    dataset = datasets.load_dataset("parquet", data_files=str(fixture_data["mmstar"]), split="train")
    docs = B.talo_mmstar_math(dataset)
    assert len(docs) == N and set(docs["category"]) == {"math"}
    marks = docs[pool_exclusion.MARK]
    assert [m["index"] for m in marks] == list(range(N))
    assert [m["stratum"] for m in marks] == docs["l2_category"]
    assert {m["subtask"] for m in marks} == {"talo_mmstar_math"}

    mmmu = datasets.load_dataset("parquet", data_files=str(fixture_data["mmmu_val"]), split="train")
    science = B.talo_mmmu_val_discipline_science(mmmu)  # Math and Physics are Science subjects
    assert len(science) == N + 4 and {m["stratum"] for m in science[pool_exclusion.MARK]} == {"Math", "Physics"}
    with pytest.raises(
        pool_exclusion.TaskProtocolError, match="no doc of the dataset has category in .'logical reasoning'."
    ):
        B.talo_mmstar_logical_reasoning(dataset)


@pytest.mark.parametrize("shots", [10, 15, 20])
def test_shots_resolve_to_the_papers_pools(monkeypatch, shots):
    """LMMS_TALO_SHOTS picks 10/15/20 shots; the pool the task excludes is min(n // 3, 4k), stratified."""
    monkeypatch.setenv(pool_exclusion.SHOTS_ENV, str(shots))
    monkeypatch.delenv(pool_exclusion.SEED_ENV, raising=False)
    expected = pool_exclusion.expected_protocol()
    assert (expected.shots, expected.seed) == (shots, 0) and pool_exclusion.SHOTS_ENV in expected.source
    n = 240
    marks = [{"subtask": "talo_x", "index": i, "stratum": "ab"[i % 2]} for i in range(n)]
    split = pool_exclusion.split_for("talo_x", marks)
    assert len(split.pool) == pool_size(n, shots) == min(n // 3, 4 * shots)
    assert split == split_subtask("talo_x", list(range(n)), shots, 0, ["ab"[i % 2] for i in range(n)])
    assert sum(i % 2 for i in split.pool) == len(split.pool) // 2  # stratified: half from each stratum
    records = [{"score": float(i % 3 == 0), pool_exclusion.MARK: m} for i, m in enumerate(marks)]
    kept, _ = pool_exclusion.records_outside_pool(records)
    assert len(kept) == n - len(split.pool) and all(pool_exclusion.MARK not in r for r in kept)


def test_mismatched_split_fails_clearly(monkeypatch):
    monkeypatch.delenv(pool_exclusion.SHOTS_ENV, raising=False)
    monkeypatch.delenv(pool_exclusion.SEED_ENV, raising=False)
    marks = [{"subtask": "talo_x", "index": i, "stratum": None} for i in range(90)]
    aggregate = pool_exclusion.aggregate_test_docs(lambda records: sum(records) / len(records))
    scores = [pool_exclusion.MarkedScore(1.0, m) for m in marks]
    with evaluation_scope.evaluation({}):
        evaluation_scope.publish(split_subtask("talo_x", list(range(90)), 15, 0))
        with pytest.raises(
            pool_exclusion.TaskProtocolError,
            match=r"probe_shots=15, seed=0.*expects shots=10, seed=0.*LMMS_TALO_SHOTS=15",
        ):
            aggregate(scores)
        monkeypatch.setenv(pool_exclusion.SHOTS_ENV, "15")  # the override: now the task expects 15 shots
        assert aggregate(scores) == 1.0
        monkeypatch.setenv(pool_exclusion.SEED_ENV, "1")
        with pytest.raises(pool_exclusion.TaskProtocolError, match="seed=0.*expects shots=15, seed=1"):
            aggregate(scores)
    with evaluation_scope.evaluation({}):
        evaluation_scope.publish(split_subtask("talo_x/cat", list(range(90)), 15, 1))
        with pytest.raises(pool_exclusion.TaskProtocolError, match=r"granularity=auto \(the default\) or task"):
            aggregate(scores)


# --- discoverable ---


@pytest.mark.e2e
def test_tasks_path_prints_the_bundled_folder_and_writes_local_copies(tmp_path, fixture_data):
    folder = Path(_lmms_talo("tasks-path").stdout.strip())
    assert folder == generate.bundled_folder()
    assert (folder / "mmstar" / "_talo_mmstar.yaml").is_file()

    out = tmp_path / "configs"
    printed = _lmms_talo("tasks-path", *_data_args(fixture_data, "mmstar"), "--out", str(out)).stdout.strip()
    assert Path(printed) == out
    local = (out / "mmstar" / "talo_mmstar_math.yaml").read_text()
    assert "dataset_path: parquet" in local and str(fixture_data["mmstar"]) in local
    assert "lmms-lab-encoder/SEED-Bench" in (out / "seedbench" / "talo_seedbench_instances_counting.yaml").read_text()
    bad = _lmms_talo("tasks-path", "--data", "nosuch=/x.parquet", "--out", str(out), check=False)
    assert bad.returncode == 2 and "no bundled benchmark 'nosuch'" in bad.stderr


@pytest.mark.e2e
def test_tasks_lists_categories_and_sizes(fixture_data):
    listing = _lmms_talo("tasks").stdout
    for bench in B.BENCHMARKS:
        assert bench.group in listing
        for task, category, _ in bench.subtasks():
            assert f"{task} " in listing and category in listing
    sized = _lmms_talo("tasks", "mmstar", "scienceqa_img", *_data_args(fixture_data, "mmstar", "scienceqa_img")).stdout
    lines = {line.split()[0]: line for line in sized.splitlines() if line.startswith("  talo_")}
    assert "n=24" in lines["talo_mmstar_math"] and "shots: none" in lines["talo_mmstar_math"]
    assert "n=0" in lines["talo_mmstar_logical_reasoning"]
    assert "not covered by a sub-task: Not a listed category (n=3)" in sized
    assert "talo_seedbench" not in sized


@pytest.mark.e2e
def test_wheel_ships_and_finds_the_configs(tmp_path):
    wheels, target, root = tmp_path / "whl", tmp_path / "site", tmp_path / "src"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(Path(__file__).resolve().parent.parent, root, ignore=junk)  # the build leaves no build/ in the repo
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(root)], capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert "warning" not in (build.stdout + build.stderr).lower(), (
        "the wheel build must be quiet (license, data folders)"
    )
    (wheel,) = wheels.glob("lmms_talo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for bench in B.BENCHMARKS:
        assert f"lmms_talo/task_configs/{bench.folder}/_{bench.group}.yaml" in names
    assert {
        "lmms_talo/task_configs/__init__.py",
        "lmms_talo/task_configs/benchmarks.py",
        "lmms_talo/task_configs/generate.py",
        "lmms_talo/harness/pool_exclusion.py",
        "lmms_talo/demo/adapter/adapter.safetensors",
        "lmms_talo/demo/adapter/adapter.json",
    } <= names
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True, timeout=600)
    probe = (
        "from lmms_talo.task_configs.generate import bundled_folder; f = bundled_folder(); "
        "print(f); print(' '.join(sorted(p.name for p in f.glob('*/_talo_*.yaml'))))"
    )
    env = {**cli_env(), "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    folder, groups = out.stdout.splitlines()[-2:]
    assert Path(folder) == target / "lmms_talo" / "task_configs"
    assert groups.split() == sorted(f"_{bench.group}.yaml" for bench in B.BENCHMARKS)


# --- end to end through lmms-eval ---


@pytest.fixture(scope="module")
def talo_run(tmp_path_factory, fixture_data, letter_model):
    """One lmms-eval run of a TaLo model (compare_base=true) over ten sub-tasks of the five benchmarks."""
    tmp = tmp_path_factory.mktemp("talo_run")
    configs = Path(_lmms_talo("tasks-path", *_data_args(fixture_data), "--out", str(tmp / "configs")).stdout.strip())
    report_path = tmp / "talo_report.json"
    args = (
        f"pretrained={letter_model},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots={SHOTS},compare_base=true,"
        f"report={report_path},state_dir=none"
    )
    os.environ[pool_exclusion.SHOTS_ENV] = str(SHOTS)  # the tasks expect the same shots: cli_env() copies os.environ
    try:
        results, proc = run_lmms_eval(
            "talo_llava",
            args,
            ",".join(RUN_TASKS),
            configs,
            tmp / "out",
            "--force_simple",
            "--gen_kwargs",
            "max_new_tokens=1",
        )
    finally:
        del os.environ[pool_exclusion.SHOTS_ENV]
    report = {g["subtask"]: g for g in json.loads(report_path.read_text())["subtasks"]}
    return results, report, tmp / "out"


def _builtin_on_docs(bench, records: list) -> float:
    return B._builtin(bench.aggregation)([pool_exclusion._unmarked(r) for r in records])


def _records(out: Path, task: str, metric: str) -> dict[int, object]:
    return {s["doc_id"]: s[metric] for s in samples(out, task)}


def _macro_l2(scores: dict, records: dict) -> float:
    by_l2 = defaultdict(list)
    for doc, score in scores.items():
        by_l2[records[doc]["l2_category"]].append(score)
    return sum(sum(v) / len(v) for v in by_l2.values()) / len(by_l2)


def _circular(scores: dict, records: dict) -> float:
    """MMBench: a question counts if its main row is a test doc and every test row of it is right."""
    rows = defaultdict(list)
    for doc, score in scores.items():
        rows[records[doc]["index"] % 1_000_000].append(score)
    mains = [records[d]["index"] for d in scores if records[d]["index"] < 1_000_000]
    return 100 * sum(all(rows[m]) for m in mains) / len(mains)


@pytest.mark.e2e
def test_talo_run_excludes_each_subtasks_pool(talo_run):
    results, report, out = talo_run
    assert set(report) == set(RUN_TASKS), "one sub-task (own split, own layer) per talo_* task"
    differs = 0
    for task, bench in RUN_TASKS.items():
        group = report[task]
        n = 28 if task == "talo_mmmu_val_discipline_science" else N
        assert group["candidate_layers"] == [1, 2, 3] and "selected_layer" in group and group["selection_reason"]
        pool = {int(d) for d in group["pool"]}
        probe_docs = {int(d) for u in group["probe_docs"] for d in group["unit_docs"].get(str(u), [u])}
        assert len(pool) == pool_size(n, SHOTS) and probe_docs <= pool  # MMBench: 4 of 12 questions, 2 rows each
        assert group["test"]["talo"]["n"] == group["test"]["base"]["n"] == n - len(pool) == group["test_doc_count"]
        assert group["test_difference"] == pytest.approx(
            group["test"]["talo"]["score"] - group["test"]["base"]["score"]
        )

        records = _records(out, task, bench.metric)
        assert sorted(records) == list(range(n))
        if isinstance(records[0], dict):  # the mark travels on the record: its index is lmms-eval's doc_id
            assert all(
                r[pool_exclusion.MARK]["index"] == doc and r[pool_exclusion.MARK]["subtask"] == task
                for doc, r in records.items()
            )
        aggregate = results["results"][task][f"{bench.metric},none"]
        test_records = [r for doc, r in records.items() if doc not in pool]
        assert aggregate == pytest.approx(_builtin_on_docs(bench, test_records))
        differs += aggregate != pytest.approx(_builtin_on_docs(bench, list(records.values())))

        # lmms-eval's aggregate is the report's TaLo test score, in the benchmark's own way of averaging
        talo_scores = {int(d): s for d, s in group["test"]["talo"]["doc_scores"].items() if int(d) not in pool}
        assert set(talo_scores) == set(range(n)) - pool
        if bench is B.MMSTAR:
            assert aggregate == pytest.approx(_macro_l2(talo_scores, records))
        elif bench is B.MMBENCH_EN_DEV:
            assert aggregate == pytest.approx(_circular(talo_scores, records))
        else:
            assert aggregate == pytest.approx(group["test"]["talo"]["score"], abs=1e-5)
    assert differs >= 3, "the probe pools must visibly change lmms-eval's aggregate"
    assert {g["selected_layer"] for g in report.values()} - {None}, "some sub-task should select a layer"


@pytest.mark.e2e
def test_report_test_score_is_lmms_evals_printed_metric_exactly(talo_run):
    """For each of the five benchmarks the report's test.talo.score is, bit for bit, the figure lmms-eval
    prints for the talo_* task (its own aggregation over the test docs); the per-doc mean sits beside it."""
    results, report, _ = talo_run
    benchmark_way = 0
    for task, bench in RUN_TASKS.items():
        key = f"{bench.metric},none"
        talo, base = report[task]["test"]["talo"], report[task]["test"]["base"]
        printed = results["results"][task][key]
        assert (talo["metric"], talo["score"], talo["metrics"][key]) == (key, printed, printed), task
        assert isinstance(base["score"], float) and report[task]["test_difference"] == talo["score"] - base["score"]
        pool = {str(d) for d in report[task]["pool"]}
        test_scores = [s for d, s in talo["doc_scores"].items() if d not in pool]
        assert talo["doc_mean"] == pytest.approx(sum(test_scores) / len(test_scores))
        assert report[task]["test_difference_doc_mean"] == pytest.approx(talo["doc_mean"] - base["doc_mean"])
        benchmark_way += talo["score"] != pytest.approx(talo["doc_mean"]) and talo["score"] != pytest.approx(
            100 * talo["doc_mean"]
        )
    assert benchmark_way, "MMStar's l2 mean / MMBench's circular rule must differ from the per-doc mean somewhere"


@pytest.mark.e2e
def test_plain_model_scores_the_same_test_set(talo_run, letter_model, tmp_path, fixture_data):
    """Without a TaLo model the tasks recompute the split: the same pools the adapter probed, via `lmms-talo eval`."""
    _, report, _ = talo_run
    tasks = ["talo_mmstar_math", "talo_seedbench_instances_counting", "talo_mmmu_val_discipline_science"]
    out = tmp_path / "out"
    env = {**cli_env(), pool_exclusion.SHOTS_ENV: str(SHOTS)}
    proc = _lmms_talo(
        "eval",
        *[a.replace("--data", "--talo_data") for a in _data_args(fixture_data, "mmstar", "seedbench", "mmmu_val")],
        "--model",
        "llava_hf",
        "--force_simple",
        "--model_args",
        f"pretrained={letter_model},{LMMS_EVAL_MODEL_ARGS['llava']}",
        "--tasks",
        ",".join(tasks),
        "--output_path",
        str(out),
        "--batch_size",
        "1",
        "--verbosity",
        "DEBUG",
        "--log_samples",
        "--gen_kwargs",
        "max_new_tokens=1",
        env=env,
    )
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]
    for task in tasks:
        bench = RUN_TASKS[task]
        pool = {int(d) for d in report[task]["pool"]}
        records = _records(out, task, bench.metric)
        assert results[task][f"{bench.metric},none"] == pytest.approx(
            _builtin_on_docs(bench, [r for d, r in records.items() if d not in pool])
        ), f"{task}: the recomputed pool differs from the adapter's\n{proc.stderr[-2000:]}"
        base = {int(d): s for d, s in report[task]["test"]["base"]["doc_scores"].items()}
        if bench is B.SEEDBENCH:  # the plain model answers the test docs as compare_base did
            assert results[task]["seed_all,none"] == pytest.approx(sum(base.values()) / len(base))


@pytest.mark.e2e
def test_mismatched_shots_stop_the_run_before_probing(tmp_path, fixture_data, letter_model):
    env = {**cli_env(), pool_exclusion.SHOTS_ENV: str(SHOTS)}
    proc = _lmms_talo(
        "eval",
        "--talo_data",
        f"seedbench={fixture_data['seedbench']}",
        "--model",
        "talo_llava",
        "--force_simple",
        "--model_args",
        f"pretrained={letter_model},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=4,state_dir=none,"
        f"report={tmp_path / 'r.json'}",
        "--tasks",
        "talo_seedbench_text_understanding",
        "--output_path",
        str(tmp_path / "out"),
        "--batch_size",
        "1",
        "--verbosity",
        "DEBUG",
        "--gen_kwargs",
        "max_new_tokens=1",
        env=env,
        check=False,
    )
    assert proc.returncode != 0
    assert "talo_seedbench_text_understanding: the TaLo model probes with probe_shots=4, seed=0" in proc.stderr
    assert "LMMS_TALO_SHOTS=4" in proc.stderr
    assert not (tmp_path / "r.json").exists() and not list((tmp_path / "out").rglob("*_results.json"))
