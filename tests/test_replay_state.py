"""Prefix replay's self-check samples what it must (issue 24, part 4): a model whose layers keep
state between calls (dynamic-NTK rope) never replays, and the run-time check compares every model
call's logits, not only the answers, so a difference that leaves the answer string alone still
turns replay off."""

import torch
from tiny_models import random_llama

from lmms_talo.method.interventions import knocked_out
from lmms_talo.method.prefix_replay import PrefixReplay, disabled_reason
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import make_rule
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore

LAYERS = (1, 2, 3)


def _prompts(n_docs: int) -> dict:
    """Prompts whose length grows with the doc: later docs pass the rope's original length."""
    gen = torch.Generator().manual_seed(1)
    return {d: torch.randint(0, 96, (1, 4 + 3 * d), generator=gen) for d in range(n_docs)}


def _sweep(model, prompts, replay):
    """A generation sweep: the answer is the greedy continuation's text, scored against token 7."""

    def answer(knockout, docs):
        out = {}
        with knocked_out(model, knockout), torch.no_grad():
            for d in docs:
                ids = model.generate(prompts[d], max_new_tokens=2, do_sample=False, pad_token_id=0)
                out[d] = [" ".join(map(str, ids[0, prompts[d].shape[1] :].tolist()))]
        return out

    def score(doc, responses):
        return float(responses[0].startswith("7"))

    split = split_subtask("t", list(prompts), 4, seed=0)
    sweep = LayerSweep(answer, score, ProbeStore(None, {}), rule=make_rule("gain"), replay=replay)
    return sweep.run(split, LAYERS, "zero", max_redraws=0)


def test_a_model_with_dynamic_rope_never_replays_and_matches_the_naive_sweep():
    model = random_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    prompts = _prompts(12)
    replay = PrefixReplay(model)
    assert not replay.enabled and "rope_type=dynamic" in disabled_reason(model)
    replayed = _sweep(model, prompts, replay)
    naive = _sweep(
        random_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), prompts, None
    )
    assert replayed.doc_scores == naive.doc_scores
    assert replayed.replay["status"].startswith("disabled") and replayed.replay["layers_replayed"] == 0


def test_a_difference_in_logits_alone_turns_replay_off(monkeypatch):
    """Replayed layers' outputs nudged by 1e-6: the greedy answers stay the same, the logits do not."""
    model = random_llama()
    prompts = _prompts(4)
    replay = PrefixReplay(model)
    assert replay.enabled
    original = PrefixReplay._wrap_layer

    def nudged(self, index, forward):
        wrapped = original(self, index, forward)

        def layer(*args, **kwargs):
            out = wrapped(*args, **kwargs)
            if isinstance(self._phase, int) and index < self._phase:  # a replayed layer
                hidden = out[0] if isinstance(out, tuple) else out
                hidden = hidden + 1e-6
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
            return out

        return layer

    monkeypatch.setattr(PrefixReplay, "_wrap_layer", nudged)
    result = _sweep(model, prompts, replay)
    assert result.replay["checks"] == 1
    assert "same answers as in full but other logits" in result.replay["status"]
    naive = _sweep(random_llama(), prompts, None)
    assert result.doc_scores == naive.doc_scores
