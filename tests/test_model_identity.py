"""The probe store knows the model it stores answers for: every weight, the side files that shape a
prompt or an answer, source installs and the task functions' code (issue 24, part 1).

Each edit below is made in place in a checkpoint folder, as a retrained projector, a LoRA merge or
a hub update would make it; the model is reloaded from the folder as a harness would.
"""

import json
import shutil

import pytest
import torch
from cli_tasks import run_lmms_eval, write_image_task
from safetensors.torch import load_file, save_file
from tiny_models import LMMS_EVAL_MODEL_ARGS, random_llama
from transformers import AutoModelForImageTextToText

from lmms_talo.outputs.model_identity import FileHasher, library_versions, source_digest, weights_identity
from lmms_talo.outputs.probe_store import task_config_identity
from lmms_talo.outputs.report import model_identity

# parameter group -> a test on a state-dict key of the tiny LLaVA (language-model keys exclude the vision tower's)
PARAMETER_GROUPS = {
    "vision tower": lambda k: "vision_tower" in k,
    "projector": lambda k: "multi_modal_projector" in k,
    "another layer's attention": lambda k: "language_model" in k and "layers.2.self_attn" in k,
    "an MLP": lambda k: "language_model" in k and "layers.1.mlp" in k,
    "lm_head": lambda k: "lm_head" in k,
    "embeddings": lambda k: "language_model" in k and "embed_tokens" in k,
}


@pytest.fixture
def checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """A private copy of the tiny LLaVA's folder, and a private hash cache."""
    monkeypatch.setenv("LMMS_TALO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "llava"
    shutil.copytree(tiny_model_dir("llava"), folder)
    return folder


def _identity(folder) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(folder)
    return model_identity(model)


def _edit_weights(folder, selects) -> str:
    """Add a small constant to the first tensor the test selects, in the safetensors file, in place."""
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if selects(k))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("group", sorted(PARAMETER_GROUPS))
def test_editing_any_parameter_group_in_place_changes_the_identity(checkpoint, group):
    before = _identity(checkpoint)
    assert before["weights"]["source"] == "files" and before["weights"]["folder"] == str(checkpoint)
    assert _identity(checkpoint)["digest"] == before["digest"], "an untouched folder keeps its identity"
    _edit_weights(checkpoint, PARAMETER_GROUPS[group])
    assert _identity(checkpoint)["digest"] != before["digest"]


@pytest.mark.parametrize(
    "side_file, edit",
    [
        ("tokenizer.json", lambda d: {**d, "added_tokens": d["added_tokens"][:-1]}),
        ("tokenizer_config.json", lambda d: {**d, "chat_template": "{{ messages[0]['content'] }}"}),
        ("generation_config.json", lambda d: {**d, "max_new_tokens": 3}),
    ],
)
def test_editing_a_tokenizer_chat_template_or_generation_file_changes_the_identity(checkpoint, side_file, edit):
    path = checkpoint / side_file
    if side_file == "tokenizer_config.json" and "chat_template" not in json.loads(path.read_text()):
        path = next(checkpoint.glob("chat_template.*"))  # the template saved beside the tokenizer
        before = _identity(checkpoint)
        path.write_text(path.read_text().replace("{{", "{{- ", 1))
    else:
        before = _identity(checkpoint)
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert _identity(checkpoint)["digest"] != before["digest"]


def test_a_tokenizer_text_file_counts_and_a_readme_does_not(checkpoint):
    before = _identity(checkpoint)
    (checkpoint / "README.md").write_text("a model card")
    assert _identity(checkpoint)["digest"] == before["digest"]
    (checkpoint / "merges.txt").write_text("#version: 0.2\na b\n")
    assert _identity(checkpoint)["digest"] != before["digest"], "merges.txt shapes the tokens"


def test_a_known_file_is_not_read_again(checkpoint, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    first = FileHasher(tmp_path / "hashes.json")
    identity = weights_identity(model, first)
    assert first.bytes_read > 0
    second = FileHasher(tmp_path / "hashes.json")
    assert weights_identity(model, second) == identity
    assert second.bytes_read == 0, "the second run reads no file: every hash comes from the cache"
    _edit_weights(checkpoint, PARAMETER_GROUPS["projector"])
    third = FileHasher(tmp_path / "hashes.json")
    assert weights_identity(model, third) != identity and third.bytes_read > 0


def test_a_model_without_files_is_identified_by_every_tensor():
    model = random_llama()
    before = weights_identity(model)
    assert before["source"] == "tensors"
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    assert weights_identity(model)["sha256"] != before["sha256"]


def test_lmms_talo_and_source_installs_carry_a_digest_of_their_code():
    versions = library_versions("lmms-eval")
    assert versions["lmms-talo@source"] == source_digest("lmms-talo") and len(versions["lmms-talo@source"]) == 16
    for library in ("torchvision", "tokenizers", "pillow", "qwen-vl-utils", "flash-attn"):
        assert library in versions, f"{library} can change an answer: it is keyed (None when not installed)"


def test_a_task_function_is_keyed_by_its_code_not_only_its_name():
    from types import SimpleNamespace

    def task_with(process_results):
        config = SimpleNamespace(process_results=process_results)
        return SimpleNamespace(config=config, dump_config=lambda: {"task": "t", "process_results": process_results})

    namespace: dict = {}
    exec("def process_results(doc, results):\n    return {'acc': 1.0}\n", namespace)
    first = task_config_identity(task_with(namespace["process_results"]), set())
    exec("def process_results(doc, results):\n    return {'acc': 0.0}\n", namespace)
    changed = task_config_identity(task_with(namespace["process_results"]), set())
    assert first != changed


SHOTS, LAYERS = 3, 2
PROBE_RESULTS = SHOTS * (1 + LAYERS)


def _run(tmp_path, name, folder, state, task):
    args = (
        f"pretrained={folder},{LMMS_EVAL_MODEL_ARGS['llava']},probe_shots={SHOTS},layers=1-{LAYERS},"
        f"max_redraws=0,replay=false,state_dir={state},report={tmp_path / name}.json"
    )
    run_lmms_eval("talo_llava", args, "talo_id", task, tmp_path / f"out_{name}")
    (group,) = json.loads((tmp_path / f"{name}.json").read_text())["subtasks"]
    return group["probe_docs_computed"], group["probe_docs_reused"]


@pytest.mark.e2e
def test_an_in_place_edit_makes_the_next_cli_run_recompute(checkpoint, tmp_path):
    """Through the real lmms-eval CLI with one state_dir: an edited projector, then an edited chat
    template, each recompute every probe pass; an unchanged rerun reuses them all."""
    task = write_image_task(tmp_path / "task", "talo_id", [f"a{i % 3}" for i in range(9)])
    state = tmp_path / "state"
    assert _run(tmp_path, "first", checkpoint, state, task) == (PROBE_RESULTS, 0)
    assert _run(tmp_path, "same", checkpoint, state, task) == (0, PROBE_RESULTS)
    _edit_weights(checkpoint, PARAMETER_GROUPS["projector"])
    assert _run(tmp_path, "projector", checkpoint, state, task) == (PROBE_RESULTS, 0)
    template = next(checkpoint.glob("chat_template.*"), checkpoint / "tokenizer_config.json")
    template.write_text(template.read_text().replace("{{", "{{- ", 1))
    assert _run(tmp_path, "template", checkpoint, state, task) == (PROBE_RESULTS, 0)
