"""Statistics that mean what they say (the statistics issue, sections 1 and 2), checked by simulating
the null with the number of candidate layers a real model has.

- `select_alpha` is a family-wise level: with 31 independent null layers, some layer passes a
  guarded rule (sign_test, bootstrap, confirm) in at most alpha of rounds, within Monte Carlo error;
  the same holds when select mode ran only some of the layers (Holm over every candidate).
- select_stat=margin does not reward flattening: a knockout that pulls every option's
  log-likelihood toward uniform and changes no answer raises the gold margin on every wrong doc, yet
  `confirm` keeps it in at most alpha of draws, at 35% base accuracy and under random labels.
"""

import math

import numpy as np
import pytest

from lmms_talo.method.config import TaloConfig
from lmms_talo.method.probe_split import split_subtask
from lmms_talo.method.rules import make_rule
from lmms_talo.method.selection import select_knockout
from lmms_talo.method.statistics import holm_adjusted
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore

ALPHA = 0.05
NULL_LAYERS = tuple(range(1, 32))  # 31 candidate layers, as a 32-layer model has


def _upper(rate: float, rounds: int) -> float:
    """alpha plus three Monte Carlo standard errors: the most a rate at level alpha reaches by chance."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / rounds)


def _null_round(rng, n_docs: int, discordance: float = 0.4):
    """Base pass/fail scores and 31 layers each flipping a doc's score with probability `discordance`,
    independently: every layer's differences are symmetric about 0 (the null of the paired tests)."""
    base = {d: float(rng.random() < 0.5) for d in range(n_docs)}
    layers = {
        layer: {d: (1.0 - base[d]) if rng.random() < discordance else base[d] for d in range(n_docs)}
        for layer in NULL_LAYERS
    }
    return base, layers


@pytest.mark.parametrize("rule_name", ["sign_test", "maxt"])
@pytest.mark.parametrize("n_docs", [8, 10])
def test_with_31_null_layers_some_layer_passes_in_at_most_alpha_of_rounds(rule_name, n_docs):
    rule = make_rule(rule_name, alpha=ALPHA, resamples=1000)
    rng = np.random.default_rng(n_docs)
    rounds, selected = 600, 0
    for r in range(rounds):
        base, layers = _null_round(rng, n_docs)
        selected += rule.decide(list(range(n_docs)), base, layers, stream=f"null{r}").selected is not None
    assert selected / rounds <= _upper(ALPHA, rounds), f"{rule_name}: family-wise rate {selected / rounds:.3f}"


def test_holm_over_every_candidate_counts_the_layers_a_mode_did_not_run():
    """Select and screen modes test only some layers: the missing ones count as p = 1, so the
    adjusted p-values are never below those of the full family."""
    full = {layer: p for layer, p in zip(NULL_LAYERS, np.linspace(0.001, 0.9, len(NULL_LAYERS)))}
    run = {layer: full[layer] for layer in NULL_LAYERS[:5]}
    over_all = holm_adjusted(full)
    partial = holm_adjusted(run, family=len(NULL_LAYERS))
    assert all(partial[layer] >= over_all[layer] - 1e-12 for layer in run)
    assert holm_adjusted(run)[1] < partial[1], "without the family the smallest p would be adjusted over 5, not 31"
    rule = make_rule("sign_test", alpha=ALPHA)
    rng = np.random.default_rng(3)
    base, layers = _null_round(rng, 10)
    some = {layer: layers[layer] for layer in NULL_LAYERS[:4]}
    outcome = rule.decide(list(range(10)), base, some, stream="s", family=len(NULL_LAYERS))
    raw = rule.decide(list(range(10)), base, layers, stream="s")
    assert all(outcome.holm[layer] >= raw.holm[layer] - 1e-12 for layer in some)


# --- select_stat=margin: the margin ranks, accuracy confirms ---

N_DOCS, SHOTS = 72, 8


class FlatteningTable:
    """Per doc: the base model's option log-likelihoods and gold option; every layer's knockout pulls
    them halfway toward uniform (so the argmax, and with it every answer, is unchanged)."""

    def __init__(self, rng, accuracy: float, random_labels: bool):
        self.options, self.gold = {}, {}
        for d in range(N_DOCS):
            logits = rng.normal(0, 2, size=4)
            right = rng.random() < accuracy
            self.gold[d] = (
                int(rng.integers(4))
                if random_labels
                else (
                    int(np.argmax(logits))
                    if right
                    else int(rng.choice([i for i in range(4) if i != np.argmax(logits)]))
                )
            )
            self.options[d] = logits

    def answer(self, knockout, docs):
        shrink = 0.5 if knockout else 1.0
        return {d: [self.options[d] * shrink] for d in docs}

    def score(self, doc, responses):
        return float(int(np.argmax(responses[0])) == self.gold[doc])

    def margin(self, doc, responses):
        values = responses[0]
        gold = self.gold[doc]
        return float(values[gold] - max(v for i, v in enumerate(values) if i != gold))


@pytest.mark.parametrize("random_labels", [False, True], ids=["accuracy_35pct", "random_labels"])
def test_confirm_with_the_margin_keeps_a_flattening_knockout_in_at_most_alpha_of_draws(random_labels):
    rng = np.random.default_rng(7 + random_labels)
    draws, kept, margin_rose = 200, 0, 0
    for seed in range(draws):
        table = FlatteningTable(rng, accuracy=0.35, random_labels=random_labels)
        config = TaloConfig(probe_shots=SHOTS, seed=seed, select_rule="confirm", select_stat="margin", threshold=-1.0)
        split = split_subtask(f"flat{seed}", list(range(N_DOCS)), SHOTS, seed)

        def make_sweep(table=table, config=config):
            return LayerSweep(
                table.answer, table.score, ProbeStore(None, {}), rule=config.selection_rule(), statistic=table.margin
            )

        selection = select_knockout(split, config, (1, 2, 3), make_sweep)
        kept += bool(selection.layers)
        wrong = [d for d in range(N_DOCS) if not table.score(d, table.answer(None, [d])[d])]
        margin_rose += all(
            table.margin(d, table.answer(1, [d])[d]) > table.margin(d, table.answer(None, [d])[d]) for d in wrong
        )
    assert margin_rose == draws, "the planted knockout raises the gold margin on every doc the model gets wrong"
    assert kept / draws <= _upper(ALPHA, draws)
