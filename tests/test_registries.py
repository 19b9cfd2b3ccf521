"""A new intervention is one class plus one registry line: config, hooks, export and the README follow."""

import pathlib

import pytest
import torch
from tiny_models import example_inputs, load_processor, load_tiny

from lmms_talo.method import interventions
from lmms_talo.method.config import TaloConfig
from lmms_talo.method.interventions import Intervention, InterventionError, Knockout, knocked_out
from lmms_talo.outputs.export import export

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _halve(module, args, output):
    return (output[0] * 0.5,) + tuple(output[1:]) if isinstance(output, tuple) else output * 0.5


@pytest.fixture
def toy_registered(monkeypatch):
    """A toy intervention (attention output halved), registered for this test only."""
    monkeypatch.setattr(interventions, "INTERVENTIONS", dict(interventions.INTERVENTIONS))

    @interventions.register
    class Halve(Intervention):
        name, summary = "halve", "the attention output is halved"

        def hooks(self, site):
            return [site.attention.register_forward_hook(_halve)]

    return Halve


def test_a_registered_intervention_is_accepted_applied_and_removed(toy_registered, tiny_model_dir):
    assert TaloConfig(intervention="halve").intervention == "halve"
    assert "halve" in interventions.names(paper=False) and "halve" not in interventions.names(exportable=True)
    path = tiny_model_dir("llama")
    model = load_tiny("llama", path)
    inputs = example_inputs("llama", load_processor("llama", path))
    with torch.no_grad():
        before = model(**inputs).logits
        with knocked_out(model, Knockout((1,), "halve")):
            halved = model(**inputs).logits
        after = model(**inputs).logits
    assert not torch.equal(before, halved)
    assert torch.equal(before, after)


def test_an_intervention_without_a_weight_fill_cannot_be_exported(toy_registered, tmp_path):
    with pytest.raises(InterventionError, match="cannot export 'halve'.*zero, uniform, mean"):
        export(str(tmp_path), (1,), "halve", str(tmp_path / "out"))


def test_an_unregistered_intervention_is_refused_with_the_registered_names():
    with pytest.raises(InterventionError, match="unknown intervention 'halve'.*zero, uniform, mean.*skip, mlp_zero"):
        TaloConfig.pop_from({"intervention": "halve"})


def _readme_row(arg: str) -> str:
    return next(line for line in README.read_text().splitlines() if line.startswith(f"| `{arg}`"))


def test_the_readme_lists_every_registered_intervention_and_rule():
    from lmms_talo.method.rules import RULES

    for name in interventions.names():
        assert f"`{name}`" in _readme_row("intervention"), f"README's intervention row misses {name}"
    for name in RULES:
        assert f"`{name}`" in _readme_row("select_rule"), f"README's select_rule row misses {name}"


def test_a_registered_rule_is_accepted_and_decides(monkeypatch):
    """A toy guarded rule: a layer must win on at least two more probe docs than it loses."""
    from lmms_talo.method import rules

    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))

    @rules.register
    class NetWins(rules.SelectionRule):
        name = "net_wins"

        def evidence(self, probe_docs, reference, layer_doc_scores, stream, family=None):
            return {
                l: sum((s[d] > reference[d]) - (s[d] < reference[d]) for d in probe_docs)
                for l, s in layer_doc_scores.items()
            }

        def passes(self, statistic):
            return statistic >= 2

        def describe(self, statistic):
            return f"net wins {statistic}"

    assert TaloConfig(select_rule="net_wins").selection_rule().name == "net_wins"
    docs = ["a", "b", "c", "d"]
    base = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 1.0}
    layers = {1: {"a": 1.0, "b": 0.0, "c": 0.0, "d": 1.0}, 2: {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}}
    assert rules.make_rule("gain").decide(docs, base, {1: layers[1]}).selected == 1
    outcome = rules.make_rule("net_wins").decide(docs, base, layers)
    assert outcome.selected == 2 and "net wins 2" in outcome.reason
    assert rules.make_rule("net_wins").decide(docs, base, {1: layers[1]}).selected is None
