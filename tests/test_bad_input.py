"""Bad input fails early with an error that names the problem and the fix."""

import re

import pytest
from cli_tasks import write_image_task
from tiny_models import LMMS_EVAL_MODEL_ARGS

from lmms_talo.method.config import TaloArgumentError, TaloConfig, parse_layers
from lmms_talo.method.interventions import InterventionError
from lmms_talo.method.subtasks import CategoryFieldError


def test_layer_specs_parse_ranges_and_lists_in_order_or_name_the_bad_value():
    assert parse_layers("1-3") == (1, 2, 3)
    assert parse_layers("1..3;7") == (1, 2, 3, 7)
    assert parse_layers("5|2") == (5, 2)
    assert parse_layers(None) is None
    with pytest.raises(TaloArgumentError, match="range '5-2' is empty"):
        parse_layers("5-2")
    with pytest.raises(TaloArgumentError, match="cannot parse layers='a-b'"):
        parse_layers("a-b")
    assert parse_layers(-1.0) == (-1,), "the harness's parser reads -1 as -1.0: it is the layer the user typed"


@pytest.mark.parametrize(
    "args, message",
    [
        ({"intervention": "zeroes"}, "unknown intervention 'zeroes'"),
        ({"probe_shots": "0"}, "probe_shots must be at least 1"),
        ({"probe_shots": "ten"}, "bad value for model arg probe_shots='ten'"),
        ({"granularity": "doc"}, "granularity must be one of"),
        ({"layers": ";"}, "names no layer"),
        ({"resample_rounds": "3"}, "resample_rounds was removed"),
        ({"select_rule": "ttest"}, "select_rule='ttest' is unknown: choose one of gain, sign_test, maxt"),
        ({"threshold": "nan"}, "threshold must be a finite number, got nan"),
        ({"select_alpha": "nan"}, "select_alpha must be a finite number"),
        ({"state_dir": ""}, "state_dir is empty: give the probe store's folder"),
        ({"select_alpha": "1.5"}, "select_alpha must lie strictly between 0 and 1"),
        ({"select_resamples": "0"}, "select_resamples must be at least 1"),
        ({"max_layers": "0"}, "max_layers must be at least 1"),
        ({"transfer": "true", "compare_base": "false"}, "drop compare_base=false"),
        ({"test_all_layers": "maybe"}, "bad value for model arg test_all_layers"),
    ],
)
def test_bad_model_args_are_refused_with_a_message_naming_the_problem(args, message):
    with pytest.raises((TaloArgumentError, InterventionError), match=re.escape(message)):
        TaloConfig.pop_from(dict(args))


def test_talo_args_are_removed_before_the_base_class():
    kwargs = {"probe_shots": "15", "layers": "2-4", "pretrained": "x", "device": "cpu", "category_field": "cat"}
    config = TaloConfig.pop_from(kwargs)
    assert kwargs == {"pretrained": "x", "device": "cpu"}
    # auto: category_field makes it per category
    assert (config.probe_shots, config.layers, config.granularity) == (15, (2, 3, 4), "auto")


@pytest.fixture(scope="module")
def llava_cls():
    from lmms_eval.models import get_model

    return get_model("talo_llava", force_simple=True)


def _build(cls, model_dir, extra):
    return cls.create_from_arg_string(f"pretrained={model_dir},{LMMS_EVAL_MODEL_ARGS['llava']},{extra}")


def test_layer_out_of_range_at_load(llava_cls, tiny_model_dir):
    with pytest.raises(
        InterventionError, match="layers 4, 5, 6, 7, 8, 9 are out of range: the language backbone has 4 decoder layers"
    ):
        _build(llava_cls, tiny_model_dir("llava"), "layers=1-9")
    with pytest.raises(InterventionError, match="layer 4 is out of range"):
        _build(llava_cls, tiny_model_dir("llava"), "force_layer=4")


def _evaluate(lm, folder, task):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(folder)), batch_size=1)


@pytest.mark.e2e
def test_missing_category_field(llava_cls, tiny_model_dir, tmp_path):
    folder = write_image_task(tmp_path, "talo_nocat", ["a"] * 12)
    lm = _build(llava_cls, tiny_model_dir("llava"), "probe_shots=2,category_field=subject,state_dir=none")
    with pytest.raises(CategoryFieldError, match="no field 'subject'.*one of: question, answer, image, category"):
        _evaluate(lm, folder, "talo_nocat")


@pytest.mark.e2e
def test_empty_category_value(llava_cls, tiny_model_dir, tmp_path):
    folder = write_image_task(tmp_path, "talo_blankcat", ["a"] * 12, categories=["x"] * 11 + ["  "])
    lm = _build(llava_cls, tiny_model_dir("llava"), "probe_shots=2,category_field=category,state_dir=none")
    with pytest.raises(CategoryFieldError, match="a doc has an empty 'category' value; choose another category_field"):
        _evaluate(lm, folder, "talo_blankcat")


@pytest.mark.e2e
def test_category_granularity_without_a_known_field(llava_cls, tiny_model_dir, tmp_path):
    folder = write_image_task(tmp_path, "talo_unknown", ["a"] * 12)
    lm = _build(llava_cls, tiny_model_dir("llava"), "probe_shots=2,granularity=category,state_dir=none")
    with pytest.raises(CategoryFieldError, match="no known category field: set category_field"):
        _evaluate(lm, folder, "talo_unknown")


@pytest.mark.e2e
def test_failed_generation_in_a_probe_is_an_error_not_a_zero(llava_cls, tiny_model_dir, tmp_path):
    from lmms_talo.harness.failures import GenerationFailed

    folder = write_image_task(tmp_path, "talo_broken", ["a"] * 12)
    yaml = folder / "talo_broken.yaml"
    yaml.write_text(yaml.read_text().replace("max_new_tokens: 4", "max_new_tokens: 4\n  num_beams: 0"))
    lm = _build(llava_cls, tiny_model_dir("llava"), "probe_shots=2,state_dir=none")
    with pytest.raises(GenerationFailed, match="during a TaLo probe pass"):
        _evaluate(lm, folder, "talo_broken")
