"""TaLo's decision inside the harness's own outputs, for pipelines that read files, not logs.

After each evaluation of a TaLo model, the results dict that the harness then writes out (lmms-eval's
`<time>_results.json`, lm-eval's `results_<time>.json`) gets a `talo` block beside `results`, never
under it (metrics stay untouched): the plugin and its version, TaLo's args, and per sub-task the
knockout (or none, and why), its probe gain, the rule, the test-doc score of TaLo and, with
`compare_base`, of the base model, and the path of the full report. With `--log_samples`, every
sample row gets `talo: {"knockout": [layers] or [], "in_probe_pool": bool}`. The harness's own
`config.model_args` already names the TaLo args; the `talo` block tells a TaLo run from a plain one.
A sibling file per task, named like the harness's own sample file with `_talo_probe` after the task
name, holds every probe pass (lmms_talo.outputs.probe_log writes and reads it), so the sweep can be re-scored
and re-decided offline without the model. With a W&B run active (lmms-eval's --wandb_args), the
interaction vectors go there too, as a table and a heatmap (`log_to_wandb`, main rank only).
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lmms_talo import __version__


def results_block(report: Mapping[str, Any], report_path: Any) -> dict:
    """The `talo` block of a results dict, from a TaLo report's dict (lmms_talo.outputs.report)."""
    config = report["config"]
    subtasks = {}
    for group in report["subtasks"]:
        layers = group.get("selected_layers") or []
        gains = group.get("interaction_vector") or {}
        talo, base = (group.get("test") or {}).get("talo") or {}, (group.get("test") or {}).get("base") or {}
        subtasks[group["subtask"]] = {
            "task": group["task"],
            "knockout": layers,
            "reason": group.get("selection_reason", ""),
            "probe_gain": gains.get(str(layers[0])) if len(layers) == 1 else None,
            "rule": config.get("select_rule"),
            "metric": talo.get("metric"),
            "test_score_talo": talo.get("score"),
            "test_score_base": base.get("score") if base else None,
            "test_docs": talo.get("n"),
        }
    return {
        "plugin": "lmms-talo",
        "version": __version__,
        "args": config,
        "report": None if report_path is None else str(report_path),
        "subtasks": subtasks,
    }


# The probe rows of the last TaLo evaluation, per task, until the harness writes that task's sample file
# (after evaluate() has returned): the one piece of TaLo state that outlives an evaluation, consumed
# when written, and written only beside sample rows TaLo annotated.
PROBE_LOGS: dict[str, list] = {}


def annotate(results: dict, block: dict, doc_info: Mapping[tuple, tuple], probe_rows: Mapping[str, list]) -> None:
    """Add the `talo` block and each logged sample row's knockout; `doc_info[(task, doc_id)]` is
    (knocked-out layers, whether the doc is in its sub-task's probe pool). With sample logging on, the
    probe rows wait for the harness's sample files (`with_probe_log`)."""
    results["talo"] = block
    samples = results.get("samples") or {}
    for task, rows in samples.items():
        for row in rows:
            layers, in_pool = doc_info.get((task, row.get("doc_id")), ((), False))
            row["talo"] = {"knockout": list(layers), "in_probe_pool": bool(in_pool)}
    PROBE_LOGS.update({task: list(rows) for task, rows in probe_rows.items() if task in samples})


def with_probe_log(save: Callable, names: Callable[[str, str], tuple[str, str]]) -> Callable:
    """Wrap a harness tracker's `save_results_samples`: once it has written a TaLo task's sample file,
    the task's probe passes go beside it. `names(date_id, task)` -> (the harness's file name, TaLo's)."""
    if getattr(save, "__talo_wrapped__", False):
        return save

    @functools.wraps(save)
    def save_results_samples(tracker, task_name, samples):
        save(tracker, task_name, samples)
        rows = PROBE_LOGS.pop(task_name, None)
        if not rows or not tracker.output_path or not any("talo" in sample for sample in samples):
            return
        own, probe = names(tracker.date_id, task_name)
        root = Path(tracker.output_path)
        written = sorted((root.parent if root.suffix == ".json" else root).rglob(own))
        if written:
            with open(written[-1].with_name(probe), "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, default=str) + "\n" for row in rows)

    save_results_samples.__talo_wrapped__ = True
    return save_results_samples


def log_to_wandb(report: Mapping[str, Any], report_path: Any) -> bool:
    """With the harness's W&B run active (lmms-eval's --wandb_args started it before the evaluation),
    log the interaction vectors as a table and the heatmap as an image beside its own logging.
    wandb is never imported here: no run, no W&B."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None)
    if run is None:
        return False
    rows = [
        [group["subtask"], int(layer), gain, int(layer) == group.get("selected_layer")]
        for group in report["subtasks"]
        for layer, gain in (group.get("interaction_vector") or {}).items()
    ]
    payload = {
        "talo/interaction_vectors": wandb.Table(columns=["subtask", "layer", "probe_gain", "selected"], data=rows)
    }
    if rows:
        from lmms_talo.analysis.figures import run_heatmap
        from lmms_talo.outputs.report_reader import run_of

        folder = Path(report_path).parent if report_path else Path(tempfile.mkdtemp())
        png = run_heatmap(
            run_of(dict(report), folder / "talo_report.json"),
            folder / "talo_interaction_heatmap.png",
            "TaLo probe gains",
        )
        payload["talo/interaction_heatmap"] = wandb.Image(str(png))
    run.log(payload)
    return True
