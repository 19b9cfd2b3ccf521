"""The demo's vision-language model: a LLaVA (transformers `LlavaForConditionalGeneration`) whose
language model is the real SmolLM2-135M-Instruct and whose vision tower and projector were trained
here on easy-VQA with the decoder frozen (`lmms_talo.demo.adapter_training`). It is not a published
VLM: its image answers are what 64x64 shape pictures taught a small adapter.

The trained adapter ships in this package (`adapter/`); the cache folder assembles the model from
the converted SmolLM2 folder and the adapter once, and lmms-eval's `llava_hf` (so `talo_llava`)
loads it like any LLaVA checkpoint. The only change to the decoder is one vocabulary row for the
`<image>` placeholder, set to zero: the placeholder's embedding is always replaced by image
features, and a zero output row gives it logit 0 among SmolLM2's 49,152.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

ADAPTER_DIR = Path(__file__).with_name("adapter")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CARD = "adapter.json"
IMAGE_TOKEN = "<image>"
PATCH_SIZE = 16
IMAGE_SIZE = 64
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4)
MODEL_NAME = "SmolLM2-135M-easyvqa-llava"
DONE = "lmms_talo_assembled"

# SmolLM2's own chat template, with list-of-parts content (lmms-eval's chat classes send it) rendered
# as the string form that lmms-eval's simple classes build: "<image>\n" then the text.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{ '<image>\\n' }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- for message in messages -%}{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}{{ '<|im_start|>' + message['role'] + '\\n' }}{{ render(message['content']) }}"
    "{{ '<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION["hidden_size"], **VISION
    )


def processor_for(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def assemble(decoder_dir: Path, adapter: dict | None = None):
    """(model, processor): SmolLM2 from `decoder_dir` as the language model, the vision tower and
    projector from `adapter` (a state dict; None leaves them as initialised, for training)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    processor = processor_for(tokenizer)
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32)
    text_config = decoder.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config.text_config.tie_word_embeddings = True
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    embeddings = decoder.get_input_embeddings().weight.detach()
    state = {k.removeprefix("model."): v for k, v in decoder.state_dict().items() if k.startswith("model.")}
    state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.new_zeros(1, embeddings.shape[1])])
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    if adapter is not None:
        missing = model.load_state_dict(adapter, strict=False)
        unexpected = [k for k in missing.unexpected_keys]
        absent = [
            k for k in missing.missing_keys if k.startswith(("model.vision_tower", "model.multi_modal_projector"))
        ]
        if unexpected or absent:
            raise ValueError(f"adapter does not fit the model: unexpected {unexpected[:3]}, missing {absent[:3]}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, processor


def adapter_state(model) -> dict:
    """The trained part of the model: vision tower and projector."""
    return {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_tower", "model.multi_modal_projector"))
    }


def adapter_digest(folder: Path = ADAPTER_DIR) -> str:
    return hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def load_adapter(folder: Path = ADAPTER_DIR) -> dict:
    from safetensors.torch import load_file

    path = folder / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(
            f"no trained adapter at {path}: train one with `python -m lmms_talo.demo.adapter_training --out {folder}`"
        )
    return load_file(path)


def card(folder: Path = ADAPTER_DIR) -> dict:
    return json.loads((folder / ADAPTER_CARD).read_text())


def ensure_vlm(cache: Path, say: Callable[[str], None] = print, adapter_dir: Path = ADAPTER_DIR) -> Path:
    """The assembled model as a Hugging Face folder in the cache, named by the adapter's digest and
    this module's (which fixes the config, processor and chat template)."""
    from lmms_talo.demo import smollm2

    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]
    folder = cache / "models" / f"{MODEL_NAME}-{adapter_digest(adapter_dir)[:12]}-{code}"
    if (folder / DONE).exists():
        return folder
    decoder = smollm2.ensure_model(cache, say)
    with FileLock(str(folder) + ".lock"):  # one process assembles; the others wait for it
        if not (folder / DONE).exists():
            _save_assembled(decoder, adapter_dir, folder, say)
    return folder


def _save_assembled(decoder: Path, adapter_dir: Path, folder: Path, say: Callable[[str], None]) -> None:
    say(f"assembling the easy-VQA LLaVA (SmolLM2 + the shipped adapter) in {folder} ...")
    model, processor = assemble(decoder, load_adapter(adapter_dir))
    model.config._name_or_path = MODEL_NAME
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    (partial / DONE).write_text(f"SmolLM2-135M-Instruct + adapter {adapter_digest(adapter_dir)}\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
