"""TaLo through lm-evaluation-harness's own CLI (`python -m lmms_talo lm-eval`, model `talo_hf`),
offline on a tiny random Llama, and the same selection through lmms-eval (`talo_huggingface`
--force_simple) on the same probe docs: both harnesses score the same way here (option likelihood
after the same plain prompt; the same generation scorer), so they must agree on everything the
probe pass decides.

The multiple-choice task is an oracle: each doc's correct option is the one the model itself
prefers with layer ORACLE_LAYER's attention knocked out, so TaLo must select that layer.
"""

import json
import subprocess
import sys

import pytest
from cli_tasks import cli_env, run_lmms_eval

from lmms_talo.demo.bigbench import convert_task, multiple_choice_docs
from lmms_talo.method.interventions import Knockout, knocked_out

N_DOCS = 15
SHOTS = 3
ORACLE_LAYER = 2
WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "haze", "iris", "jade", "kelp", "lumen"]
TALO_ARGS = f"probe_shots={SHOTS},state_dir=none,compare_base=true"


class _Request:
    def __init__(self, *args):
        self.args = args


def _oracle_task(model_dir) -> dict:
    """A BIG-bench-style task whose correct option is the one the model picks with layer
    ORACLE_LAYER knocked out, kept only where the full model and every other knockout pick another
    (a random tiny model's choice moves with a knockout on few docs: candidates are drawn until
    N_DOCS qualify)."""
    from lmms_talo.harness.lmms.text_model import CausalLM

    lm = CausalLM(pretrained=str(model_dir), device="cpu", chat_template="false")
    candidates = [
        {
            "input": f"Which word follows {WORDS[i % 12]} {i}?",
            "target_scores": {WORDS[(i * 5 + j) % 12]: int(j == 0) for j in range(4)},
        }
        for i in range(40 * N_DOCS)
    ]
    docs, _ = multiple_choice_docs({"examples": candidates}, "oracle", None, seed=0)

    def pick(doc, layer):
        with knocked_out(lm.model, Knockout((layer,), "zero") if layer else None):
            losses = lm.loglikelihood([_Request(doc["prompt_cloze"], f" {o}") for o in doc["options"]])
        return doc["options"][min(range(len(losses)), key=lambda i: losses[i][0])]

    kept = []
    for example, doc in zip(candidates, docs):
        oracle = pick(doc, ORACLE_LAYER)
        if all(pick(doc, other) != oracle for other in (None, 1, 3)):
            # the option order depends on the example's position and option list, not on its scores
            example["target_scores"] = {option: int(option == oracle) for option in example["target_scores"]}
            kept.append(example)
            if len(kept) == N_DOCS:
                return {"name": "oracle", "examples": kept}
    raise AssertionError(
        f"only {len(kept)} docs separate layer {ORACLE_LAYER} from the full model and the other layers"
    )


def _generated(samples_file) -> dict:
    """doc id -> the generated answer in a harness's samples log (lmms-eval logs it stripped)."""
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return {
        r["doc_id"]: (r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0]).strip()
        for r in rows
    }


@pytest.fixture(scope="module")
def oracle_tasks(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    folder = tmp_path_factory.mktemp("oracle_tasks")
    task = _oracle_task(model_dir)
    convert_task(task, "oracle", folder, styles=("cloze", "generate"))
    answers = [d["answer"] for d in multiple_choice_docs(task, "oracle", None, 0)[0]]
    assert len(set(answers)) > 1, "the knocked-out model must not pick the same position everywhere"
    return model_dir, folder


def _run_lm_eval(model_dir, folder, out, report, *extra):
    cmd = [
        sys.executable,
        "-m",
        "lmms_talo",
        "lm-eval",
        "--model",
        "talo_hf",
        "--model_args",
        f"pretrained={model_dir},{TALO_ARGS},report={report}",
        "--tasks",
        "bb_oracle,bb_oracle_gen",
        "--include_path",
        str(folder / "lm_eval"),
        "--output_path",
        str(out),
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--log_samples",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=900)
    assert proc.returncode == 0, f"lm-eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = sorted(out.rglob("results_*.json"))
    assert results, f"no lm-eval results under {out}:\n{proc.stderr[-3000:]}"
    return json.loads(results[-1].read_text()), proc


def _by_task(report: dict) -> dict:
    return {group["task"]: group for group in report["subtasks"]}


@pytest.mark.e2e
def test_lm_eval_cli_runs_talo_and_agrees_with_lmms_eval(oracle_tasks, tmp_path):
    model_dir, folder = oracle_tasks

    lm_report_path = tmp_path / "lm_eval_report.json"
    results, proc = _run_lm_eval(model_dir, folder, tmp_path / "lm_out", lm_report_path)
    lm_report = _by_task(json.loads(lm_report_path.read_text()))
    assert set(lm_report) == {"bb_oracle", "bb_oracle_gen"}
    mc = lm_report["bb_oracle"]
    assert mc["request_type"] == "loglikelihood" and lm_report["bb_oracle_gen"]["request_type"] == "generate_until"
    assert mc["selected_layer"] == ORACLE_LAYER and mc["interaction_vector"][str(ORACLE_LAYER)] > 0
    assert mc["candidate_layers"] == [1, 2, 3]
    assert len(mc["pool"]) == min(N_DOCS // 3, 4 * SHOTS) and mc["test"]["talo"]["n"] == N_DOCS - len(mc["pool"])
    assert mc["test"]["talo"]["score"] == 1.0 and mc["test"]["base"]["score"] < 1.0
    # lm-eval's own aggregate (pool docs included) comes from the knocked-out model's answers
    assert results["results"]["bb_oracle"]["acc,none"] == 1.0
    # lm-eval's own files carry the decision: a `talo` block beside `results`, a `talo` field per sample row
    assert results["talo"]["subtasks"]["bb_oracle"]["knockout"] == [ORACLE_LAYER] and "talo" not in results["results"]
    (mc_samples,) = (tmp_path / "lm_out").rglob("samples_bb_oracle_2*.jsonl")
    rows = [json.loads(line) for line in mc_samples.read_text().splitlines()]
    assert rows and all(
        r["talo"] == {"knockout": [ORACLE_LAYER], "in_probe_pool": r["doc_id"] in set(mc["pool"])} for r in rows
    )
    # lm-eval's naming, TaLo's suffix
    (probe_log,) = (tmp_path / "lm_out").rglob("samples_bb_oracle_talo_probe_2*.jsonl")
    probe_rows = [row for row in map(json.loads, probe_log.read_text().splitlines()) if row["kind"] == "pass"]
    assert {(r["variant"], r["unit"]) for r in probe_rows} == {
        (v, d) for v, docs in mc["probe_doc_scores"].items() for d in docs
    }
    # (log p, greedy) per option
    assert all(len(r["responses"]) == 4 and all(len(option) == 2 for option in r["responses"]) for r in probe_rows)
    assert "talo_hf" in proc.stdout + proc.stderr
    assert 0 < mc["memory"]["rss_mb"] <= mc["memory"]["peak_rss_mb"] < 64 * 1024  # recorded once the sub-task is done

    lmms_report_path = tmp_path / "lmms_eval_report.json"
    run_lmms_eval(
        "talo_huggingface",
        f"pretrained={model_dir},device=cpu,chat_template=false,{TALO_ARGS},report={lmms_report_path}",
        "bb_oracle,bb_oracle_gen",
        folder / "lmms",
        tmp_path / "lmms_out",
        "--force_simple",
    )
    lmms_report = _by_task(json.loads(lmms_report_path.read_text()))
    for task in ("bb_oracle", "bb_oracle_gen"):
        ours, theirs = lmms_report[task], lm_report[task]
        for key in ("pool", "probe_docs", "selected_layer", "interaction_vector", "probe_doc_scores", "rounds"):
            assert ours[key] == theirs[key], f"{task}: the harnesses disagree on {key}"
    assert lmms_report["bb_oracle"]["test"]["talo"]["doc_scores"] == mc["test"]["talo"]["doc_scores"]
    (lm_samples,) = (tmp_path / "lm_out").rglob("samples_bb_oracle_gen_2*.jsonl")
    (lmms_samples,) = (tmp_path / "lmms_out").rglob("*_samples_bb_oracle_gen.jsonl")
    assert _generated(lm_samples) == _generated(lmms_samples)  # the same greedy answers, doc for doc


@pytest.mark.e2e
def test_talo_args_copied_into_lm_eval_task_metadata_do_not_change_the_probe_fingerprint(oracle_tasks):
    """lm-eval copies every model arg into each task's metadata; probe results computed under one
    report path or compare_base setting must be reused under another, never under another prompt."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from lmms_talo.method.config import TaloConfig
    from lmms_talo.outputs.probe_store import task_config_identity

    _, folder = oracle_tasks

    def identity(metadata, task="bb_oracle"):
        manager = TaskManager(include_path=str(folder / "lm_eval"), metadata=metadata)
        return task_config_identity(get_task_dict([task], manager)[task], TaloConfig.arg_names())

    first = identity({"pretrained": "m", "probe_shots": 3, "report": "a.json", "state_dir": "s1"})
    assert identity({"pretrained": "m", "probe_shots": 3, "report": "b.json", "compare_base": True}) == first
    assert identity({"pretrained": "m", "probe_shots": 3, "tokenizer_revision": "v2"}) != first  # not TaLo's: kept
    assert identity({"pretrained": "m"}, "bb_oracle_gen") != first


@pytest.mark.e2e
def test_lm_eval_command_passes_bad_arguments_to_lm_eval_and_fails(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_talo", "lm-eval", "--model", "talo_hf", "--no_such_flag"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert proc.returncode != 0 and "--no_such_flag" in proc.stderr


def _greedy_pair(lm, contexts) -> tuple[str, str]:
    """A context and the model's own next token as text (one that survives decode + encode)."""
    import torch

    for context in contexts:
        with torch.no_grad():
            token = int(lm.model(torch.tensor([lm.tokenizer.encode(context)])).logits[0, -1].argmax())
        text = lm.tokenizer.decode([token])
        if lm.encode_pair(context, text)[1] == [token]:
            return context, text
    raise AssertionError("no context whose greedy next token survives decode + encode")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_hf_causal_lm_scores_continuations_as_lm_evals_hflm(tiny_model_dir, batch_size):
    """lmms-talo's simple lmms-eval class returns -log p where lm-eval's HFLM returns log p: the same
    tokenisation (trailing context whitespace joins the continuation) and the same greedy flags; with
    batch_size > 1 several contexts (padded) and their continuations share passes."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmms_talo.harness.lmms.text_model import CausalLM

    path = str(tiny_model_dir("llama"))
    ours = CausalLM(pretrained=path, device="cpu", chat_template="false", batch_size=str(batch_size))
    context = "Question: Which word follows amber?\nAnswer:"
    pairs = [(context, " basil"), (context, " cedar delta"), (context + " ", "ember"), ("Short", " fjord grove haze")]
    pairs.append(_greedy_pair(ours, [f"{word} {i}" for i in range(20) for word in WORDS]))
    pairs += [(" ".join(WORDS[:n]), ".") for n in (1, 4, 9)]  # one-token continuations: contexts share a padded batch
    pairs += [("Amber basil cedar delta ember", " fjord grove"), ("Basil", " cedar ember haze")]
    theirs = HFLM(pretrained=path, device="cpu", batch_size=2).loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    )
    mine = ours.loglikelihood([_Request(*pair) for pair in pairs])
    for (nll, our_greedy), (logprob, their_greedy) in zip(mine, theirs):
        assert nll == pytest.approx(-logprob, rel=1e-5, abs=1e-4)
        assert our_greedy == their_greedy
    assert mine[4][1] is True and not all(g for _, g in mine)


def test_contexts_share_a_batch_only_while_their_padding_stays_small():
    from lmms_talo.harness.lmms.text_model import PADDING_SLACK, length_buckets

    contexts = [(0,) * n for n in (10, 10, 11, 12, 40, 41, 90)]
    batches = length_buckets(contexts, 3)
    assert [[len(c) for c in b] for b in batches] == [[10, 10, 11], [12], [40, 41], [90]]
    for batch in batches:
        assert max(map(len, batch)) * len(batch) <= (1 + PADDING_SLACK) * sum(map(len, batch))
    assert length_buckets(contexts, 1) == [[c] for c in contexts]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"flash": "yes"}, "unknown model args \\['flash'\\]"),
        ({"dtype": "float8"}, "dtype='float8'"),
        ({"batch_size": "auto"}, "batch_size must be a positive integer"),
    ],
)
def test_hf_causal_lm_rejects_bad_model_args(tiny_model_dir, args, message):
    from lmms_talo.harness.lmms.text_model import CausalLM, ModelArgumentError

    with pytest.raises(ModelArgumentError, match=message):
        CausalLM(pretrained=str(tiny_model_dir("llama")), device="cpu", **args)


@pytest.mark.e2e
def test_the_lm_eval_path_imports_no_lmms_eval_module(oracle_tasks, tmp_path):
    """A TaLo evaluation through lm-eval in a process where `import lmms_eval` fails: the harness seam
    keeps every lmms-eval import on the lmms-eval side (lmms_talo.harness.base)."""
    model_dir, folder = oracle_tasks
    report = tmp_path / "report.json"
    args = [
        "lm-eval",
        "--model",
        "talo_hf",
        "--model_args",
        f"pretrained={model_dir},{TALO_ARGS},report={report}",
        "--tasks",
        "bb_oracle,bb_oracle_gen",
        "--include_path",
        str(folder / "lm_eval"),
        "--output_path",
        str(tmp_path / "out"),
        "--batch_size",
        "4",
        "--device",
        "cpu",
    ]
    program = (
        "import sys\n"
        "sys.modules['lmms_eval'] = None  # any import of lmms_eval or a submodule now raises ImportError\n"
        "from lmms_talo.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "loaded = sorted(m for m, module in sys.modules.items() if m.startswith('lmms_eval') and module is not None)\n"
        "assert not loaded, loaded\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, env=cli_env(), timeout=900
    )
    assert proc.returncode == 0, f"lm-eval without lmms-eval failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    by_task = _by_task(json.loads(report.read_text()))
    assert by_task["bb_oracle"]["selected_layer"] == ORACLE_LAYER
    assert by_task["bb_oracle_gen"]["request_type"] == "generate_until"
    assert sorted((tmp_path / "out").rglob("results_*.json"))


@pytest.mark.e2e
def test_the_pinned_lm_eval_finds_talo_hf_only_through_the_wrapper():
    """lm-eval 0.4.13 reads no entry-point group for models, so `lm_eval --model talo_hf` alone cannot
    find the model and `lmms-talo lm-eval` registers it first (README). Should a release add model
    entry points, this test fails and lmms-talo should register `talo_hf` there too."""
    program = (
        "import lm_eval.models\n"
        "from lm_eval.api.registry import get_model\n"
        "try:\n    get_model('talo_hf')\n"
        "except Exception as exc:\n    print('unknown:', exc)\n"
        "else:\n    print('found')\n"
        "from lmms_talo.harness.lm_eval.model import register\n"
        "register()\n"
        "print('registered:', get_model('talo_hf').__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unknown:" in proc.stdout and "registered: TaloHFLM" in proc.stdout


@pytest.mark.e2e
def test_lm_evals_response_cache_keeps_the_talo_record_and_predict_only_is_recorded(oracle_tasks, tmp_path):
    """`--use_cache`: a second run that changes only its output and report paths is served TaLo's
    answers from lm-eval's cache under TaLo's key, and still decides, reports and tags its samples;
    its --predict_only is recorded and logged."""
    model_dir, folder = oracle_tasks
    cache = tmp_path / "cache" / "lm"
    _run_lm_eval(model_dir, folder, tmp_path / "first", tmp_path / "first.json", "--use_cache", str(cache))
    first = _by_task(json.loads((tmp_path / "first.json").read_text()))
    results, proc = _run_lm_eval(
        model_dir, folder, tmp_path / "again", tmp_path / "again.json", "--use_cache", str(cache), "--predict_only"
    )
    report = json.loads((tmp_path / "again.json").read_text())
    again = _by_task(report)
    mc = again["bb_oracle"]
    assert mc["selected_layer"] == ORACLE_LAYER == first["bb_oracle"]["selected_layer"]
    assert first["bb_oracle"]["answers_from_cache"] == 0 and mc["answers_from_cache"] > 0
    assert results["talo"]["subtasks"]["bb_oracle"]["knockout"] == [ORACLE_LAYER]
    (mc_samples,) = (tmp_path / "again").rglob("samples_bb_oracle_2*.jsonl")
    rows = [json.loads(line) for line in mc_samples.read_text().splitlines()]
    assert rows and all(r["talo"]["knockout"] == [ORACLE_LAYER] for r in rows)
    assert report["harness_run"]["predict_only"] is True
    assert "--predict_only: TaLo still scores its probe docs" in proc.stdout + proc.stderr
