"""Layer-parallel sweeps: two processes split the layers and reach the same decisions as one, and a
real two-process lmms-eval run (accelerate launch, gloo on CPU) gives the same report and results as one."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from cli_tasks import cli_env, samples, write_image_task
from test_sweep import LAYERS, ScoreTable, random_table
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.method.batching import SweepEngine
from lmms_talo.method.parallel import Ranks
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import make_rule
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore

CASES = 25


def test_share_deals_every_item_once_in_snake_order():
    items = list(range(1, 12))
    shares = [Ranks(rank, 3).share(items) for rank in range(3)]
    assert sorted(sum(shares, [])) == items
    assert shares[0] == [1, 6, 7]  # 1 | 2 3 | (6 5 4) reversed | 7 8 9 | ...
    assert Ranks().share(items) == items


def _cases():
    rng = np.random.default_rng(7)
    for case in range(CASES):
        n_docs = int(rng.integers(9, 30))
        split = split_subtask(f"t{case}", list(range(n_docs)), int(rng.integers(2, n_docs // 3 + 1)), seed=case)
        yield split, float(rng.choice([0.0, -0.2, 0.1])), random_table(rng, n_docs)


def _sweep_all(ranks):
    """Decisions, per-doc scores and the (variant, doc) pairs each process ran, for every case and mode."""
    out = []
    for split, threshold, table in _cases():
        for mode, batched in itertools.product(("full", "select"), (False, True)):
            model = ScoreTable(table)
            rule = make_rule("gain", threshold=threshold)
            engine = SweepEngine(batched, "test", docs_per_call=2)
            sweep = LayerSweep(
                model.answer, model.score, ProbeStore(None, {}), mode=mode, ranks=ranks, rule=rule, engine=engine
            )
            result = sweep.run(split, LAYERS, "zero", 3)
            out.append(
                {
                    "mode": mode,
                    "batched": batched,
                    "rounds": [(o.selected, o.layer_scores, o.reason) for o in result.rounds],
                    "doc_scores": result.doc_scores,
                    "ran": sorted({label for label, _ in model.runs} - {"base"}),
                }
            )
    return out


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = _sweep_all(Ranks(rank, world))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_ranks_decide_like_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    alone = json.loads(json.dumps(_sweep_all(Ranks())))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for one, zero, first in zip(alone, *ranks):
        assert zero["rounds"] == first["rounds"] == one["rounds"]
        assert zero["doc_scores"] == first["doc_scores"] == one["doc_scores"]
        if one["mode"] == "full":  # select mode re-deals the live layers after every doc
            # the batched engine's self-check runs the highest layer on every rank
            checked = {str(max(LAYERS))} if one["batched"] else set()
            assert not (set(zero["ran"]) & set(first["ran"])) - checked, "each layer is run on one rank only"


# --- the real thing: lmms-eval under accelerate launch, two CPU processes ---

N_DOCS = 15
ORACLE_LAYER = 2


def _launch_lmms_eval(model_args, tasks, include_path, output):
    """lmms-eval on two CPU processes through `accelerate launch` (gloo). On a machine without GPUs,
    `--multi_gpu` is accelerate's torchrun launcher (`--cpu --num_processes 2` starts one process:
    accelerate's multi-CPU mode goes through mpirun)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "lmms_eval",
        "--model",
        "talo_llava",
        "--force_simple",
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(include_path),
        "--output_path",
        str(output),
        "--batch_size",
        "1",
        "--verbosity",
        "DEBUG",
        "--log_samples",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=900)
    assert proc.returncode == 0, (
        f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    assert "Running on rank 1" in proc.stderr + proc.stdout
    (results,) = sorted(output.rglob("*_results.json"))
    return json.loads(results.read_text())


def _text(filtered):
    return filtered if isinstance(filtered, str) else filtered[0]


# Work counters (summed over the ranks) and timings describe the work, not the result.
PER_PROCESS = {"sweep_seconds", "eval_seconds", "probe_docs_computed", "probe_docs_reused", "sweep_replay", "memory"}


def _comparable(report_path):
    report = json.loads(report_path.read_text())
    return [{k: v for k, v in group.items() if k not in PER_PROCESS} for group in report["subtasks"]]


def _in_process(model_args, task, folder):
    """One process, through lmms-eval's evaluator; returns (results, {doc_id: answer})."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    lm = get_model("talo_llava", True).create_from_arg_string(model_args)
    out = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=1,
        force_simple=True,
        log_samples=True,
    )
    return out["results"][task], {s["doc_id"]: _text(s["filtered_resps"]).strip() for s in out["samples"][task]}


@pytest.mark.e2e
def test_two_processes_give_the_same_report_and_results(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llava")
    base_args = f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=4,state_dir=none,compare_base=true"
    seed = write_image_task(tmp_path / "seed", "talo_par_seed", ["?"] * N_DOCS)
    _, oracle_answers = _in_process(
        f"{base_args},force_layer={ORACLE_LAYER},report={tmp_path / 'seed.json'}", "talo_par_seed", seed
    )
    oracle = write_image_task(tmp_path / "oracle", "talo_par", [oracle_answers[i] for i in range(N_DOCS)])

    one, one_answers = _in_process(f"{base_args},report={tmp_path / 'one.json'}", "talo_par", oracle)
    two = _launch_lmms_eval(f"{base_args},report={tmp_path / 'two.json'}", "talo_par", oracle, tmp_path / "two")

    assert two["results"]["talo_par"] == one
    assert _comparable(tmp_path / "two.json") == _comparable(tmp_path / "one.json")
    (group,) = json.loads((tmp_path / "two.json").read_text())["subtasks"]
    assert group["selected_layer"] == ORACLE_LAYER
    assert group["test"]["talo"]["n"] == N_DOCS - len(group["pool"])  # both ranks' test docs
    # the work counters are every rank's, summed: the ranks ran at least every pass one process ran
    (alone,) = json.loads((tmp_path / "one.json").read_text())["subtasks"]
    assert group["probe_docs_computed"] >= alone["probe_docs_computed"] > 0
    assert group["sweep_replay"]["layers_computed"] >= alone["sweep_replay"]["layers_computed"]
    two_answers = {s["doc_id"]: _text(s["filtered_resps"]).strip() for s in samples(tmp_path / "two", "talo_par")}
    assert two_answers == one_answers
