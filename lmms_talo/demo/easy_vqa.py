"""easy-VQA (the `easy-vqa` wheel on PyPI, MIT): 64x64 images of one coloured shape, with colour,
shape and yes/no questions, read from the wheel (never installed) and asked as lmms-eval
multiple-choice tasks, one sub-task per question type.

Each doc's options are its gold answer plus distractors of the same answer type (every shape, both
of yes/no, three other colours), scored by the likelihood of their text; `chance` is 1 / options.
"""

from __future__ import annotations

import io
import json
import random
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmms_talo.demo.bigbench import parquet_task_yaml

REQUIREMENT = "easy-vqa==1.0"
WHEEL = "easy_vqa-1.0-py3-none-any.whl"
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
COLOR_OPTIONS = 4  # the gold colour and three others
QUESTION_TYPES = {"color": COLORS, "shape": SHAPES, "yesno": YES_NO}
IMAGE_SIZE = 64


class EasyVqaError(RuntimeError):
    """The easy-VQA wheel is not what this module expects."""


@dataclass(frozen=True)
class Question:
    text: str  # as in the data: lower case, ends with "?"
    answer: str
    image: int  # image id within its split
    split: str  # "train" or "test"

    @property
    def kind(self) -> str:
        return question_type(self.answer)


def question_type(answer: str) -> str:
    for kind, answers in QUESTION_TYPES.items():
        if answer in answers:
            return kind
    raise EasyVqaError(f"answer {answer!r} is no colour, shape, yes or no")


def ensure_wheel(cache: Path, say: Callable[[str], None] = print) -> Path:
    from lmms_talo.demo.pypi import fetch

    return fetch(REQUIREMENT, WHEEL, cache / "downloads", say)


class EasyVqa:
    """The questions and images of one easy-VQA wheel."""

    def __init__(self, wheel: Path):
        self.archive = zipfile.ZipFile(wheel)

    def questions(self, split: str) -> list[Question]:
        raw = json.loads(self.archive.read(f"easy_vqa/data/{split}/questions.json"))
        return [Question(text, answer, int(image), split) for text, answer, image in raw]

    def image_bytes(self, split: str, image: int) -> bytes:
        return self.archive.read(f"easy_vqa/data/{split}/images/{image}.png")

    def image(self, split: str, image: int):
        from PIL import Image

        return Image.open(io.BytesIO(self.image_bytes(split, image))).convert("RGB")


def prompt_of(question: Question) -> str:
    return question.text[0].upper() + question.text[1:]


def options_of(question: Question, rng: random.Random) -> list[str]:
    """The gold answer and its distractors, shuffled."""
    answers = QUESTION_TYPES[question.kind]
    if question.kind == "color":
        options = [question.answer] + rng.sample([c for c in answers if c != question.answer], COLOR_OPTIONS - 1)
    else:
        options = list(answers)
    rng.shuffle(options)
    return options


def sample(questions: list[Question], kind: str, limit: int | None, seed: int) -> list[Question]:
    """Up to `limit` questions of one type, drawn with `seed` (the data's order when limit is None)."""
    chosen = [q for q in questions if q.kind == kind]
    if limit is not None and limit < len(chosen):
        chosen = random.Random(f"{seed}-{kind}").sample(chosen, limit)
    return chosen


VARIANTS = ("choice", "blind", "generate")  # likelihood of each option; the same, image blanked; a generated word


def task_name(kind: str, variant: str = "choice") -> str:
    return f"easyvqa_{kind}" + ("" if variant == "choice" else "_" + variant)


UTILS_PY = '''"""Visuals and generation scoring of the easy-VQA tasks (written by lmms-talo)."""
from PIL import Image


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_visual_blind(doc):
    return [Image.new("RGB", doc["image"].size, "white")]


def process_results(doc, results):
    words = results[0].strip().lower().split()
    return {"acc": float(bool(words) and words[0].strip(".,!") == doc["options"][doc["answer"]])}
'''


def task_yaml(name: str, parquet: Path, variant: str) -> str:
    metric = """\
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """
    if variant == "generate":
        body = """\
            output_type: generate_until
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: question
            doc_to_target: answer
            generation_kwargs:
              until: ["\\n", "."]
              max_new_tokens: 4
              do_sample: false
            process_results: !function utils.process_results
            """
    else:
        body = f"""\
            output_type: multiple_choice
            doc_to_visual: !function utils.doc_to_visual{"_blind" if variant == "blind" else ""}
            doc_to_text: question
            doc_to_choice: options
            doc_to_target: answer
            target_delimiter: ""
            """
    return parquet_task_yaml(name, parquet, textwrap.dedent(metric) + textwrap.dedent(body))


def parquet_of(out_dir: Path, kind: str) -> Path:
    return (out_dir / "data" / f"{task_name(kind)}.parquet").resolve()


@dataclass(frozen=True)
class ConvertedTask:
    name: str
    kind: str
    variant: str
    parquet: Path
    docs: int
    chance: float


def write_tasks(
    data: EasyVqa, out_dir: Path, limit: int | None, seed: int = 0, variants: tuple[str, ...] = ("choice",)
) -> list[ConvertedTask]:
    """lmms-eval tasks over easy-VQA's test questions, per question type and variant (VARIANTS):
    `<out_dir>/easyvqa_<kind>[_<variant>].yaml`, data in `<out_dir>/data/`. The `blind` variant's
    image is a blank white one.

    The folder is named by its limit and seed by the caller: files under one name never change."""
    import datasets

    questions = data.questions("test")
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "utils.py").write_text(UTILS_PY)
    converted = []
    for kind in QUESTION_TYPES:
        chosen = sample(questions, kind, limit, seed)
        rng = random.Random(f"{seed}-{kind}-options")
        rows = []
        for q in chosen:
            options = options_of(q, rng)
            rows.append(
                {
                    "question": prompt_of(q),
                    "options": options,
                    "answer": options.index(q.answer),
                    "kind": kind,
                    "image_id": q.image,
                    "image": {"bytes": data.image_bytes("test", q.image), "path": None},
                }
            )
        features = datasets.Features(
            {
                "question": datasets.Value("string"),
                "options": datasets.Sequence(datasets.Value("string")),
                "answer": datasets.Value("int64"),
                "kind": datasets.Value("string"),
                "image_id": datasets.Value("int64"),
                "image": datasets.Image(),
            }
        )
        parquet = parquet_of(out_dir, kind)
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(parquet))
        chance = sum(1.0 / len(r["options"]) for r in rows) / len(rows)
        for variant in variants:
            name = task_name(kind, variant)
            (out_dir / f"{name}.yaml").write_text(task_yaml(name, parquet, variant))
            converted.append(ConvertedTask(name, kind, variant, parquet, len(rows), chance))
    return converted
