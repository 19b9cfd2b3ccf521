"""Tiny random models of real transformers architectures, built offline for tests.

Each ``build_tiny(arch, out_dir)`` writes a complete Hugging Face folder (config, float32 safetensors
weights, tokenizer, processor, chat template, generation config) that both transformers and the
lmms-eval model classes in ``LMMS_EVAL_MODEL`` load with no network access.

* 4 text decoder layers, hidden size 64 (72 for the SmolLM2-shaped model), a 2-layer vision tower
  that turns a small image into a handful of image tokens: a forward pass takes milliseconds on CPU.
* The tokenizer is a byte-level BPE trained in memory with ``tokenizers`` (every byte is covered),
  wrapped in ``PreTrainedTokenizerFast`` with the architecture's special tokens.
* Weights are redrawn from a fixed seed with a large scale (``WEIGHT_STD`` / ``BIAS_STD``): default
  initialisation gives near-constant outputs, so knocking out a layer would change nothing.
  Building twice gives identical weights.
* The saved generation config is greedy and suppresses every token that is special or that does not
  decode to plain printable ASCII (letters, digits, space, a little punctuation): generated answers
  are plain text, never an image placeholder, and never stop early on EOS.

Where the language-model decoder layers live (transformers 5.x), see ``DECODER_LAYERS_ATTR``:

* llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, internvl:
  ``model.model.language_model.layers[i].self_attn`` (``model.get_decoder()`` is the text model).
  The vision tower has ``...layers.N.self_attn`` / ``blocks.N.attn`` too: name searches must skip it.
* llama, qwen2, smollm2: ``model.model.layers[i].self_attn``.

Self-attention projections are ``q_proj, k_proj, v_proj, o_proj`` everywhere; biases:
llama (attention_bias=True) has all four, qwen2-family text models (qwen2, qwen2_vl, qwen2_5_vl,
llava_onevision, internvl) have q/k/v biases only; llava, llava_next, qwen3_vl and smollm2 have
none. qwen3_vl also has ``q_norm`` / ``k_norm`` and adds "deepstack" visual features to the hidden
states after text layers 0 and 1.
"""

from __future__ import annotations

import os
import pathlib
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ARCHITECTURES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "llama",
    "qwen2",
    "smollm2",
)

VLM_ARCHITECTURES = ARCHITECTURES[:7]
TEXT_ARCHITECTURES = ARCHITECTURES[7:]

# lmms-eval model name that loads each tiny model. ``lmms_eval.models.get_model(name)`` returns the
# chat class where the model has one (llava_hf, qwen2_5_vl, qwen3_vl, internvl_hf and huggingface
# are chat classes; internvl_hf and huggingface exist only as chat classes), else the simple class
# (qwen2_vl); ``force_simple=True`` picks the simple class of llava_hf / qwen2_5_vl / qwen3_vl.
LMMS_EVAL_MODEL = {
    "llava": "llava_hf",
    "llava_next": "llava_hf",
    "llava_onevision": "llava_hf",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "internvl": "internvl_hf",
    "llama": "huggingface",
    "qwen2": "huggingface",
    "smollm2": "huggingface",
}

# Caveat, plain LMs: lmms-eval 0.7.3's ``huggingface`` class constructs (``get_model("huggingface")``
# with these args works) but then cannot generate: it tests ``config.model_type in
# AutoModelForCausalLM._model_mapping.keys()``, whose keys are config classes, not strings, so it
# always falls back to ``AutoModel`` (``LlamaModel``/``Qwen2Model``: no lm_head, no ``generate``) and
# ``generate_until`` raises AttributeError. The same bug hits VLMs loaded through it. lm-eval's ``hf``
# model (``LM_EVAL_MODEL``) loads and runs the plain tiny LMs (generate_until and loglikelihood).
LM_EVAL_MODEL = {a: "hf" for a in ("llama", "qwen2", "smollm2")}
LM_EVAL_MODEL_ARGS = {a: "device=cpu,dtype=float32" for a in LM_EVAL_MODEL}

# Extra ``--model_args`` (after ``pretrained=<dir>,``) that these classes need on a CPU-only machine.
# device_map=cpu is needed everywhere: llava_hf's default "" is rejected by transformers 5 and the
# others default to "auto"/"cuda" (and then move inputs to "cuda"). The Qwen classes default to
# min_pixels=200704 (hundreds of image tokens): a small min_pixels keeps the tiny models fast.
# The pixel bounds are optional (defaults also work, ~0.3 s per answer instead of ~0.1 s).
# Notes: the Qwen and InternVL classes always load bfloat16 weights (answers differ from float32);
# llava_hf and qwen2_vl load float32 (dtype "auto"). Do not also pass the CLI's --device: it is
# forwarded as a second ``device`` kwarg (TypeError). qwen3_vl treats a ``pretrained`` path matching
# the regex ``A\d+B`` (e.g. ".../A3B...") as a MoE checkpoint: keep such text out of model dirs.
# Requests must set ``max_new_tokens`` (defaults: 128 to 32768 tokens; llava_hf/internvl_hf 1024).
_QWEN_PIXELS = "min_pixels=3136,max_pixels=12544"
LMMS_EVAL_MODEL_ARGS = {
    "llava": "device=cpu,device_map=cpu",
    "llava_next": "device=cpu,device_map=cpu",
    "llava_onevision": "device=cpu,device_map=cpu",
    "qwen2_vl": f"device=cpu,device_map=cpu,{_QWEN_PIXELS}",
    "qwen2_5_vl": f"device=cpu,device_map=cpu,{_QWEN_PIXELS}",
    "qwen3_vl": "device=cpu,device_map=cpu,min_pixels=4096,max_pixels=16384",
    "internvl": "device=cpu,device_map=cpu",
    "llama": "device=cpu,device_map=cpu",
    "qwen2": "device=cpu,device_map=cpu",
    "smollm2": "device=cpu,device_map=cpu",
}

# Attribute path from the loaded model to its text decoder layers (a ModuleList).
DECODER_LAYERS_ATTR = {a: "model.language_model.layers" for a in VLM_ARCHITECTURES}
DECODER_LAYERS_ATTR.update({a: "model.layers" for a in TEXT_ARCHITECTURES})

NUM_LAYERS = 4
HIDDEN = 64
SEED = 1234
WEIGHT_STD = 0.3
BIAS_STD = 1.0

# Characters a generated token may decode to.
_ALLOWED_CHARS = set(string.ascii_letters + string.digits + " .,!?'-")

_CORPUS = [
    "What is shown in the image? Describe the picture in one short sentence.",
    "Which shape is this: a circle, a square or a triangle? The answer is A, B, C or D.",
    "What color is the object? It is red, green, blue, yellow, black or white.",
    "The quick brown fox jumps over the lazy dog. A cat sits on the mat near the door.",
    "Answer with the option's letter from the given choices directly.",
    "Question: how many objects are there? Options: one, two, three, four. Answer:",
    "You are a helpful assistant. The user asks and the assistant answers the question.",
    "Hello world! 0123456789 numbers, punctuation: ; ( ) [ ] { } < > / \\ | @ # $ % ^ & * _ + = ~ `",
    "system user assistant image video picture photo left right top bottom small large",
]

# ---------------------------------------------------------------------------------------------
# Chat templates (jinja). Each accepts message content as a string or as a list of parts
# ({"type": "text", "text": ...}, {"type": "image", ...}, {"type": "video", ...}).


def _lit(text: str) -> str:
    """A jinja expression printing ``text`` (given with jinja escapes such as ``\\n``)."""
    return "{{ '" + text + "' }}" if text else ""


def _content_macro(image: str, video: str) -> str:
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for part in content -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] in ['image', 'image_url'] -%}" + _lit(image) + ""
        "{%- elif part['type'] in ['video', 'video_url'] -%}" + _lit(video) + ""
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


def _chatml_template(image: str, video: str) -> str:
    return (
        _content_macro(image, video) + "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}{{ render(message['content']) }}{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def _vicuna_template(image: str, video: str) -> str:
    return (
        _content_macro(image, video) + "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ render(message['content']) + ' ' }}"
        "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}{{ render(message['content']) }}{{ ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' }}{{ render(message['content']) }}{{ eos_token }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def _llama_template() -> str:
    return (
        _content_macro("", "") + "{{ bos_token }}{%- for message in messages -%}"
        "{{ '[' + message['role'] + '] ' }}{{ render(message['content']) }}{{ eos_token }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '[assistant] ' }}{%- endif -%}"
    )


_QWEN_VL_SPECIALS = dict(
    specials=[
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ],
    named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    extra={
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    template=_chatml_template(
        "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    ),
)

_TOKENIZER_SPECS = {
    "llava": dict(
        specials=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        named=dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
        extra={"image_token": "<image>"},
        template=_vicuna_template("<image>\\n", ""),
    ),
    "llava_onevision": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        extra={"image_token": "<image>", "video_token": "<video>"},
        template=_chatml_template("<image>\\n", "<video>\\n"),
    ),
    "qwen_vl": _QWEN_VL_SPECIALS,
    "internvl": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        extra={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        template=_chatml_template("<IMG_CONTEXT>\\n", "<video>\\n"),
    ),
    "llama": dict(
        specials=["<unk>", "<s>", "</s>", "<pad>"],
        named=dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
        extra={},
        template=_llama_template(),
    ),
    "chatml": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        named=dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        extra={},
        template=_chatml_template("", ""),
    ),
}

_TOKENIZER_FAMILY = {
    "llava": "llava",
    "llava_next": "llava",
    "llava_onevision": "llava_onevision",
    "qwen2_vl": "qwen_vl",
    "qwen2_5_vl": "qwen_vl",
    "qwen3_vl": "qwen_vl",
    "internvl": "internvl",
    "llama": "llama",
    "qwen2": "chatml",
    "smollm2": "chatml",
}


def _build_tokenizer(arch: str, vocab_size: int = 480):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _TOKENIZER_SPECS[_TOKENIZER_FAMILY[arch]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec["specials"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=dict(spec["extra"]) if spec["extra"] else None,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **spec["named"],
    )
    fast.chat_template = spec["template"]
    return fast


def _suppressed_token_ids(tokenizer) -> list[int]:
    """Ids of every token that is special or does not decode to plain printable ASCII."""
    special = set(tokenizer.all_special_ids)
    for t in tokenizer.get_added_vocab().values():
        special.add(t)
    bad = []
    for i in range(len(tokenizer)):
        if i in special:
            bad.append(i)
            continue
        text = tokenizer.decode([i])
        if not text or not set(text) <= _ALLOWED_CHARS:
            bad.append(i)
    return bad


# ---------------------------------------------------------------------------------------------
# Configs


def _text_kwargs(tokenizer, **over):
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    kw.update(over)
    return kw


def _clip_vision(image_size=32, patch_size=8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _build_llava(tok):
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaProcessor

    cfg = LlavaConfig(
        vision_config=_clip_vision(),
        text_config=LlamaConfig(**_text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return cfg, proc


def _build_llava_next(tok):
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    cfg = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=LlamaConfig(**_text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=_PINPOINTS,
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return cfg, proc


def _build_llava_onevision(tok):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    ip = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS)
    vp = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    proc = LlavaOnevisionProcessor(
        image_processor=ip,
        tokenizer=tok,
        video_processor=vp,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=tok.chat_template,
    )
    return cfg, proc


def _qwen_ids(tok):
    return dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def _qwen_processors(patch_size, min_pixels, max_pixels, mean=None, std=None, video_cls="Qwen2VLVideoProcessor"):
    import transformers
    from transformers import Qwen2VLImageProcessor

    kw = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels)
    if mean is not None:
        kw.update(image_mean=mean, image_std=std)
    ip = Qwen2VLImageProcessor(**kw)
    vkw = dict(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    if mean is not None:
        vkw.update(image_mean=mean, image_std=std)
    vp = getattr(transformers, video_cls)(**vkw)
    return ip, vp


def _build_qwen2_vl(tok):
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    text = _text_kwargs(
        tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    )
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=HIDDEN,
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    ip, vp = _qwen_processors(14, 56 * 56, 112 * 112)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    return cfg, proc


def _build_qwen2_5_vl(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    text = _text_kwargs(
        tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    ip, vp = _qwen_processors(14, 56 * 56, 112 * 112)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    return cfg, proc


def _build_qwen3_vl(tok):
    from transformers import Qwen3VLConfig, Qwen3VLProcessor

    text = _text_kwargs(
        tok,
        head_dim=16,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    ip, vp = _qwen_processors(16, 64 * 64, 128 * 128, [0.5] * 3, [0.5] * 3, video_cls="Qwen3VLVideoProcessor")
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=tok.chat_template)
    return cfg, proc


def _build_internvl(tok):
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    vision = InternVLVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[32, 32],
        patch_size=[8, 8],
    )
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    ip = GotOcr2ImageProcessor(
        size={"height": 32, "width": 32},
        crop_to_patches=True,
        min_patches=1,
        max_patches=4,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    vp = InternVLVideoProcessor(size={"height": 32, "width": 32})
    proc = InternVLProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=4, chat_template=tok.chat_template
    )
    return cfg, proc


def _build_llama(tok):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_kwargs(tok, attention_bias=True)), None


def _build_qwen2(tok):
    from transformers import Qwen2Config

    return Qwen2Config(**_text_kwargs(tok)), None


def _build_smollm2(tok):
    from transformers import LlamaConfig

    # SmolLM2-135M: hidden 576, 9 heads / 3 KV heads (head_dim 64), MLP 1536, tied embeddings,
    # rope_theta 1e5, no biases, 30 layers. Same shape ratios, tiny.
    cfg = LlamaConfig(
        **_text_kwargs(
            tok,
            hidden_size=72,
            intermediate_size=192,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )
    )
    return cfg, None


_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "internvl": _build_internvl,
    "llama": _build_llama,
    "qwen2": _build_qwen2,
    "smollm2": _build_smollm2,
}


def _model_class(arch: str):
    import transformers

    return {
        "llava": transformers.LlavaForConditionalGeneration,
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "internvl": transformers.InternVLForConditionalGeneration,
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "smollm2": transformers.LlamaForCausalLM,
    }[arch]


def _redraw(model, seed: int) -> None:
    """Large random weights: every matrix ~ N(0, WEIGHT_STD), every bias ~ N(0, BIAS_STD)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                p.normal_(0.0, WEIGHT_STD, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, BIAS_STD, generator=gen)


def build_tiny(arch: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Build the tiny random ``arch`` model with its tokenizer/processor and save it to ``out_dir``."""
    import torch
    from transformers import GenerationConfig

    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = _build_tokenizer(arch)
    config, processor = _BUILDERS[arch](tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = _model_class(arch)(config)
    model = model.to(torch.float32).eval()
    _redraw(model, SEED)

    model.generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=_suppressed_token_ids(tok),
    )
    model.save_pretrained(out_dir)
    tok.padding_side = "left"
    tok.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return out_dir


def load_tiny(arch: str, path: pathlib.Path):
    """Load a model written by ``build_tiny``: float32, eval mode, CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if arch in VLM_ARCHITECTURES else AutoModelForCausalLM
    model = auto.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    return model.eval()


def load_processor(arch: str, path: pathlib.Path):
    """The processor (VLMs) or tokenizer (plain LMs) saved by ``build_tiny``; left padding."""
    from transformers import AutoProcessor, AutoTokenizer

    if arch in VLM_ARCHITECTURES:
        proc = AutoProcessor.from_pretrained(str(path))
        proc.tokenizer.padding_side = "left"
    else:
        proc = AutoTokenizer.from_pretrained(str(path))
        proc.padding_side = "left"
    return proc


def get_decoder_layers(model, arch: str):
    """The text decoder's ``nn.ModuleList`` of layers (each has ``.self_attn``)."""
    obj = model
    for part in DECODER_LAYERS_ATTR[arch].split("."):
        obj = getattr(obj, part)
    return obj


def example_image(seed: int = 0, size=(32, 32)):
    """A random RGB PIL image (fixed seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


EXAMPLE_QUESTIONS = (
    "What color is the object?",
    "Which shape is shown in the picture: a circle, a square or a triangle?",
)


def example_inputs(arch: str, processor, batch: int = 1):
    """Processor outputs for ``batch`` (1 or 2) chat prompts; VLM prompts carry one image each.

    With batch=2 the two prompts differ in length and are left-padded.
    """
    if batch not in (1, 2):
        raise ValueError("batch must be 1 or 2")
    questions = list(EXAMPLE_QUESTIONS[:batch])
    if arch in VLM_ARCHITECTURES:
        processor.tokenizer.padding_side = "left"
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for q in questions
        ]
        images = [example_image(i) for i in range(batch)]
        return processor(text=texts, images=images, return_tensors="pt", padding=True)
    processor.padding_side = "left"
    texts = [
        processor.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return processor(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def random_llama(**config):
    """A small Llama built in memory (no files behind it), weights redrawn with std 0.3 so that
    knockouts change its answers; `config` overrides the LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model
