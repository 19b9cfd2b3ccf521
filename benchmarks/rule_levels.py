"""Each selection rule under a true null, simulated: how often some layer is selected when no layer
helps (the family-wise rate), with 31 candidate layers as a 32-layer model has; and how often
`confirm` with select_stat=margin keeps a knockout that only flattens the option likelihoods.

    python benchmarks/rule_levels.py [--rounds 2000] [--json benchmarks/results/rule_levels.json]

Null: pass/fail base scores at 50%; each layer flips each doc's score with probability 0.4,
independently (every layer's paired differences are symmetric about 0). The gain rule has no level:
its rate is how often it selects noise. tests/test_rule_levels.py asserts the levels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from provenance import provenance  # noqa: E402
from test_rule_levels import NULL_LAYERS, FlatteningTable, _null_round  # noqa: E402

from lmms_talo.method.config import TaloConfig  # noqa: E402
from lmms_talo.method.probe_split import split_subtask  # noqa: E402
from lmms_talo.method.rules import make_rule  # noqa: E402
from lmms_talo.method.selection import select_knockout  # noqa: E402
from lmms_talo.method.sweep import LayerSweep  # noqa: E402
from lmms_talo.outputs.probe_store import ProbeStore  # noqa: E402


def family_wise(rule_name: str, n_docs: int, rounds: int) -> float:
    rule = make_rule(rule_name)
    rng = np.random.default_rng(n_docs)
    hits = 0
    for r in range(rounds):
        base, layers = _null_round(rng, n_docs)
        hits += rule.decide(list(range(n_docs)), base, layers, stream=f"null{r}").selected is not None
    return hits / rounds


def flattening_kept(rule_name: str, random_labels: bool, draws: int) -> float:
    rng = np.random.default_rng(11 + random_labels)
    kept = 0
    for seed in range(draws):
        table = FlatteningTable(rng, accuracy=0.35, random_labels=random_labels)
        extra = (
            {"select_rule": "confirm", "select_base_rule": rule_name}
            if rule_name != "confirm"
            else {"select_rule": "confirm"}
        )
        config = TaloConfig(probe_shots=8, seed=seed, select_stat="margin", threshold=-1.0, **extra)
        split = split_subtask(f"flat{seed}", list(range(72)), 8, seed)
        make = lambda table=table, config=config: LayerSweep(
            table.answer, table.score, ProbeStore(None, {}), rule=config.selection_rule(), statistic=table.margin
        )
        kept += bool(select_knockout(split, config, (1, 2, 3), make).layers)
    return kept / draws


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for rule in ("gain", "sign_test", "maxt"):
        for n_docs in (8, 10):
            rate = family_wise(rule, n_docs, args.rounds)
            se = math.sqrt(max(rate * (1 - rate), 1e-12) / args.rounds)
            rows.append({"rule": rule, "n_docs": n_docs, "layers": len(NULL_LAYERS), "rate": rate, "se": se})
    flat = [
        {
            "base_rule": base,
            "labels": "random" if random else "35% accuracy",
            "kept": flattening_kept(base, random, args.rounds // 4),
        }
        for base in ("confirm", "sign_test")
        for random in (False, True)
    ]
    print("| rule | probe docs | null layers | rounds with a selection (alpha 0.05) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rule']} | {r['n_docs']} | {r['layers']} | {r['rate']:.3f} ± {r['se']:.3f} |")
    print("\n| confirm, base rule | labels | flattening knockout kept |\n|---|---|---:|")
    for f in flat:
        print(f"| {f['base_rule']} | {f['labels']} | {f['kept']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"provenance": provenance(), "null": rows, "flattening": flat}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
