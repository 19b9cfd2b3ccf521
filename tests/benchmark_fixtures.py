"""Small stand-ins for the paper's benchmarks: the real datasets' columns, feature types and values.

Each fixture has the columns and `datasets` feature types of the Hugging Face dataset that the
bundled talo_* configs load (Image features, answer format, category values), with random images
and made-up questions, so lmms-eval's own prompt and scoring functions run on them unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import datasets
from tiny_models import example_image

LETTERS = "ABCD"
_S = datasets.Value("string")


def _letter(rng: random.Random, count: int = 4) -> str:
    return LETTERS[rng.randrange(count)]


def mmstar(categories: dict[str, int], seed: int = 0) -> datasets.Dataset:
    """Lin-Chen/MMStar (val): index, question, image, answer, category, l2_category, meta_info."""
    from lmms_eval.tasks.mmstar.utils import eval_type_dict

    rng, rows = random.Random(seed), []
    for category, count in categories.items():
        l2s = eval_type_dict[category]
        for i in range(count):
            rows.append(
                {
                    "index": len(rows),
                    "image": example_image(seed=len(rows)),
                    "answer": _letter(rng),
                    "question": (
                        "Which option describes the object in the image?\n"
                        "Options: A: a cat, B: a dog, C: a car, D: a tree"
                    ),
                    "category": category,
                    "l2_category": l2s[i % len(l2s)],
                    "meta_info": {"source": "MMBench", "split": "val", "image_path": f"images/{len(rows)}.jpg"},
                }
            )
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "question": _S,
            "image": datasets.Image(),
            "answer": _S,
            "category": _S,
            "l2_category": _S,
            "meta_info": {"source": _S, "split": _S, "image_path": _S},
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def mmbench_en_dev(categories: dict[str, int], seed: int = 0, circular: int = 2) -> datasets.Dataset:
    """lmms-lab-encoder/MMBench (en, dev): rows of a question and its circular copies (index + k * 1e6)."""
    l2_of = {
        "ocr": "finegrained_perception (instance-level)",
        "image_scene": "coarse_perception",
        "physical_relation": "relation_reasoning",
    }
    rng, rows, main = random.Random(seed), [], 0
    for category, count in categories.items():
        made = 0
        while made < count:
            options = ["red", "green", "blue", "yellow"]
            answer = rng.randrange(4)
            for shift in range(min(circular, count - made)):
                rotated = options[shift:] + options[:shift]
                rows.append(
                    {
                        "index": main + shift * 1_000_000,
                        "question": "What color is the object?",
                        "hint": None if main % 2 else "Look at the picture.",
                        "A": rotated[0],
                        "B": rotated[1],
                        "C": rotated[2],
                        "D": rotated[3],
                        "answer": LETTERS[(answer - shift) % 4],
                        "category": category,
                        "image": example_image(seed=main),
                        "source": "fixture",
                        "L2-category": l2_of.get(category, "attribute_reasoning"),
                        "comment": "",
                        "split": "dev",
                    }
                )
                made += 1
            main += 1
    features = datasets.Features(
        {
            "index": datasets.Value("int64"),
            "question": _S,
            "hint": _S,
            "A": _S,
            "B": _S,
            "C": _S,
            "D": _S,
            "answer": _S,
            "category": _S,
            "image": datasets.Image(),
            "source": _S,
            "L2-category": _S,
            "comment": _S,
            "split": _S,
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def mmmu_val(subjects: dict[str, int], seed: int = 0) -> datasets.Dataset:
    """lmms-lab-encoder/MMMU (validation): id validation_<Subject>_<n>, options as a Python-literal
    string, image_1..7."""
    rng, rows = random.Random(seed), []
    for subject, count in subjects.items():
        for n in range(1, count + 1):
            open_question = n % 5 == 0
            row = {
                "id": f"validation_{subject}_{n}",
                "question": "<image 1> Which object is shown?"
                if not open_question
                else "<image 1> How many objects are shown?",
                "options": "[]" if open_question else "['a cat', 'a dog', 'a car', 'a tree']",
                "explanation": "",
                "img_type": "['Photographs']",
                "answer": str(rng.randrange(1, 4)) if open_question else _letter(rng),
                "topic_difficulty": "Easy",
                "question_type": "open" if open_question else "multiple-choice",
                "subfield": subject.replace("_", " "),
            }
            for k in range(1, 8):
                row[f"image_{k}"] = example_image(seed=len(rows)) if k == 1 else None
            rows.append(row)
    features = datasets.Features(
        {
            "id": _S,
            "question": _S,
            "options": _S,
            "explanation": _S,
            **{f"image_{k}": datasets.Image() for k in range(1, 8)},
            "img_type": _S,
            "answer": _S,
            "topic_difficulty": _S,
            "question_type": _S,
            "subfield": _S,
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def scienceqa_img(categories: dict[str, int], seed: int = 0) -> datasets.Dataset:
    """lmms-lab-encoder/ScienceQA (ScienceQA-IMG, test): choices a list, answer the int8 index of the right one."""
    rng, rows = random.Random(seed), []
    for category, count in categories.items():
        for _ in range(count):
            choices = ["attract", "repel"] if len(rows) % 2 else ["north", "south", "east"]
            rows.append(
                {
                    "image": example_image(seed=len(rows)),
                    "question": "Which is correct?",
                    "choices": choices,
                    "answer": rng.randrange(len(choices)),
                    "hint": "" if len(rows) % 3 else "Look at the picture.",
                    "task": "closed choice",
                    "grade": "grade5",
                    "subject": "natural science",
                    "topic": "physics",
                    "category": category,
                    "skill": "Use the picture",
                    "lecture": "",
                    "solution": "",
                }
            )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": _S,
            "choices": datasets.Sequence(_S),
            "answer": datasets.Value("int8"),
            "hint": _S,
            "task": _S,
            "grade": _S,
            "subject": _S,
            "topic": _S,
            "category": _S,
            "skill": _S,
            "lecture": _S,
            "solution": _S,
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def seedbench(question_types: dict[int, int], seed: int = 0, videos: int = 3) -> datasets.Dataset:
    """lmms-lab-encoder/SEED-Bench (test): image is a list of images; a few video rows (type 10) too."""
    rng, rows = random.Random(seed), []
    for type_id, count in [*question_types.items(), (10, videos)]:
        for _ in range(count):
            video = type_id >= 10
            rows.append(
                {
                    "answer": _letter(rng),
                    "choice_a": "one",
                    "choice_b": "two",
                    "choice_c": "three",
                    "choice_d": "four",
                    "data_id": f"{len(rows)}.jpg",
                    "data_type": "video" if video else "image",
                    "question": "How many objects are there?",
                    "question_id": str(100 + len(rows)),
                    "question_type_id": type_id,
                    "image": [example_image(seed=len(rows) + f) for f in range(3 if video else 1)],
                    "segment": [0, 8] if video else None,
                }
            )
    features = datasets.Features(
        {
            "answer": _S,
            "choice_a": _S,
            "choice_b": _S,
            "choice_c": _S,
            "choice_d": _S,
            "data_id": _S,
            "data_type": _S,
            "question": _S,
            "question_id": _S,
            "question_type_id": datasets.Value("int64"),
            "image": datasets.Sequence(datasets.Image()),
            "segment": datasets.Sequence(datasets.Value("int64")),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


FIXTURES: dict[str, Callable[..., datasets.Dataset]] = {
    "mmstar": mmstar,
    "mmbench_en_dev": mmbench_en_dev,
    "mmmu_val": mmmu_val,
    "scienceqa_img": scienceqa_img,
    "seedbench": seedbench,
}


def write_fixture(folder: Path, bench: str, dataset: datasets.Dataset) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bench}.parquet"
    dataset.to_parquet(str(path))
    return path
