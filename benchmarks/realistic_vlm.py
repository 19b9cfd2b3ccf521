"""Random-weight VLMs of realistic shape, for timing; both built in place, with no network.

build(): LLaVA with a SmolLM2-135M-shaped decoder (30 layers, hidden 576, 9 heads, 3 KV heads,
MLP 1536, vocabulary 49152) behind a CLIP-like tower at 336 px / patch 14, i.e. 576 image tokens
per image, with only 2 vision layers (the tower's cost is not what the sweep is about; replay skips
it anyway).

build_next(): LLaVA-NeXT (LlavaNextForConditionalGeneration, anyres) with a decoder of real 7B
width, Vicuna-7B's shape (hidden 4096, 32 heads, 32 KV heads, MLP 11008, vocabulary 32064,
untied head) but only `num_layers` decoder layers (8 by default), behind a CLIP-L-width tower
(hidden 1024, 2 layers) at 336 px / patch 14 with LLaVA-v1.6's grid pinpoints. A square image of
NEXT_IMAGE_SIDE (672) px takes the 672x672 grid: 576 base tokens + 4 tiles of 576, unpadded, plus
one newline token per row: 576 + 48 * 48 + 48 = 2928 image tokens, LLaVA-NeXT's largest count.
Saved in bfloat16 (about 3.8 GB at 8 layers). `text` / `vision` override config fields: the
CPU smoke run of benchmarks/gpu_check.py builds it shrunk (tiny widths, same image geometry).

The tokenizer is the test suite's small byte-level BPE (tests/tiny_models.py); ids past it are
suppressed in generation, so the full-size embedding and LM head keep their realistic cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    tie_word_embeddings=True,
)
IMAGE_SIZE, PATCH = 336, 14


def _greedy_generation(tokenizer, vocab_size: int):
    """Greedy decoding that never emits the tokenizer's special or unused vocabulary entries."""
    from transformers import GenerationConfig

    sys.path.insert(0, str(TESTS))
    from tiny_models import _suppressed_token_ids

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=_suppressed_token_ids(tokenizer) + list(range(len(tokenizer), vocab_size)),
    )


def _processor_fields(tokenizer) -> dict:
    return dict(
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _save(out_dir: Path, model, tokenizer, processor) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build(out_dir: Path, seed: int = 0, num_layers: int = SMOLLM2_135M["num_hidden_layers"]) -> Path:
    """Write the model, processor and generation config to `out_dir` (once); `num_layers` decoder
    layers of the realistic width (fewer make long runs affordable)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    sys.path.insert(0, str(TESTS))
    from tiny_models import _build_tokenizer

    tokenizer = _build_tokenizer("llava")
    text = LlamaConfig(
        **{**SMOLLM2_135M, "num_hidden_layers": num_layers},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=12,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=768,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = _greedy_generation(tokenizer, text.vocab_size)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        **_processor_fields(tokenizer),
    )
    _save(out_dir, model, tokenizer, processor)
    return out_dir


VICUNA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    tie_word_embeddings=False,
)
CLIP_L_WIDTH = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6
NEXT_IMAGE_SIDE = 672  # a square image this size: the 672x672 grid, 2928 image tokens


def build_next(
    out_dir: Path,
    seed: int = 0,
    num_layers: int = 8,
    text: dict | None = None,
    vision: dict | None = None,
    device: str = "cpu",
) -> Path:
    """Write the LLaVA-NeXT model (bfloat16), processor and generation config to `out_dir` (once):
    Vicuna-7B's width with `num_layers` decoder layers; `text` / `vision` override the decoder's and
    the tower's config fields (the smoke run's shrunk build); `device`: where the random weights are
    drawn (a 7B-width model initialises in seconds on a GPU, in minutes on a CPU)."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    sys.path.insert(0, str(TESTS))
    from tiny_models import _build_tokenizer

    tokenizer = _build_tokenizer("llava_next")
    text_config = LlamaConfig(
        **{**VICUNA_7B, "num_hidden_layers": num_layers, **(text or {})},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        **{**CLIP_L_WIDTH, **(vision or {})}, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=768
    )
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration(config)
    model = model.to(torch.bfloat16).eval()
    model.generation_config = _greedy_generation(tokenizer, text_config.vocab_size)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=NEXT_PINPOINTS,
        ),
        **_processor_fields(tokenizer),
    )
    _save(out_dir, model, tokenizer, processor)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return out_dir
