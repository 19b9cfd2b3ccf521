"""BIG-bench conversion: task JSONs read from an sdist-shaped archive, docs, prompts, YAMLs that both
harnesses load, and the generation scorer. The archive is written here, in the sdist's layout."""

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from lmms_talo.demo.bigbench import (
    BigBenchError,
    convert_task,
    harness_task_name,
    mentioned_options,
    multiple_choice_docs,
    read_task_jsons,
    score_generation,
)

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light"]


def _mc_task(n=24, prefix="Pick the word.\n"):
    """n examples whose correct option is always listed first, as many BIG-bench tasks do."""
    examples = [
        {"input": f"Which word is number {i}?", "target_scores": {WORDS[(i + j) % 8]: int(j == 0) for j in range(4)}}
        for i in range(n)
    ]
    examples.append({"input": "Two right answers?", "target_scores": {"apple": 1, "river": 1, "stone": 0}})
    return {"name": "toy_mc", "task_prefix": prefix, "examples": examples}


def _sdist(path, tasks: dict):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in tasks.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def archive(tmp_path):
    return _sdist(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            "toy_mc": _mc_task(),
            "family": {"name": "family", "subtasks": ["sub_a"]},
            "family/sub_a": _mc_task(6, prefix=""),
            "generative": {"name": "generative", "examples": [{"input": "2+2?", "target": "4"}]},
        },
    )


def test_task_jsons_are_extracted_once_and_then_read_from_the_cache(tmp_path, archive):
    cache = tmp_path / "json"
    tasks = read_task_jsons(archive, ["toy_mc", "family/sub_a"], cache)
    assert tasks["toy_mc"] == _mc_task()
    assert len(tasks["family/sub_a"]["examples"]) == 7
    archive.unlink()
    assert (
        read_task_jsons(archive, ["family/sub_a"], cache)["family/sub_a"]["examples"][0]["input"]
        == "Which word is number 0?"
    )


def test_an_unknown_task_names_the_similar_ones(tmp_path, archive):
    with pytest.raises(BigBenchError, match=r"'family/sub_b'.*family/sub_a"):
        read_task_jsons(archive, ["family/sub_b"], tmp_path / "json")


def test_parent_and_generative_tasks_are_refused_with_the_fix(tmp_path, archive):
    tasks = read_task_jsons(archive, ["family", "generative"], tmp_path / "json")
    with pytest.raises(BigBenchError, match="family/<subtask>"):
        multiple_choice_docs(tasks["family"], "family", None, 0)
    with pytest.raises(BigBenchError, match="no multiple-choice examples"):
        multiple_choice_docs(tasks["generative"], "generative", None, 0)


def test_docs_shuffle_options_keep_the_answer_and_drop_ties():
    docs, dropped = multiple_choice_docs(_mc_task(), "toy_mc", None, seed=0)
    assert dropped == 1 and len(docs) == 24
    for i, doc in enumerate(docs):
        assert doc["answer_text"] == WORDS[i % 8] == doc["options"][doc["answer"]]
        assert sorted(doc["options"]) == sorted(WORDS[(i + j) % 8] for j in range(4))
        assert doc["answer_letter"] == "ABCD"[doc["answer"]]
    # the source lists the answer first; after the seeded shuffle it sits in every position
    assert {d["answer"] for d in docs} == {0, 1, 2, 3}
    assert docs == multiple_choice_docs(_mc_task(), "toy_mc", None, seed=0)[0]
    assert docs != multiple_choice_docs(_mc_task(), "toy_mc", None, seed=1)[0]


def test_cloze_prompt_is_prefix_and_question_and_lettered_adds_the_options_in_doc_order():
    doc = multiple_choice_docs(_mc_task(), "toy_mc", None, seed=0)[0][0]
    assert doc["prompt_cloze"] == "Pick the word.\n\nQuestion: Which word is number 0?\nAnswer:"
    lettered = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", doc["options"]))
    assert doc["prompt_lettered"] == f"Pick the word.\n\nQuestion: Which word is number 0?\n{lettered}\nAnswer:"


def test_limit_draws_a_seeded_subset_in_task_order():
    full = multiple_choice_docs(_mc_task(), "toy_mc", None, seed=0)[0]
    some = multiple_choice_docs(_mc_task(), "toy_mc", 10, seed=0)[0]
    assert len(some) == 10 and some == multiple_choice_docs(_mc_task(), "toy_mc", 10, seed=0)[0]
    examples = [d["example"] for d in some]
    assert examples == sorted(examples) and all(d in full for d in some)


def test_harness_task_names_are_bb_prefixed_with_a_style_suffix_and_a_bad_style_lists_the_styles():
    assert harness_task_name("arithmetic/1_digit_addition") == "bb_arithmetic_1_digit_addition"
    assert harness_task_name("general_knowledge", "generate") == "bb_general_knowledge_gen"
    assert harness_task_name("general_knowledge", "lettered") == "bb_general_knowledge_lettered"
    with pytest.raises(BigBenchError, match="cloze, lettered, generate"):
        harness_task_name("general_knowledge", "letters")


@pytest.mark.parametrize(
    "response, right",
    [
        (" The answer is Four.", True),
        ("four or six", False),  # names a wrong option too
        ("fourteen", False),  # whole words only
        ("", False),
        ("two", False),
    ],
)
def test_generation_is_right_iff_it_names_the_answer_and_no_other_option(response, right):
    doc = {"options": ["two", "four", "six"], "answer": 1}
    assert score_generation(doc, [response]) == {"acc": float(right)}


def test_mentioned_options_normalise_case_and_punctuation_and_keep_signs():
    assert mentioned_options("It's Mr. Smith!", ["mr smith", "mrs smith", "it s"]) == {0, 2}
    assert mentioned_options(" 0 - 9 = 1", ["-9", "9", "1", "banana"]) == {1, 2}
    assert mentioned_options("It is -9.", ["-9", "9"]) == {0}


def test_converted_tasks_load_in_both_harnesses(tmp_path):
    out = tmp_path / "tasks"
    converted = convert_task(_mc_task(), "toy_mc", out, styles=("cloze", "lettered", "generate"), limit=12)
    assert [c.name for c in converted] == ["bb_toy_mc", "bb_toy_mc_lettered", "bb_toy_mc_gen"]
    assert all(c.docs == 12 and c.dropped == 1 and c.chance == 0.25 for c in converted)
    rows = pq.read_table(converted[0].parquet).to_pylist()
    assert len(rows) == 12 and {c.parquet for c in converted} == {converted[0].parquet}

    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(out / "lm_eval"), include_defaults=False).load([c.name for c in converted])[
        "tasks"
    ]
    cloze, lettered, gen = (tasks[c.name] for c in converted)
    doc = cloze.eval_docs[0]
    assert cloze.OUTPUT_TYPE == lettered.OUTPUT_TYPE == "multiple_choice"
    assert cloze.doc_to_text(doc) == rows[0]["prompt_cloze"] and lettered.doc_to_text(doc) == rows[0]["prompt_lettered"]
    assert cloze.doc_to_choice(doc) == rows[0]["options"] and cloze.doc_to_target(doc) == rows[0]["answer"]
    assert gen.OUTPUT_TYPE == "generate_until" and gen.config.generation_kwargs["max_gen_toks"] == 10
    assert gen.process_results(doc, [f" {rows[0]['answer_text']}"]) == {"acc": 1.0}

    for folder, length_key in (("lmms", "max_new_tokens"), ("lm_eval", "max_gen_toks")):
        text = (out / folder / "bb_toy_mc_gen.yaml").read_text()
        assert f"{length_key}: 10" in text and "process_results: !function utils.process_results" in text
        assert (out / folder / "utils.py").exists()


def test_demo_task_folders_are_keyed_by_the_task_list_and_limits(tmp_path):
    """A run with other limits (the validity study) writes its own folder, never over the demo's."""
    from lmms_talo.demo.driver import DemoTask, tasks_folder

    demo = [DemoTask("general_knowledge"), DemoTask("arithmetic/1_digit_addition", "generate", 80)]
    assert tasks_folder(tmp_path, demo) == tasks_folder(tmp_path, demo[::-1])
    assert tasks_folder(tmp_path, demo) != tasks_folder(
        tmp_path, [demo[0], DemoTask("arithmetic/1_digit_addition", "generate", 150)]
    )
    assert tasks_folder(tmp_path, demo) != tasks_folder(tmp_path, demo[:1])


def test_one_task_asked_for_with_two_limits_is_refused_before_anything_is_built(tmp_path):
    from lmms_talo.demo.driver import DemoTask, prepare

    tasks = [DemoTask("arithmetic/1_digit_addition", "cloze", 80), DemoTask("arithmetic/1_digit_addition", "generate")]
    with pytest.raises(ValueError, match="two limits"):
        prepare(tmp_path, tasks, print)
    assert not any(tmp_path.iterdir())
