"""Do TaLo's selections hold up? Every selection rule on real tasks, and a permuted-label control.

On SmolLM2-135M-Instruct (offline, prepared by `lmms-talo demo`) and BIG-bench multiple-choice tasks
(likelihood-scored `cloze` and `generate` ones), k = 8 probe shots:

  sweep    per task, one lmms-eval run (`--model talo_huggingface --force_simple`, replay=true,
           sweep=full) that scores the base model and every candidate layer (LAYERS) on every probe-pool
           doc (probe_shots = the pool, one round, threshold=1 so nothing is knocked out), and the
           base model on the test docs. The pool is the k = 8 run's pool: pool = min(n // 3, 4k),
           seeded by its size, and n <= 12 k here, so it is n // 3 for both.
  decide   per task and rule, TaLo's own `select_knockout` (rounds, rule, confirmation) on that
           k = 8 split, with the model's answers read back from the probe store instead of rerun:
           every (variant, doc) answer it asks for is one the sweep stored. Then the test docs of
           every layer any rule selected: one more lmms-eval run with those layers as candidates
           and test_all_layers=true (the probe results come from the store).
  control  the same decisions with each task's gold labels permuted (seeded) over the pool docs,
           the stored answers rescored under the permuted labels (no model pass): any selection
           is spurious by construction.

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
from lmms_talo.method.statistics import paired_flip_p
from lmms_talo.method.sweep import LayerSweep
from lmms_talo.outputs.probe_store import ProbeStore
from lmms_talo.outputs.report_reader import run_of

SHOTS = 8
LIMIT = 72  # docs per task: pool 24 (round 0: 8, at least 16 left to confirm on), 48 test docs
LAYERS = tuple(range(1, 30, 2))  # the candidate layers: every other decoder layer, for the time budget
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


def task_list(specs) -> list[DemoTask]:
    tasks = []
    for spec in specs:
        task = DemoTask.parse(spec)
        tasks.append(DemoTask(task.source, task.style, task.limit or LIMIT))
    return tasks


def _with_args(command: list[str], extra: str) -> list[str]:
    """The harness command with more TaLo model args."""
    command = list(command)
    at = command.index("--model_args") + 1
    command[at] += "," + extra
    return command


def sweep_commands(prepared, shares, state_dir: Path, runs: Path, stage: str, extra) -> tuple[list, list, list]:
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
            4 * SHOTS,
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
    """Stage 1: every layer on every pool doc, the base model on the test docs; per task its report group."""
    shares = driver.split_tasks(prepared.converted, args.jobs)
    started = time.perf_counter()
    layers = ";".join(map(str, LAYERS))
    parts = run_stage(
        *sweep_commands(prepared, shares, state_dir, runs, "sweep", lambda s: f"threshold=1.0,layers={layers}"),
        state_dir,
        say,
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


def decide(stored: StoredTask, variant: str, gold: dict[int, int]):
    """TaLo's own select_knockout on the k = 8 split, each answer read back from the store."""
    fields = dict(RULE_VARIANTS[variant])
    if stored.style == "generate":
        fields.pop("select_stat", None)  # the margin needs option likelihoods
    config = TaloConfig(probe_shots=SHOTS, **fields)
    split = ProbeSplit(stored.name, SHOTS, config.seed, tuple(stored.pool), (), tuple(stored.pool), None)

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


def decide_all(stored: dict[str, StoredTask]) -> dict:
    """task -> variant -> the selection's record on the true labels, and the control's selection count."""
    out = {}
    for name, task in stored.items():
        out[name] = {}
        for variant in RULE_VARIANTS:
            selection = decide(task, variant, labels(task, None))
            control = [decide(task, variant, labels(task, k)).layers for k in range(PERMUTATIONS)]
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


# ---- stage 3: the test docs of every selected layer ----


def test_stage(args, prepared, state_dir: Path, runs: Path, decisions: dict, say) -> dict:
    """task -> layer label -> {doc: score} on the test docs (and "base")."""
    chosen = {
        name: sorted({tuple(d["layers"]) for d in rules.values() if d["layers"]}) for name, rules in decisions.items()
    }
    todo = [t for t in prepared.converted if chosen.get(t.name)]
    if not todo:
        return {}
    shares = driver.split_tasks(todo, args.jobs)

    def extra(share):
        layers = sorted({l for t in share for ls in chosen[t.name] for l in ls})
        return f"threshold=1.0,test_all_layers=true,layers={';'.join(map(str, layers))}"

    # the candidate layers differ per share: the store still serves every probe answer (not keyed by them)
    parts = run_stage(*sweep_commands(prepared, shares, state_dir, runs, "test", extra), state_dir, say)
    out = {}
    for part in parts:
        run = run_of(part, runs / "test.json")
        for sub in run.subtasks:
            variants = sub.data.get("test_variants") or {}
            out[sub.task] = {label: entry["doc_scores"] for label, entry in variants.items()}
            out[sub.task]["base"] = sub.test("base")["doc_scores"]
    return out


def paired_summary(base: dict, knocked: dict, pool: set) -> dict:
    """Test difference (knockout - base, doc mean), its paired 95% interval (t over docs), and the
    one-sided paired test that the knockout is worse (paired_flip_p)."""
    docs = [d for d in base if d in knocked and int(d) not in pool]
    diff = np.array([knocked[d] - base[d] for d in docs], dtype=float)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    worse_p = paired_flip_p([knocked[d] for d in docs], [base[d] for d in docs], 0, "validity")
    return {
        "n": len(docs),
        "difference": float(diff.mean()),
        "ci95": [float(diff.mean() - half), float(diff.mean() + half)],
        "worse_p": worse_p,
    }


def summarise(decisions: dict, tests: dict, stored: dict) -> dict:
    rows = {}
    for variant in RULE_VARIANTS:
        applied, control, draws = [], 0, 0
        for name, rules in decisions.items():
            d = rules[variant]
            control += d["control_selected"]
            draws += d["control_draws"]
            if d["layers"]:
                label = "+".join(map(str, d["layers"]))
                summary = paired_summary(tests[name]["base"], tests[name][label], set(stored[name].pool))
                d["test"] = summary
                applied.append(summary["difference"])
        negative = [
            d["test"] for r in decisions.values() if (d := r[variant]).get("test") and d["test"]["difference"] < 0
        ]
        mean = float(np.mean(applied)) if applied else None
        half = 1.96 * float(np.std(applied, ddof=1)) / math.sqrt(len(applied)) if len(applied) > 1 else None
        rows[variant] = {
            "tasks": len(decisions),
            "applied": len(applied),
            "mean_test_difference": mean,
            "ci95_over_tasks": None if half is None else [mean - half, mean + half],
            "negative": len(negative),
            "significantly_negative": sum(t["worse_p"] < 0.05 for t in negative),
            "control_selection_rate": control / draws,
            "control_draws": draws,
        }
    return rows


GOALS = (
    "confirm: no significantly harmful knockout (one-sided paired test on the test docs, p < 0.05) over the "
    "study's tasks, and a selection rate under the permuted-label control of at most 10%. gain (the paper's "
    "rule) and the others: as measured."
)


def markdown(rows: dict, decisions: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| rule | tasks | knockout applied | mean test diff (95% CI over tasks) | negative "
        "| significantly negative | control selection rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, r in rows.items():
        ci = (
            "" if r["ci95_over_tasks"] is None else f" ({r['ci95_over_tasks'][0]:+.3f}, {r['ci95_over_tasks'][1]:+.3f})"
        )
        diff = "-" if r["mean_test_difference"] is None else f"{r['mean_test_difference']:+.3f}{ci}"
        lines.append(
            f"| {variant} | {r['tasks']} | {r['applied']} | {diff} | {r['negative']} | {r['significantly_negative']} | "
            f"{r['control_selection_rate']:.1%} ({r['control_draws']} draws) |"
        )
    lines += [
        "",
        "Per task (layer, test difference [95% CI over test docs], one-sided p that it is worse):",
        "",
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
    lines += ["", "Goals: " + GOALS]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("validity_out"))
    parser.add_argument(
        "--tasks", nargs="*", default=list(TASKS), help=f"NAME[:STYLE[:LIMIT]] (default limit {LIMIT:d})"
    )
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
    prepared = driver.prepare(cache, task_list(args.tasks), print)
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
    decided_at = time.perf_counter()
    decisions = decide_all(stored)
    print(
        f"decisions (5 rules x (1 + {PERMUTATIONS} permutations) x {len(stored)} tasks, offline): "
        f"{time.perf_counter() - decided_at:.0f} s"
    )
    tests = test_stage(args, prepared, state_dir, runs, decisions, print)
    rows = summarise(decisions, tests, stored)
    wall = time.perf_counter() - started
    header = (
        f"TaLo validity study, {time.strftime('%Y-%m-%d')}: SmolLM2-135M-Instruct, {len(stored)} BIG-bench tasks "
        f"(<= {LIMIT} docs each), k = {SHOTS}, zeroed self-attention, "
        f"candidate layers {LAYERS[0]}-{LAYERS[-1]} step 2; wall time {wall / 60:.1f} min"
    )
    (out / "validity.json").write_text(
        json.dumps({"header": header, "goals": GOALS, "rules": rows, "tasks": decisions}, indent=2)
    )
    text = markdown(rows, decisions, header)
    (out / "validity.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
