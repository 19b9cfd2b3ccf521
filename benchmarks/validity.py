"""Do TaLo's selections hold up? Every selection rule on real tasks, and a permuted-label control.

On SmolLM2-135M-Instruct (offline, prepared by `lmms-talo demo`) and BIG-bench multiple-choice tasks
(likelihood-scored `cloze` and `generate` ones), every candidate layer (1-29), two probe budgets
k (BUDGETS: 8, and 20 as in the paper's 10-20):

  sweep    per task, one lmms-eval run (`--model talo_huggingface --force_simple`, replay=true,
           sweep=full, the batched engine) that scores the base model and every candidate layer on
           every doc of the study pool (the n // 3 docs TaLo's split draws as its pool when
           probe_shots >= n // 12; one round, threshold=1 so nothing is knocked out), and, with
           test_all_layers=true, the base model and every layer on the test docs (the rest):
           the oracle column.
  decide   per budget k, task and rule, TaLo's own `select_knockout` (rounds, rule, confirmation)
           on a k-shot split whose pool is min(n // 3, 4k) docs drawn (seeded) from the study pool,
           as the authors' pool size is, so the budget also bounds the confirmation docs; the
           model's answers are read back from the probe store instead of rerun. The test docs are
           the same for both budgets: those outside the study pool.
  oracle   per task, every layer's test difference; the best one, and whether it is significant
           after Holm over the layers (one-sided paired test that the knockout is better); each
           rule's regret: the best layer's test difference minus its own selection's (0 without one).
  control  the same decisions with each task's gold labels permuted (seeded) over the pool docs,
           the stored answers rescored under the permuted labels (no model pass): any selection
           is spurious by construction. Draws: PERMUTATIONS relabelings x tasks, per budget.

Writes validity.json and validity.md (the table) to --out. Run:
  lmms-talo demo                     # once: the model and the BIG-bench archive in the cache
  python benchmarks/validity.py --out validity_out
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmms_talo.demo import driver
from lmms_talo.demo.bigbench import mentioned_options
from lmms_talo.demo.driver import DemoTask
from lmms_talo.method.config import TaloConfig
from lmms_talo.method.probe_split import ProbeSplit
from lmms_talo.method.selection import select_knockout
from lmms_talo.method.statistics import holm_adjusted, paired_flip_p
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore

BUDGETS = (8, 20)  # probe shots k
LIMIT = 150  # docs per task (fewer where a task has fewer): a study pool of 50, 100 test docs; the time budget
LAYERS = tuple(range(1, 30))  # every candidate layer of SmolLM2's 30
TASKS = (
    "general_knowledge",
    "similarities_abstraction",
    "arithmetic/1_digit_multiplication",
    "arithmetic/1_digit_subtraction",
    "movie_recommendation",
    "human_organs_senses",
    "swahili_english_proverbs",
    "social_iqa",
    "hindu_knowledge",
    "odd_one_out",
    "arithmetic/1_digit_addition:generate",
    "arithmetic/1_digit_multiplication:generate",
)


def task_list(specs, limit: int) -> list[DemoTask]:
    tasks = []
    for spec in specs:
        task = DemoTask.parse(spec)
        tasks.append(DemoTask(task.source, task.style, task.limit or limit))
    return tasks


def _with_args(command: list[str], extra: str) -> list[str]:
    """The harness command with more TaLo model args."""
    command = list(command)
    at = command.index("--model_args") + 1
    command[at] += "," + extra
    return command


def sweep_commands(
    prepared, shares, state_dir: Path, runs: Path, stage: str, extra, shots: int
) -> tuple[list, list, list]:
    """One lmms-eval command per share of tasks; `extra(share)` adds TaLo args."""
    commands, logs, reports = [], [], []
    for i, share in enumerate(shares):
        report = runs / f"{stage}_{i}.json"
        command = driver.harness_command(
            "lmms-eval",
            prepared.model,
            prepared.tasks_dir,
            [t.name for t in share],
            runs / f"{stage}_{i}",
            shots,
            1,
            state_dir,
            report,
        )
        commands.append(_with_args(command, extra(share)))
        logs.append(runs / f"{stage}_{i}.log")
        reports.append(report)
    return commands, logs, reports


def run_stage(commands, logs, reports, state_dir, say) -> list[dict]:
    for command in commands:
        say("  " + " ".join(command))
    codes = driver.run_harnesses(commands, logs, state_dir, 1, say)
    for code, log, report in zip(codes, logs, reports):
        if code != 0 or not report.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise SystemExit(f"lmms-eval failed (exit {code}); end of {log}:\n{tail}")
    return [json.loads(r.read_text()) for r in reports]


def sweep_stage(args, prepared, state_dir: Path, runs: Path, say) -> dict:
    """Stage 1: every layer on every study-pool doc and on every test doc; per task its report group.
    probe_shots = limit // 3 >= n // 12, so the pool is n // 3 and round 0 is the whole pool."""
    shares = driver.split_tasks(prepared.converted, args.jobs)
    started = time.perf_counter()
    layers = ";".join(map(str, LAYERS))
    extra = f"threshold=1.0,layers={layers},test_all_layers=true"
    parts = run_stage(
        *sweep_commands(prepared, shares, state_dir, runs, "sweep", lambda s: extra, args.limit // 3), state_dir, say
    )
    say(f"  sweep stage: {time.perf_counter() - started:.0f} s")
    return {g["task"]: g for part in parts for g in part["subtasks"]}


# ---- stage 2: every rule's decision, offline, from the stored answers ----

RULE_VARIANTS = {  # study label -> TaLo config fields
    "gain": dict(select_rule="gain"),
    "sign_test": dict(select_rule="sign_test"),
    "maxt": dict(select_rule="maxt"),
    "confirm": dict(select_rule="confirm"),
    "confirm+margin": dict(select_rule="confirm", select_stat="margin"),  # margin on likelihood tasks only
}
PERMUTATIONS = 50  # permuted-label draws per task in the control


@dataclass
class StoredTask:
    """One task's pool answers as the sweep stored them: (variant, doc) -> (score, responses)."""

    name: str
    style: str
    docs: list  # the parquet rows (options, answer)
    pool: list[int]
    records: dict

    def score(self, doc: int, responses: list, gold: int) -> float:
        """The doc's score under `gold`, as the task scores it: cloze, the option with the least loss
        (lmms-eval's multiple-choice argmin); generate, right iff the answer names gold and no other."""
        options = list(self.docs[doc]["options"])
        if self.style == "generate":
            return float(mentioned_options(str(responses[0]), options) == {gold})
        return float(int(np.argmin([r[0] for r in responses[: len(options)]])) == gold)

    def margin(self, doc: int, responses: list, gold: int) -> float:
        """select_stat=margin under `gold` (lmms_talo.harness.scoring.TaskScorer.margin on lmms-eval's losses)."""
        lls = [-float(r[0]) for r in responses[: len(self.docs[doc]["options"])]]  # lmms-eval: losses
        return lls[gold] - max(ll for i, ll in enumerate(lls) if i != gold)


def load_stored(group: dict, converted, state_dir: Path) -> StoredTask:
    """The task's store file is the one whose records are this task's pool scores (the file name is
    a fingerprint of the task config, model and harness; matched here by content)."""
    import pyarrow.parquet as pq

    task = next(t for t in converted if t.name == group["task"])
    docs = pq.read_table(task.parquet).to_pylist()
    scores = group["probe_doc_scores"]
    pool = [int(d) for d in group["pool"]]
    for path in state_dir.glob("*.jsonl"):
        with open(path, encoding="utf-8") as lines:
            rows = [json.loads(line) for line in lines]
        records = {(r["variant"], r["doc"]): (r["score"], [_tuple(x) for x in r["responses"]]) for r in rows}
        if {d for _, d in records} == {str(d) for d in pool} and all(
            scores[v].get(d) == s for (v, d), (s, _) in records.items() if v in scores
        ):
            stored = StoredTask(task.name, task.style, docs, pool, records)
            check_rescoring(stored)
            return stored
    raise SystemExit(f"no probe store file holds {task.name}'s pool answers: rerun the sweep stage")


def _tuple(value):
    return tuple(value["tuple"]) if isinstance(value, dict) and "tuple" in value else value


def check_rescoring(stored: StoredTask) -> None:
    """The control rescores stored answers under other labels: first, under the true labels, the
    rescoring must give every score the harness gave."""
    for (variant, doc), (score, responses) in stored.records.items():
        mine = stored.score(int(doc), responses, int(stored.docs[int(doc)]["answer"]))
        if mine != score:
            raise SystemExit(f"{stored.name} doc {doc} ({variant}): rescored {mine}, the harness scored {score}")


def labels(stored: StoredTask, permutation: int | None) -> dict[int, int]:
    """Gold option per pool doc: the true one, or (permutation k) the pool's gold indices permuted
    by a seeded draw, each taken modulo its doc's number of options."""
    gold = {d: int(stored.docs[d]["answer"]) for d in stored.pool}
    if permutation is None:
        return gold
    rng = np.random.default_rng([permutation, zlib.crc32(stored.name.encode())])
    shuffled = rng.permutation([gold[d] for d in stored.pool])
    return {d: int(g) % len(stored.docs[d]["options"]) for d, g in zip(stored.pool, shuffled)}


def budget_pool(stored: StoredTask, shots: int) -> tuple[int, ...]:
    """The k-shot split's pool: min(n // 3, 4k) docs of the study pool, drawn with a seed (in pool order)."""
    size = min(len(stored.docs) // 3, 4 * shots, len(stored.pool))
    rng = np.random.default_rng([shots, zlib.crc32(stored.name.encode())])
    chosen = set(rng.choice(len(stored.pool), size=size, replace=False).tolist())
    return tuple(d for i, d in enumerate(stored.pool) if i in chosen)


def decide(stored: StoredTask, variant: str, gold: dict[int, int], shots: int):
    """TaLo's own select_knockout on the k-shot split, each answer read back from the store."""
    fields = dict(RULE_VARIANTS[variant])
    if stored.style == "generate":
        fields.pop("select_stat", None)  # the margin needs option likelihoods
    config = TaloConfig(probe_shots=shots, **fields)
    pool = budget_pool(stored, shots)
    split = ProbeSplit(stored.name, shots, config.seed, pool, (), pool, None)

    def answer(knockout, docs):
        label = knockout.label if knockout else "base"
        return {d: stored.records[(label, str(d))][1] for d in docs}

    def make_sweep():
        statistic = (lambda d, r: stored.margin(d, r, gold[d])) if config.select_stat == "margin" else None
        return LayerSweep(
            answer,
            lambda d, r: stored.score(d, r, gold[d]),
            ProbeStore(None, {}),
            rule=config.selection_rule(),
            statistic=statistic,
        )

    return select_knockout(split, config, LAYERS, make_sweep)


def decide_all(stored: dict[str, StoredTask], shots: int) -> dict:
    """task -> variant -> the selection's record on the true labels, and the control's selection count."""
    out = {}
    for name, task in stored.items():
        out[name] = {}
        for variant in RULE_VARIANTS:
            selection = decide(task, variant, labels(task, None), shots)
            control = [decide(task, variant, labels(task, k), shots).layers for k in range(PERMUTATIONS)]
            out[name][variant] = {
                "layers": list(selection.layers),
                "probe_gain": selection.sweep.final.gains.get(selection.sweep.selected) if selection.sweep else None,
                "reason": selection.confirmation.reason if selection.confirmation else selection.sweep.final.reason,
                "holm_p": selection.sweep.final.holm.get(selection.sweep.final.tied_layers[0])
                if selection.sweep.final.holm
                else None,
                "control_selected": sum(bool(layers) for layers in control),
                "control_draws": PERMUTATIONS,
            }
    return out


# ---- the test docs: every layer's (the sweep stage scored them) ----


def tests_of(groups: dict) -> dict:
    """task -> variant label -> {doc: score} on the test docs ("base": the model as loaded; the sweep
    stage's threshold=1 knocks nothing out, so its own test entry is the base model's)."""
    out = {}
    for name, group in groups.items():
        assert not group["selected_layers"], f"{name}: the sweep stage must knock nothing out"
        test = group["test"]
        out[name] = {label: entry["doc_scores"] for label, entry in (group.get("test_variants") or {}).items()}
        out[name]["base"] = (test.get("base") or test["talo"])["doc_scores"]
    return out


def t_half_width(values) -> float | None:
    """Half the 95% interval of the mean, with the t quantile (None below two values)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    return float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def paired_summary(base: dict, knocked: dict, pool: set) -> dict:
    """Test difference (knockout - base, doc mean), its paired 95% interval (t over docs), and the
    one-sided paired test that the knockout is worse (paired_flip_p)."""
    docs = [d for d in base if d in knocked and int(d) not in pool]
    diff = np.array([knocked[d] - base[d] for d in docs], dtype=float)
    half = t_half_width(diff)
    half = float("nan") if half is None else half
    worse_p = paired_flip_p([knocked[d] for d in docs], [base[d] for d in docs], 0, "validity")
    return {
        "n": len(docs),
        "difference": float(diff.mean()),
        "ci95": [float(diff.mean() - half), float(diff.mean() + half)],
        "worse_p": worse_p,
    }


def oracle(tests: dict, stored: dict) -> dict:
    """Per task: every layer's test difference, the best layer's, and its Holm-adjusted one-sided p
    that the knockout is better (over all candidate layers): what there is for TaLo to find."""
    out = {}
    for name, variants in tests.items():
        base, pool = variants["base"], set(stored[name].pool)
        docs = [d for d in base if int(d) not in pool]
        differences, better = {}, {}
        for layer in LAYERS:
            knocked = variants[str(layer)]
            differences[layer] = float(np.mean([knocked[d] - base[d] for d in docs]))
            better[layer] = paired_flip_p([base[d] for d in docs], [knocked[d] for d in docs], 0, f"{name}:{layer}")
        holm = holm_adjusted(better)
        best = max(LAYERS, key=lambda layer: (differences[layer], -layer))
        out[name] = {
            "n": len(docs),
            "best_layer": best,
            "best_difference": differences[best],
            "best_holm_p": holm[best],
            "significant_layers": sorted(layer for layer in LAYERS if holm[layer] < 0.05 and differences[layer] > 0),
            "differences": {str(layer): differences[layer] for layer in LAYERS},
        }
    return out


def summarise(decisions: dict, tests: dict, stored: dict, oracles: dict) -> dict:
    rows = {}
    for variant in RULE_VARIANTS:
        applied, regrets, control, draws = [], [], 0, 0
        for name, rules in decisions.items():
            d = rules[variant]
            control += d["control_selected"]
            draws += d["control_draws"]
            own = 0.0
            if d["layers"]:
                label = "+".join(map(str, d["layers"]))
                summary = paired_summary(tests[name]["base"], tests[name][label], set(stored[name].pool))
                d["test"] = summary
                applied.append(summary["difference"])
                own = summary["difference"]
            d["regret"] = oracles[name]["best_difference"] - own
            regrets.append(d["regret"])
        negative = [
            d["test"] for r in decisions.values() if (d := r[variant]).get("test") and d["test"]["difference"] < 0
        ]
        mean = float(np.mean(applied)) if applied else None
        half = t_half_width(applied)
        rows[variant] = {
            "tasks": len(decisions),
            "applied": len(applied),
            "mean_test_difference": mean,
            "ci95_over_tasks": None if half is None else [mean - half, mean + half],
            "negative": len(negative),
            "significantly_negative": sum(t["worse_p"] < 0.05 for t in negative),
            "mean_regret": float(np.mean(regrets)),
            "control_selection_rate": control / draws,
            "control_draws": draws,
        }
    return rows


GOALS = (
    "confirm: no significantly harmful knockout (one-sided paired test on the test docs, p < 0.05) over the "
    "study's tasks, and a selection rate under the permuted-label control of at most 10%. gain (the paper's "
    "rule) and the others: as measured."
)


def rule_table(rows: dict) -> list[str]:
    lines = [
        "| rule | tasks | knockout applied | mean test diff (95% CI over tasks, t) | negative "
        "| significantly negative | mean regret | control selection rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in rows.items():
        ci = (
            "" if r["ci95_over_tasks"] is None else f" ({r['ci95_over_tasks'][0]:+.3f}, {r['ci95_over_tasks'][1]:+.3f})"
        )
        diff = "-" if r["mean_test_difference"] is None else f"{r['mean_test_difference']:+.3f}{ci}"
        lines.append(
            f"| {variant} | {r['tasks']} | {r['applied']} | {diff} | {r['negative']} | {r['significantly_negative']} | "
            f"{r['mean_regret']:+.3f} | {r['control_selection_rate']:.1%} ({r['control_draws']} draws) |"
        )
    return lines


def task_table(decisions: dict) -> list[str]:
    lines = [
        "| task | " + " | ".join(RULE_VARIANTS) + " |",
        "|---|" + "---|" * len(RULE_VARIANTS),
    ]
    for name, rules in decisions.items():
        cells = []
        for variant in RULE_VARIANTS:
            d = rules[variant]
            if not d["layers"]:
                cells.append("-")
                continue
            t = d["test"]
            cells.append(
                f"L{'+'.join(map(str, d['layers']))} {t['difference']:+.3f} "
                f"[{t['ci95'][0]:+.2f}, {t['ci95'][1]:+.2f}] p={t['worse_p']:.2g}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(by_budget: dict, oracles: dict, header: str) -> str:
    lines = [header, ""]
    lines += [
        "Oracle headroom (every layer's knockout on the test docs):",
        "",
        "| task | test docs | best layer | its test diff | Holm p (better, over the layers) "
        "| layers significant at 0.05 |",
        "|---|---|---|---|---|---|",
    ]
    for name, o in oracles.items():
        significant = ", ".join(map(str, o["significant_layers"])) or "none"
        lines.append(
            f"| {name} | {o['n']} | L{o['best_layer']} | {o['best_difference']:+.3f} | {o['best_holm_p']:.3g} "
            f"| {significant} |"
        )
    for shots, entry in by_budget.items():
        lines += ["", f"k = {shots}:", ""] + rule_table(entry["rules"])
        lines += [
            "",
            f"k = {shots}, per task (layer, test difference [95% CI over test docs], one-sided p that it is worse):",
            "",
        ] + task_table(entry["tasks"])
    lines += ["", "Goals: " + GOALS]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("validity_out"))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), help="NAME[:STYLE[:LIMIT]] (default limit: --limit)")
    parser.add_argument("--limit", type=int, default=LIMIT, help="docs per task at most")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--stage",
        choices=("sweep", "decide", "all"),
        default="all",
        help="sweep: stage 1 only; decide: from stage 1's saved groups on; all: both",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = driver.cache_root().resolve()
    prepared = driver.prepare(cache, task_list(args.tasks, args.limit), print)
    state_dir = out / "probe_results"
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    if args.stage == "decide":
        groups = json.loads((out / "sweep_groups.json").read_text())
    else:
        groups = sweep_stage(args, prepared, state_dir, runs, print)
        (out / "sweep_groups.json").write_text(json.dumps(groups))
    if args.stage == "sweep":
        print(f"sweep done in {time.perf_counter() - started:.0f} s")
        return 0
    stored = {name: load_stored(group, prepared.converted, state_dir) for name, group in groups.items()}
    tests = tests_of(groups)
    oracles = oracle(tests, stored)
    by_budget = {}
    for shots in BUDGETS:
        decided_at = time.perf_counter()
        decisions = decide_all(stored, shots)
        print(
            f"k = {shots}: decisions ({len(RULE_VARIANTS)} rules x (1 + {PERMUTATIONS} relabelings) x "
            f"{len(stored)} tasks, offline): {time.perf_counter() - decided_at:.0f} s"
        )
        by_budget[shots] = {"rules": summarise(decisions, tests, stored, oracles), "tasks": decisions}
    wall = time.perf_counter() - started
    header = (
        f"TaLo validity study, {time.strftime('%Y-%m-%d')}: SmolLM2-135M-Instruct, {len(stored)} BIG-bench tasks "
        f"(<= {args.limit} docs each: a study pool of n // 3, the rest test docs), k = "
        f"{' and '.join(map(str, BUDGETS))}, zeroed self-attention, candidate layers {LAYERS[0]}-{LAYERS[-1]}; "
        f"control: {PERMUTATIONS} relabelings x {len(stored)} tasks = {PERMUTATIONS * len(stored)} draws per rule "
        f"and budget; wall time {wall / 60:.1f} min"
    )
    (out / "validity.json").write_text(
        json.dumps(
            {"header": header, "goals": GOALS, "oracle": oracles, "budgets": by_budget},
            indent=2,
        )
    )
    text = markdown(by_budget, oracles, header)
    (out / "validity.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
