"""BIG-bench multiple-choice tasks as local evaluation tasks for lmms-eval and lm-eval.

The BIG-bench sdist holds every JSON task as `bigbench/benchmark_tasks/<name>/task.json` (sub-tasks
one folder deeper: `<task>/<subtask>/task.json`). A multiple-choice example has an `input` and
`target_scores` (option text -> score). Conversion turns each example into one doc:

* `options`: the option texts in a seeded shuffle (BIG-bench often lists the correct option
  first; a fixed order would reward a model that always picks the first letter);
* `answer`: the index of the single best-scored option (examples with tied best options are
  dropped, and counted); `answer_text`: its text;
* `prompt_cloze`: the task's own prefix, `Question: <input>` and `Answer:`;
* `prompt_lettered`: the same with the options listed as `A. ...`, `B. ...` before `Answer:`.

One source task gives up to three harness tasks (STYLES), all on the same parquet file:
* `bb_<name>` (cloze) and `bb_<name>_lettered`: `output_type: multiple_choice`, each option's
  text scored by its likelihood after the prompt (the `loglikelihood` request path);
* `bb_<name>_gen`: `generate_until` on the cloze prompt, right iff the answer names the correct
  option and no other (`score_generation`).
Small models can do much better on the cloze form: a listed set of options pulls their likelihood
towards whatever was listed (SmolLM2-135M on general_knowledge: 0.20 lettered, 0.48 cloze).

Each harness gets its own YAML (they differ in small ways, e.g. the name of the generation-length
key); the parquet file is shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TASKS_DIR = "/bigbench/benchmark_tasks/"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GENERATE_MAX_NEW_TOKENS = 10  # options are short: an answer that names one needs few tokens
STYLES = ("cloze", "lettered", "generate")
_SUFFIX = {"cloze": "", "lettered": "_lettered", "generate": "_gen"}


class BigBenchError(ValueError):
    """A BIG-bench task cannot be found or converted."""


@dataclass(frozen=True)
class ConvertedTask:
    """What conversion wrote, and what a reader needs to judge the scores."""

    name: str  # harness task name, e.g. bb_general_knowledge
    source: str  # BIG-bench name, e.g. general_knowledge
    style: str  # one of STYLES
    parquet: Path
    docs: int
    dropped: int  # examples without a single best option
    chance: float  # expected accuracy of a uniformly random option

    def to_dict(self) -> dict:
        return {**self.__dict__, "parquet": str(self.parquet)}


def harness_task_name(source: str, style: str = "cloze") -> str:
    if style not in STYLES:
        raise BigBenchError(f"unknown prompt style {style!r}: use one of {', '.join(STYLES)}")
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", source).strip("_").lower()
    return f"bb_{slug}{_SUFFIX[style]}"


def read_task_jsons(archive: Path, names: Iterable[str], extract_to: Path) -> dict[str, dict]:
    """The task.json of each BIG-bench task name, extracted once from the sdist into `extract_to`."""
    names = list(dict.fromkeys(names))
    missing = [n for n in names if not (extract_to / n / "task.json").exists()]
    if missing:
        found_names: set[str] = set()
        with tarfile.open(archive) as tar:
            for member in tar:
                if not member.name.endswith("/task.json") or TASKS_DIR not in member.name:
                    continue
                name = member.name.split(TASKS_DIR, 1)[1][: -len("/task.json")]
                found_names.add(name)
                if name in missing:
                    target = extract_to / name / "task.json"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_name(f"task.json.{os.getpid()}.part")  # a reader never sees half a file
                    partial.write_bytes(tar.extractfile(member).read())
                    partial.replace(target)
        absent = [n for n in missing if n not in found_names]
        if absent:
            hints = {n: sorted(f for f in found_names if f.startswith(n.split("/")[0])) for n in absent}
            raise BigBenchError(
                "BIG-bench has no JSON task "
                + "; ".join(f"{n!r} (similar: {', '.join(h[:8]) or 'none'})" for n, h in hints.items())
                + ". Names are folder names under bigbench/benchmark_tasks, sub-tasks as task/subtask."
            )
    return {n: json.loads((extract_to / n / "task.json").read_text(encoding="utf-8")) for n in names}


def _rng(seed: int, *parts) -> np.random.Generator:
    digest = hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def format_prompt(prefix: str, question: str, options: list[str] | None = None) -> str:
    """The task prefix, `Question: ...`, the options lettered A, B, ... (when given), `Answer:`."""
    body = [f"Question: {question.strip()}"] if question.strip() else []
    if options:
        body += [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    body.append("Answer:")
    return "\n\n".join(part for part in (prefix.strip(), "\n".join(body)) if part)


def multiple_choice_docs(task: dict, source: str, limit: int | None, seed: int) -> tuple[list[dict], int]:
    """(docs, number of dropped examples) of one BIG-bench task; `limit` docs at most, a seeded sample."""
    examples = task.get("examples") or []
    if not examples:
        raise BigBenchError(
            f"BIG-bench task {source!r} has no examples of its own; it is a parent of sub-tasks: "
            f"name one as {source}/<subtask>"
        )
    prefix = task.get("task_prefix", "") or ""
    docs, dropped = [], 0
    for index, example in enumerate(examples):
        scores = example.get("target_scores")
        if not scores:
            continue
        best = max(scores.values())
        winners = [option for option, score in scores.items() if score == best]
        if len(winners) != 1 or best <= 0 or len(scores) > len(LETTERS):
            dropped += 1
            continue
        options = [str(o).strip() for o in scores]
        order = _rng(seed, source, "options", index).permutation(len(options)).tolist()
        options = [options[i] for i in order]
        answer = options.index(str(winners[0]).strip())
        question = str(example.get("input", ""))
        docs.append(
            {
                "example": index,
                "question": question,
                "options": options,
                "answer": answer,
                "answer_letter": LETTERS[answer],
                "answer_text": options[answer],
                "prompt_cloze": format_prompt(prefix, question),
                "prompt_lettered": format_prompt(prefix, question, options),
            }
        )
    if not docs:
        raise BigBenchError(
            f"BIG-bench task {source!r} has no multiple-choice examples (no target_scores with one best "
            f"option): only multiple-choice JSON tasks can be converted"
        )
    if limit is not None and limit < len(docs):
        keep = sorted(_rng(seed, source, "sample").choice(len(docs), size=limit, replace=False).tolist())
        docs = [docs[i] for i in keep]
    return docs, dropped


_WORDS = re.compile(r"-?\d+(?:\.\d+)?|[a-z0-9]+")


def _words(text: str) -> str:
    """Lower-case words and signed numbers ("-9" stays negative, "0 - 9" is 0 and 9), space-separated."""
    return " ".join(_WORDS.findall(text.lower()))


def mentioned_options(response: str, options: list[str]) -> set[int]:
    """Indices of the options whose words appear in the response as a whole-word run."""
    said = f" {_words(response)} "
    return {i for i, option in enumerate(options) if _words(option) and f" {_words(option)} " in said}


def score_generation(doc: dict, results: list) -> dict:
    """process_results of the generation variant: right iff the answer names the correct option and no other."""
    response = results[0] if results else ""
    response = response if isinstance(response, str) else str(response)
    mentioned = mentioned_options(response, list(doc["options"]))
    return {"acc": float(mentioned == {int(doc["answer"])})}


def chance_level(docs: list[dict]) -> float:
    return float(np.mean([1.0 / len(d["options"]) for d in docs]))


UTILS_PY = '''"""process_results of the BIG-bench generation variants (written by lmms-talo)."""
from lmms_talo.demo.bigbench import score_generation


def process_results(doc, results):
    return score_generation(doc, results)
'''


def parquet_task_yaml(name: str, parquet: Path, body: str) -> str:
    """A local task over one parquet file (its test split), then `body`: shared by the demo's tasks."""
    head = f"""\
        task: {name}
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {json.dumps(str(parquet))}
        test_split: test
        """
    return textwrap.dedent(head) + textwrap.dedent(body)


def task_yaml(name: str, parquet: Path, style: str, harness: str) -> str:
    """The YAML of one converted task for `harness` ("lmms" or "lm_eval")."""
    if harness not in ("lmms", "lm_eval"):
        raise BigBenchError(f"unknown harness {harness!r}")
    if style == "generate":
        length_key = "max_new_tokens" if harness == "lmms" else "max_gen_toks"
        body = f"""\
            output_type: generate_until
            doc_to_text: prompt_cloze
            doc_to_target: answer_text
            generation_kwargs:
              until: ["\\n"]
              {length_key}: {GENERATE_MAX_NEW_TOKENS}
              do_sample: false
            process_results: !function utils.process_results
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """
    else:
        body = f"""\
            output_type: multiple_choice
            doc_to_text: prompt_{style}
            doc_to_choice: options
            doc_to_target: answer
            target_delimiter: " "
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
              - metric: acc_norm
                aggregation: mean
                higher_is_better: true
            """
    return parquet_task_yaml(name, parquet, body)


def convert_task(
    task: dict,
    source: str,
    out_dir: Path,
    styles: Iterable[str] = ("cloze",),
    limit: int | None = None,
    seed: int = 0,
) -> list[ConvertedTask]:
    """Write `<out_dir>/data/bb_<name>.parquet` and, for each style, the task YAML of each harness
    under `<out_dir>/lmms/` and `<out_dir>/lm_eval/`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    styles = list(dict.fromkeys(styles))
    names = [harness_task_name(source, style) for style in styles]  # checks the styles first
    docs, dropped = multiple_choice_docs(task, source, limit, seed)
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    parquet = (data_dir / f"{harness_task_name(source)}.parquet").resolve()
    pq.write_table(pa.Table.from_pylist(docs), parquet)
    converted = []
    for style, name in zip(styles, names):
        for harness in ("lmms", "lm_eval"):
            folder = out_dir / harness
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.yaml").write_text(task_yaml(name, parquet, style, harness))
            if style == "generate":
                (folder / "utils.py").write_text(UTILS_PY)
        converted.append(ConvertedTask(name, source, style, parquet, len(docs), dropped, chance_level(docs)))
    return converted


SDIST_REQUIREMENT = "bigbench==1.0.0"
SDIST = "bigbench-1.0.0.tar.gz"


def ensure_archive(cache: Path, say) -> Path:
    """The BIG-bench sdist (358 MB), downloaded once into the cache; it is read, never installed."""
    from lmms_talo.demo.pypi import fetch

    return fetch(SDIST_REQUIREMENT, SDIST, cache / "downloads", say, sdist=True)
