"""Repairs of lmms-eval base classes that TaLo's request paths depend on.

llava_hf.loglikelihood (lmms-eval 0.7.3) measures the context length by running the processor on
the prompt text without its images; transformers 5 rejects an `<image>` token with no image, so
every likelihood-scored task (seedbench_ppl, any multiple_choice task) fails. The repair passes the
images to both calls and compares each continuation token with the argmax of the logits at the
position before it (the original is off by one); the prompt format and the returned (mean loss, is_greedy)
convention are lmms-eval's own, so multiple_choice tasks score exactly as lmms-eval intends.

lmms-eval 0.7.3's evaluator turns every loglikelihood result into a string (`unwrap_output` below
keeps it); that repair is applied for the duration of a TaLo model's evaluation only.
"""

from __future__ import annotations

import contextlib

import torch

DEFAULT_IMAGE_TOKEN = "<image>"


class LlavaHfLoglikelihood:
    """Mixed in before lmms-eval's LlavaHf."""

    def loglikelihood(self, requests):
        results = []
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = [v for group in [doc_to_visual(doc)] for v in group]
            prompt_text = f"{' '.join([DEFAULT_IMAGE_TOKEN] * len(visuals))}\n{context}"
            messages = [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": continuation}]
            if self.chat_template is not None:
                self.tokenizer.chat_template = self.chat_template
            prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            inputs = self._image_processor(text=[full], images=visuals, return_tensors="pt").to(
                self._device, self.model.dtype
            )
            context_len = self._image_processor(text=[prompt], images=visuals, return_tensors="pt")["input_ids"].shape[
                1
            ]
            labels = inputs["input_ids"].clone()
            labels[:, :context_len] = -100
            with torch.inference_mode():
                outputs = self.model(**inputs, labels=labels)
            greedy = outputs["logits"].argmax(dim=-1)[:, context_len - 1 : -1]
            continuation_ids = inputs["input_ids"][:, context_len:]
            results.append((float(outputs["loss"].item()), bool((greedy == continuation_ids).all())))
        return results


# lmms-eval model name -> repair mixed in under TaLo
BASE_FIXES = {"llava_hf": LlavaHfLoglikelihood}


def unwrap_output(output):
    """lmms-eval's unwrap_generation_output, except that a loglikelihood result `(loss, is_greedy)`
    passes through unchanged: lmms-eval 0.7.3's own turns it into its string, so multiple_choice
    scoring then fails for every model."""
    from lmms_eval.api.instance import unwrap_generation_output

    if (
        isinstance(output, tuple)
        and len(output) == 2
        and isinstance(output[1], bool)
        and not isinstance(output[0], str)
    ):
        return output, None
    return unwrap_generation_output(output)


@contextlib.contextmanager
def loglikelihood_outputs_kept():
    """lmms-eval's evaluator unwraps responses with `unwrap_output` while the block runs (one TaLo
    evaluation, lmms_talo.harness.lmms.lmms_eval_harness), and with its own again afterwards."""
    import lmms_eval.evaluator as evaluator

    original = evaluator.unwrap_generation_output
    evaluator.unwrap_generation_output = unwrap_output
    try:
        yield
    finally:
        evaluator.unwrap_generation_output = original
