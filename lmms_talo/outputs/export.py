"""Bake a knockout into a standard Hugging Face checkpoint, for serving engines (vLLM, SGLang, ...).

The checkpoint is the weight-level definition of the intervention (`edit_weights_in_place`), whose
logits the tests prove identical to the hook TaLo sweeps with. Only the interventions with a
weight fill in the registry (`Intervention.exportable`: zero, uniform, mean) can be exported.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from lmms_talo.method import interventions
from lmms_talo.method.interventions import InterventionError, edit_weights_in_place
from lmms_talo.outputs.report_reader import load_run

# Files of a checkpoint folder that describe preprocessing, copied unchanged.
_PREPROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class ExportError(ValueError):
    """The export cannot be done as asked."""


def load_for_export(pretrained: str, dtype: str = "auto", trust_remote_code: bool = False):
    """The model with its generation head, by the Auto class that fits its config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto.from_pretrained(pretrained, dtype=dtype, trust_remote_code=trust_remote_code)
    raise ExportError(f"no image-text-to-text or causal-LM class for {type(config).__name__} in transformers")


def selection_from_report(report_path: str, task: str) -> tuple[tuple[int, ...], str]:
    """(layers, intervention) that a TaLo run selected for `task`: a sub-task's name, or a task's
    when the run made one selection for it. A task split into sub-tasks that selected differently
    is ambiguous: the error lists its sub-tasks and their layers."""
    run = load_run(Path(report_path))
    matches = [sub for sub in run.subtasks if task == sub.name] or [sub for sub in run.subtasks if task == sub.task]
    if not matches:
        names = ", ".join(s.name for s in run.subtasks)
        raise ExportError(f"{task!r} is not in {report_path}; it holds: {names}")
    if len(matches) > 1:
        listing = "; ".join(f"{s.name}: {_layers_text(s.selected_layers)}" for s in matches)
        raise ExportError(
            f"{task!r} was split into {len(matches)} sub-tasks, each with its own selection ({listing}): "
            f"name one sub-task with --task"
        )
    (sub,) = matches
    if not sub.selected_layers:
        raise ExportError(f"{task!r}: TaLo kept the full model ({sub.selection_reason}); nothing to export")
    return tuple(sub.selected_layers), run.intervention


def _layers_text(layers: list[int]) -> str:
    return "layers " + "+".join(map(str, layers)) if layers else "the full model"


@torch.no_grad()
def export(
    pretrained: str,
    layers: Sequence[int],
    intervention: str,
    out: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """Write `pretrained` with every layer in `layers` knocked out by `intervention` to `out`."""
    if not interventions.intervention(intervention).exportable:
        raise InterventionError(
            f"cannot export {intervention!r}: only the weight-defined interventions "
            f"({', '.join(interventions.names(exportable=True))}) have a checkpoint form"
        )
    model = load_for_export(pretrained, dtype, trust_remote_code)
    for layer in layers:
        edit_weights_in_place(model, layer, intervention)
    model.config.talo = {"knocked_out_layers": list(layers), "intervention": intervention, "source": str(pretrained)}
    out_dir = Path(out)
    model.save_pretrained(out_dir)
    source = Path(pretrained)
    if source.is_dir():
        for name in _PREPROCESSING_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, out_dir / name)
    else:
        _save_preprocessing_from_hub(pretrained, out_dir, trust_remote_code)
    return out_dir


def _save_preprocessing_from_hub(pretrained: str, out_dir: Path, trust_remote_code: bool) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    try:
        AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    except (OSError, ValueError, TypeError):
        AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code).save_pretrained(out_dir)
