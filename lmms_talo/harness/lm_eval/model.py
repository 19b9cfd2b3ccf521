"""`talo_hf`: TaLo over lm-eval's Hugging Face model class (HFLM).

It is the same TaloMixin the lmms-eval models use: the same grouping, probe split, sweep,
selection, scoring (the task's own filters and process_results) and report. Only the harness
object differs (lmms_talo.harness.lm_eval.lm_eval_harness: lm-eval's Task objects, its Instances), and HFLM's own
`loglikelihood` / `generate_until` do every forward pass. Nothing on this path imports lmms-eval.

lm-eval has no plugin hook: `register()` adds `talo_hf` to lm-eval's model registry in this
process; `lmms-talo lm-eval ...` calls it and then runs lm-eval's own CLI.
"""

from __future__ import annotations

from lm_eval.models.huggingface import HFLM

from lmms_talo.harness.lm_eval.lm_eval_harness import LM_EVAL
from lmms_talo.harness.mixin import TaloMixin

MODEL_NAME = "talo_hf"


class TaloHFLM(TaloMixin, HFLM):
    """`--model talo_hf --model_args pretrained=...,probe_shots=10,...` (HFLM's args plus TaLo's)."""

    talo_harness = LM_EVAL


def register() -> None:
    """Make `talo_hf` known to lm-eval (idempotent)."""
    import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval only does so when it is empty)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TaloHFLM)
