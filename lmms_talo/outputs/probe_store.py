"""Probe results persisted the moment they are computed, so a crash mid-sweep loses nothing.

One JSON-lines file per fingerprint of everything that can change a probe answer (the adapter
builds it: model identity with its dtype and device type, the harness's model class and form, every
non-TaLo model arg, task config and generation kwargs, sub-task, intervention, seed, shots, request
type): a changed input gets a new file and never reuses stale results. Each line also records the
library versions it was computed under (transformers, torch, the harness); lines written under other
versions are not reused, and the log says so. Lines that do not parse or carry another fingerprint
are ignored with a warning, never trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import marshal
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmms_talo.logs import log
from lmms_talo.outputs.model_identity import cache_root

_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def fingerprint_of(payload: dict) -> str:
    """A digest of `payload`; object reprs lose their memory addresses, which change every run."""
    text = _ADDRESS.sub("", json.dumps(payload, sort_keys=True, default=str))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _function_identity(function: Any) -> str:
    """A task function by its code, not only its name: its source where it can be read, else its bytecode."""
    try:
        code = inspect.getsource(function).encode()
    except (OSError, TypeError):
        compiled = getattr(function, "__code__", None)
        code = marshal.dumps(compiled) if compiled is not None else _ADDRESS.sub("", repr(function)).encode()
    name = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__name__)}"
    return f"<function {name} sha256:{hashlib.sha256(code).hexdigest()[:16]}>"


def _with_code(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _with_code(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_with_code(v) for v in value]
    if callable(value) and not isinstance(value, type):
        return _function_identity(value)
    return value


def task_config_identity(task: Any, talo_args: set[str]) -> str:
    """The task's config as fingerprint text: its functions (process_results, doc_to_visual, ...) by
    their code, minus what varies between runs without changing the docs or prompts: reprs' memory
    addresses, and TaLo's own args, which lm-eval copies (with every model arg) into each task's
    `metadata` (those that matter are fingerprinted apart)."""
    if not hasattr(task, "dump_config"):
        return ""
    config = dict(task.dump_config())
    if isinstance(config.get("metadata"), dict):
        config["metadata"] = {k: v for k, v in config["metadata"].items() if k not in talo_args}
    for name in (
        "process_results",
        "doc_to_visual",
        "doc_to_text",
        "doc_to_target",
        "doc_to_choice",
        "doc_to_messages",
        "process_docs",
    ):
        function = getattr(getattr(task, "config", None), name, None)
        if callable(function):
            config[name] = function
    return _ADDRESS.sub("", repr(sorted(_with_code(config).items())))


def request_kwargs(requests: Iterable) -> list[str]:
    """The distinct keyword dicts (generation kwargs) among the requests' arguments, as text: the
    CLI's --gen_kwargs and the task's generation_kwargs both end up there."""
    return sorted(
        {
            json.dumps(arg, sort_keys=True, default=str)
            for request in requests
            for arg in request.args
            if isinstance(arg, dict)
        }
    )


def pool_content(task: Any, pool: Iterable, requests_of: Any) -> str:
    """A digest of what the probe docs are: each pool doc's request texts (the prompt, the options)
    and its target. A changed data file or --limit under the same task config changes it, so stored
    scores of a doc id are never reused for another doc. Images are not hashed (see docs/reliability.md)."""
    items = []
    for doc in pool:
        texts = [arg for request in requests_of(doc) for arg in request.args if isinstance(arg, (str, int, float))]
        items.append([str(doc), texts, str(task.doc_to_target(task.eval_docs[doc]))])
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()[:24]


def default_state_dir() -> Path:
    return cache_root() / "probe_results"


def store_folder(state_dir: str | None) -> str:
    """The probe store's folder that `state_dir` (a model arg) means: "none" for no store."""
    return "none" if state_dir == "none" else str(state_dir or default_state_dir())


def _to_json(response: Any) -> Any:
    if isinstance(response, tuple):
        return {"tuple": [_to_json(x) for x in response]}
    return response


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_from_json(x) for x in value["tuple"])
    return value


class ProbeStore:
    """(variant label, doc key) -> (score, responses), backed by an append-only file when a path is set.
    `versions` (library_versions) is recorded on every line; a line of other versions is not reused."""

    def __init__(self, directory: Path | None, fingerprint: dict, versions: dict | None = None):
        self.fingerprint = fingerprint_of(fingerprint)
        self.versions = dict(versions or {})
        self._records: dict[tuple[str, str], tuple[float, list]] = {}
        self.path = None
        if directory is not None:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / f"{self.fingerprint}.jsonl"
            self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        skipped = 0
        other_versions: dict[str, int] = {}
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                    if record["fp"] != self.fingerprint:
                        raise ValueError("foreign fingerprint")
                    key = (str(record["variant"]), str(record["doc"]))
                    score = float(record["score"])
                    responses = [_from_json(r) for r in record["responses"]]
                    versions = record.get("versions", {})
                except (ValueError, KeyError, TypeError):
                    skipped += 1
                    continue
                if versions != self.versions:
                    label = json.dumps(versions, sort_keys=True)
                    other_versions[label] = other_versions.get(label, 0) + 1
                    continue
                self._records[key] = (score, responses)
        if skipped:
            log.warning("lmms-talo: ignored %d unreadable or foreign lines in %s", skipped, self.path)
        for label, count in other_versions.items():
            log.warning(
                "lmms-talo: %d probe results in %s were written under other versions (%s; now %s): recomputing them",
                count,
                self.path,
                label,
                json.dumps(self.versions, sort_keys=True),
            )

    def get(self, variant: str, doc: Any) -> tuple[float, list] | None:
        return self._records.get((variant, str(doc)))

    def put(self, variant: str, doc: Any, score: float, responses: list) -> None:
        self._records[(variant, str(doc))] = (score, responses)
        if self.path is None:
            return
        line = json.dumps(
            {
                "fp": self.fingerprint,
                "variant": variant,
                "doc": str(doc),
                "score": score,
                "responses": [_to_json(r) for r in responses],
                "versions": self.versions,
            }
        )
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def group_store(group, config, report) -> ProbeStore:
    """A sub-task's probe store (group: lmms_talo.harness.grouping.TaloGroup), keyed by everything
    that can change a probe answer: the model and its harness class and args (report: the run's
    TaloReport), the task config and generation kwargs, the pool docs' content, the intervention,
    seed, shots and request type. Results written under other library versions are not reused."""
    state_dir = store_folder(config.state_dir)
    fingerprint = {
        "model": report.model_identity,
        "harness_model": report.harness_model,
        "task": group.name,
        "task_config": task_config_identity(group.task, type(config).arg_names()),
        "gen_kwargs": request_kwargs(r for reqs in group.doc_requests.values() for r in reqs),
        "pool_content": pool_content(group.task, group.split.pool, group.doc_requests.__getitem__),
        "intervention": config.intervention,
        "seed": config.seed,
        "shots": config.probe_shots,
        "reqtype": group.reqtype,
        "sweep_batch": config.sweep_batch,  # batched rows may round differently from batch-1 ones
    }
    return ProbeStore(None if state_dir == "none" else state_dir, fingerprint, report.versions)
