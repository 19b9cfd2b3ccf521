"""Every named TaLo model runs the whole method through lmms-eval's evaluator, in-process.

Each run checks that TaLo's per-doc scores agree with lmms-eval's own aggregate, that the report is
complete, and that the model is exactly as loaded afterwards.
"""

import hashlib
import json

import pytest
import torch
from cli_tasks import write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.method.backbone import unwrap

pytestmark = pytest.mark.e2e

N_DOCS = 12
SHOTS = 2

MATRIX = [  # (TaLo model, architecture, force_simple, extra model args)
    ("talo_llava", "llava", False, ""),
    ("talo_llava", "llava_next", False, ""),
    ("talo_llava", "llava_onevision", True, ""),
    ("talo_qwen2_5_vl", "qwen2_5_vl", False, ""),
    ("talo_qwen2_5_vl", "qwen2_5_vl", True, ""),
    ("talo_qwen3_vl", "qwen3_vl", False, ""),
    ("talo_internvl", "internvl", False, ""),
    ("talo", "llava", True, "base=llava_hf,"),
]
MATRIX_IDS = [f"{m[0]}-{m[1]}-{'simple' if m[2] else 'chat'}" for m in MATRIX]
# How each run's final probe round ends, fixed in advance: "swept" (the base model misses a probe doc,
# every candidate layer runs, the interaction vector holds them all) or "perfect" (the base model is
# right on every probe doc, no layer runs, the vector is empty). The tiny random models never say the
# task's answers, so every run sweeps; a run that ends the other way fails rather than passing as it.
FINAL_ROUND = dict.fromkeys(MATRIX_IDS, "swept")


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate(model_name, model_args, folder, task, force_simple, **kwargs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    lm = get_model(model_name, force_simple).create_from_arg_string(model_args)
    model = lm.model  # lmms-eval's clean() drops the model from the wrapper after the run
    loaded = _digest(model)
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=1,
        force_simple=force_simple,
        **kwargs,
    )
    assert _digest(model) == loaded, "the model must be exactly as loaded after the run"
    return lm, results


def _errors_logged_while_capturing_prompts(monkeypatch) -> list:
    """Every ERROR the model classes log (loguru) while the screen captures a prompt."""
    from loguru import logger

    import lmms_talo.method.screen as screen

    errors, capture = [], screen.capture_prompt

    def watched(model, run):
        sink = logger.add(lambda message: errors.append(message.record["message"]), level="ERROR")
        try:
            return capture(model, run)
        finally:
            logger.remove(sink)

    monkeypatch.setattr(screen, "capture_prompt", watched)
    return errors


def _report_doc_mean(group) -> float:
    scores = group["test"]["talo"]["doc_scores"].values()
    return sum(scores) / len(scores)


@pytest.mark.parametrize("sweep", ["full", "screen"])
@pytest.mark.parametrize("model_name, arch, force_simple, extra", MATRIX, ids=MATRIX_IDS)
def test_each_named_model_gives_a_complete_report_scored_as_lmms_eval_and_is_left_as_loaded(
    tmp_path, tiny_model_dir, model_name, arch, force_simple, extra, sweep, monkeypatch
):
    """sweep=screen with screen_top = every candidate runs the whole sweep exactly after its gradient
    pass, so the same checks hold; the screen's record must say how it scored the options."""
    folder = write_image_task(tmp_path / "task", "talo_gen", [f"a{i % 3}" for i in range(N_DOCS)])
    report_path = tmp_path / "report.json"
    args = (
        f"{extra}pretrained={tiny_model_dir(arch)},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots={SHOTS},"
        f"report={report_path},state_dir=none,sweep={sweep},screen_top=3"
    )
    errors = _errors_logged_while_capturing_prompts(monkeypatch)
    lm, results = evaluate(model_name, args, folder, "talo_gen", force_simple)
    assert errors == [], "the screen's prompt capture cuts generation short: no model class may log that as an error"
    report = json.loads(report_path.read_text())
    (group,) = report["subtasks"]
    assert group["candidate_layers"] == [1, 2, 3]
    final = group["rounds"][-1]
    if FINAL_ROUND[f"{model_name}-{arch}-{'simple' if force_simple else 'chat'}"] == "swept":
        assert final["baseline"] < 1.0 and set(final["layer_scores"]) == {"1", "2", "3"}
        assert set(group["interaction_vector"]) == {"1", "2", "3"}
    else:
        assert final["baseline"] == 1.0 and not final["layer_scores"] and not group["interaction_vector"]
    assert group["selection_reason"]
    assert group["probe_doc_scores"]["base"]
    # TaLo's scorer agrees with lmms-eval's own aggregate over all answered docs.
    assert results["results"]["talo_gen"]["exact_match,none"] == pytest.approx(_report_doc_mean(group))
    assert group["test"]["talo"]["n"] == N_DOCS - len(group["pool"])
    if sweep == "screen":
        swept = [entry for entry in group["screen"]]
        assert len(swept) == sum(1 for r in group["rounds"] if r["layer_scores"])
        for entry in swept:
            assert sorted(entry["estimates"], key=int) == ["1", "2", "3"]
            assert entry["packed_options"] is not None and entry["packing_check"]


def test_loglikelihood_multiple_choice(tmp_path, tiny_model_dir):
    choices = [["red", "green", "blue"], ["one", "two", "three"], ["cat", "dog", "fox"]]
    docs = [choices[i % 3] for i in range(18)]
    folder = write_image_task(
        tmp_path / "task",
        "talo_mc",
        [c[i % 3] for i, c in enumerate(docs)],
        output_type="multiple_choice",
        choices=docs,
    )
    report_path = tmp_path / "report.json"
    args = (
        f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=3,"
        f"report={report_path},state_dir=none"
    )
    _, results = evaluate("talo_llava", args, folder, "talo_mc", True)
    (group,) = json.loads(report_path.read_text())["subtasks"]
    assert group["request_type"] == "loglikelihood"
    assert results["results"]["talo_mc"]["acc,none"] == pytest.approx(_report_doc_mean(group))
    assert len(group["probe_doc_scores"]) == 4  # base and layers 1-3


def test_category_granularity_selects_per_category(tmp_path, tiny_model_dir):
    categories = ["maps"] * 9 + ["charts"] * 12
    folder = write_image_task(tmp_path / "task", "talo_cat", ["x"] * 21, categories=categories)
    report_path = tmp_path / "report.json"
    args = (
        f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots=3,"
        f"category_field=category,report={report_path},state_dir=none"
    )
    evaluate("talo_llava", args, folder, "talo_cat", True)
    groups = {g["subtask"]: g for g in json.loads(report_path.read_text())["subtasks"]}
    assert set(groups) == {"talo_cat/maps", "talo_cat/charts"}
    assert len(groups["talo_cat/maps"]["pool"]) == 3 and len(groups["talo_cat/charts"]["pool"]) == 4
    assert groups["talo_cat/maps"]["test"]["talo"]["n"] == 6


def test_response_cache_never_mixes_base_and_knockout(tmp_path, tiny_model_dir):
    folder = write_image_task(tmp_path / "task", "talo_cache", ["?"] * 12)
    cache = str(tmp_path / "cache")
    base_args = f"pretrained={tiny_model_dir('llava')},{LMMS_EVAL_MODEL_ARGS['llava']}"
    talo_args = f"{base_args},force_layer=2,probe_shots=2,state_dir=none,report={tmp_path / 'r.json'}"

    def answers(model_name, args, use_cache):
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager

        results = simple_evaluate(
            model=model_name,
            model_args=args,
            tasks=["talo_cache"],
            batch_size=1,
            force_simple=True,
            task_manager=TaskManager(include_path=str(folder)),
            use_cache=use_cache,
            log_samples=True,
        )
        return [s["filtered_resps"] for s in results["samples"]["talo_cache"]]

    base = answers("llava_hf", base_args, cache)
    knocked = answers("talo_llava", talo_args, cache)
    assert knocked == answers("talo_llava", talo_args, None), "a knocked-out run must not be served base answers"
    assert knocked != base
    assert answers("llava_hf", base_args, cache) == base, "a base run must not be served knocked-out answers"


@pytest.mark.parametrize("log_samples", [True, False])
def test_probe_passes_are_kept_only_while_the_harness_logs_samples(tmp_path, tiny_model_dir, log_samples):
    """The probe log goes beside the sample rows; without them TaLo keeps no probe pass past its sub-task."""
    model_name, arch, force_simple, extra = MATRIX[0]
    folder = write_image_task(tmp_path / "task", "talo_gen", [f"a{i % 3}" for i in range(N_DOCS)])
    args = (
        f"{extra}pretrained={tiny_model_dir(arch)},{LMMS_EVAL_MODEL_ARGS[arch]},probe_shots={SHOTS},"
        f"report={tmp_path / 'report.json'},state_dir=none"
    )
    lm, results = evaluate(model_name, args, folder, "talo_gen", force_simple, log_samples=log_samples)
    assert ("samples" in results) is log_samples
    if log_samples:
        header, *passes = lm.talo_probe_rows["talo_gen"]
        assert header["kind"] == "subtask" and passes and all(p["kind"] == "pass" for p in passes)
    else:
        assert lm.talo_probe_rows == {}
