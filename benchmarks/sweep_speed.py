"""How much the fast sweep saves: one probe set, several ways, each in its own process.

  plain    one evaluation of the probe set by the base model (the unit of the ratios)
  authors  the authors' way: reload the model from disk for the base and for every layer, edit the
           layer's weights, evaluate the probe set
  naive    TaLo's in-memory sweep, one doc per call, without prefix replay (sweep=full, replay=false,
           sweep_batch=false)
  full     prefix replay, every layer on every doc, a round's docs in one call per variant (the default)
  select   prefix replay and exact pruning (sweep=select), batched
  screen   the gradient screen, then exact knockouts of the top screen_top layers (and screen_random
           seeded others), with prefix replay (sweep=screen), batched; screen:N sets screen_top=N
  full_seq, select_seq, screen_seq   the same on the sequential engine (sweep_batch=false)

Every mode runs through the harness's own model class and TaLo's own sweep code (the adapter's
_talo_sweep), on the same probe docs (one probe round). Wall time covers the measured work only
(model reloads included for `authors`); forward passes are counted with hooks: model calls
(a prefill or one decode step each), decoder-layer forwards, vision-tower calls; peak memory is the
process's maximum resident set size.

  python benchmarks/sweep_speed.py vlm          # (a) random-weight SmolLM2-shaped LLaVA, 576 image tokens
  python benchmarks/sweep_speed.py smollm2 --shots 8   # (b) the demo's SmolLM2-135M and task (after `lmms-talo demo`)
  python benchmarks/sweep_speed.py smollm2 --shots 8 --modes naive,full,select,screen \
      --tasks bb_general_knowledge,bb_odd_one_out,... --json out.json   # (c) the screen over several tasks

With --json, the figures by name: {"model", "tasks", "modes": {mode: {"seconds", "ratio_vs_naive",
"peak_rss_mb", "exact_passes", ...}}, "per_task": [...]}; the screen modes also carry
same_layer_fraction (the full sweep's selection, on the same probe docs) and spearman (estimated
against exact gains). The file is rewritten after every task, so a cut-short run keeps what it did.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("plain", "authors", "naive", "full_seq", "full", "select")
SEQUENTIAL = "sweep_batch=false"
TALO_ARGS = {
    "plain": "replay=false",
    "authors": "replay=false",
    "naive": f"replay=false,sweep=full,{SEQUENTIAL}",
    "full_seq": f"replay=true,sweep=full,{SEQUENTIAL}",
    "full": "replay=true,sweep=full",
    "select_seq": f"replay=true,sweep=select,{SEQUENTIAL}",
    "select": "replay=true,sweep=select",
    "screen_seq": f"replay=true,sweep=screen,{SEQUENTIAL}",
    "screen": "replay=true,sweep=screen",
}
# each batched mode beside its sequential twin: per-doc scores, answers and decisions compared
TWINS = {"full": "full_seq", "select": "select_seq", "screen": "screen_seq"}


def talo_args(mode: str) -> str:
    """The mode's TaLo model args; screen:N is the screen with screen_top=N."""
    if mode.startswith("screen:"):
        return f"{TALO_ARGS['screen']},screen_top={int(mode.split(':', 1)[1])}"
    return TALO_ARGS[mode]


# --- inside one mode's process ---


class PassCounter:
    """Hooks on the model (calls: a prefill or one decode step each), each decoder layer's attention
    (layer forwards, and the tokens they process: the measure of decoder work) and the vision tower."""

    def __init__(self):
        self.model_calls = self.layer_forwards = self.layer_tokens = self.vision_calls = 0
        self.num_layers = 0

    def _layer(self, module, args, kwargs, output) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.layer_forwards += 1
        self.layer_tokens += hidden.shape[0] * hidden.shape[1]

    def reset(self) -> None:
        self.model_calls = self.layer_forwards = self.layer_tokens = self.vision_calls = 0

    def attach(self, model) -> None:
        from lmms_talo.method.backbone import decoder_layers, unwrap

        model = unwrap(model)
        sites = decoder_layers(model)
        self.num_layers = len(sites)
        model.register_forward_hook(lambda *_: setattr(self, "model_calls", self.model_calls + 1))
        for site in sites:
            site.attention.register_forward_hook(self._layer, with_kwargs=True)
        inner = getattr(model, "model", None)
        tower = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
        if tower is not None:
            tower.register_forward_hook(lambda *_: setattr(self, "vision_calls", self.vision_calls + 1))


_EVALUATIONS: list = []


def _lmms_eval_setup(spec: dict, mode: str):
    """A TaLo lmms-eval model and its probe group, prepared as lmms-eval's evaluator does."""
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager, get_task_dict

    from lmms_talo.harness import evaluation_scope
    from lmms_talo.harness.mixin import TaloMixin

    def load():
        lm = get_model(spec["model"], True).create_from_arg_string(f"{spec['model_args']},{talo_args(mode)}")
        lm.task_dict[spec["task"]] = task.dataset
        return lm

    task_dict = get_task_dict([spec["task"]], TaskManager(include_path=spec["include_path"]))
    # the evaluation lmms-eval's evaluate() would open, held until this worker process exits
    _EVALUATIONS.append(evaluation_scope.evaluation(evaluation_scope.tasks_of(task_dict)))
    _EVALUATIONS[-1].__enter__()
    task = evaluation_scope.current().task(spec["task"])
    task.build_all_requests(rank=0, world_size=1)
    lm = load()
    (group,) = lm._talo_groups(spec["reqtype"], task.instances)
    return lm, group, load, lambda lm: getattr(super(TaloMixin, lm), spec["reqtype"])


def run_mode(spec: dict, mode: str) -> dict:
    import torch

    from lmms_talo.harness.scoring import TaskScorer
    from lmms_talo.memory import peak_resident_mb
    from lmms_talo.method.interventions import edit_weights_in_place

    torch.set_num_threads(spec["threads"])
    lm, group, load, base_method_of = _lmms_eval_setup(spec, mode)
    layers = list(lm.talo_candidate_layers)
    scorer = TaskScorer(group.task, group.task_name)
    probe = list(group.split.first_round().docs)
    counter = PassCounter()
    counter.attach(lm.model)
    out: dict = {"mode": mode, "probe_docs": [str(d) for d in probe], "layers": len(layers)}
    # one untimed, uncounted pass on another doc first: one-time costs (lazy init, allocator) are not the sweep's
    warm = next(d for d in group.docs() if d not in probe)
    lm._talo_sweep(group, base_method_of(lm), scorer).answer(None, [warm])
    counter.reset()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    started = time.perf_counter()
    if mode == "plain":
        sweep = lm._talo_sweep(group, base_method_of(lm), scorer)
        sweep.answer(None, probe)
    elif mode == "authors":
        scores = {}
        for layer in [None] + layers:
            del lm
            gc.collect()
            lm = load()
            counter.attach(lm.model)
            if layer is not None:
                edit_weights_in_place(lm._talo_model(), layer, spec["intervention"])
            sweep = lm._talo_sweep(group, base_method_of(lm), scorer)
            answers = sweep.answer(None, probe)
            scores[str(layer)] = [sweep.score(d, answers[d]) for d in probe]
        out["scores"] = scores
    else:
        sweep = lm._talo_sweep(group, base_method_of(lm), scorer)
        result = sweep.run(group.split, layers, spec["intervention"], 0)
        docs_by_key = {str(d): d for d in group.docs()}
        out.update(
            engine=result.engine,
            doc_answers={
                label: {d: repr(sweep.record(label, docs_by_key[d])[1]) for d in scores}
                for label, scores in result.doc_scores.items()
                if label != "screen"
            },
            selected=result.selected,
            pruned={str(k): v.after_docs for k, v in result.pruned[0].items()},
            doc_scores=result.doc_scores,
            replay=result.replay,
            screen=result.screen,
            gains={str(k): v for k, v in result.final.gains.items()},
            exact_passes=sum(len(v) for k, v in result.doc_scores.items() if k not in ("base", "screen")),
        )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - started
    if "doc_scores" in out and spec["reqtype"] == "loglikelihood":
        out.update(_smooth_records(lm, group, scorer, sweep, result))
    out.update(
        model_calls=counter.model_calls,
        layer_forwards=counter.layer_forwards,
        layer_tokens=counter.layer_tokens,
        vision_calls=counter.vision_calls,
        num_layers=counter.num_layers,
        peak_rss_mb=peak_resident_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    )
    return out


def _smooth_records(lm, group, scorer, sweep, result) -> dict:
    """For the screen's diagnostics (likelihood tasks): every exactly run variant's per-doc margin
    (the gold option's log-likelihood minus the best wrong one's, from the same answers). Read after
    the timed part."""
    docs = {str(d): d for d in group.docs()}
    margin = lambda label, d: scorer.margin(
        group.task.eval_docs[docs[d]], sweep.record(label, docs[d])[1], lm.talo_harness.likelihood_is_loss
    )
    return {
        "doc_margins": {
            label: {d: margin(label, d) for d in scores}
            for label, scores in result.doc_scores.items()
            if label != "screen"
        }
    }


# --- the driver ---


def vlm_spec(work: Path, shots: int, threads: int, device: str = "cpu", layers: int = 30) -> dict:
    """(a): the realistic-shape random LLaVA on a local image task (generate_until, 4 new tokens);
    `layers` decoder layers of the realistic width (benchmarks/gpu_check.sh's CPU smoke run uses few)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import realistic_vlm
    from cli_tasks import write_image_task

    model_dir = realistic_vlm.build(work / ("vlm" if layers == 30 else f"vlm{layers}"), num_layers=layers)
    write_image_task(work / "task", "talo_bench_vqa", [f"answer {i % 4}" for i in range(3 * shots)])
    return {
        "model": "talo_llava",
        "task": "talo_bench_vqa",
        "reqtype": "generate_until",
        "include_path": str(work / "task"),
        "intervention": "zero",
        "threads": threads,
        "model_args": (
            f"pretrained={model_dir},device={device},device_map={device},"
            f"probe_shots={shots},state_dir=none,max_redraws=0"
        ),
    }


def easyvqa_spec(task: str, shots: int, threads: int) -> dict:
    """(c): the demo's easy-VQA LLaVA (SmolLM2-135M-Instruct + the adapter trained on easy-VQA) through
    talo_llava on a demo sub-task, options scored by likelihood, batch size 8."""
    from lmms_talo.demo import vlm_demo
    from lmms_talo.outputs.model_identity import cache_root

    prepared = vlm_demo.prepare(cache_root(), print)
    return {
        "model": "talo_llava",
        "task": task,
        "include_path": str(prepared.tasks_dir),
        "reqtype": "loglikelihood",
        "intervention": "zero",
        "threads": threads,
        "model_args": f"{vlm_demo.model_args(prepared)},batch_size=8,probe_shots={shots},state_dir=none,max_redraws=0",
    }


def smollm2_spec(model: Path, task: str, include_path: Path, shots: int, threads: int) -> dict:
    """(b): the demo's SmolLM2-135M-Instruct on a demo task, through the demo's lmms-eval model
    (talo_huggingface, options scored by likelihood, batch size 8 as the demo runs it)."""
    return {
        "model": "talo_huggingface",
        "task": task,
        "include_path": str(include_path),
        "reqtype": "generate_until"
        if "output_type: generate_until" in (include_path / f"{task}.yaml").read_text()
        else "loglikelihood",
        "intervention": "zero",
        "threads": threads,
        "model_args": f"pretrained={model},device=cpu,dtype=float32,chat_template=false,batch_size=8,"
        f"probe_shots={shots},state_dir=none,max_redraws=0",
    }


def measure(spec: dict, modes) -> list[dict]:
    rows = []
    for mode in modes:
        load_before = os.getloadavg()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", mode, json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mode {mode} failed:\n{proc.stderr[-6000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1].update(load_before=load_before, load_after=os.getloadavg())
        print(f"  {mode}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return rows


def check(rows: list[dict]) -> list[str]:
    """The fast modes must reproduce the slow ones: same probe docs, per-doc scores, selection."""
    by = {r["mode"]: r for r in rows}
    problems = []
    if len({tuple(r["probe_docs"]) for r in rows}) != 1:
        problems.append("the modes probed different docs")
    for fast in ("full_seq", "full"):
        if "naive" in by and fast in by and by[fast]["doc_scores"] != by["naive"]["doc_scores"]:
            problems.append(f"{fast}'s per-doc scores differ from the naive sweep's")
    reference = by.get("naive") or by.get("full_seq") or by.get("full")
    for mode, row in by.items():
        if mode.startswith("screen") and reference:
            ran = {label: scores for label, scores in row["doc_scores"].items() if label != "screen"}
            if any(reference["doc_scores"].get(label) != scores for label, scores in ran.items()):
                problems.append(f"{mode}'s exact per-doc scores differ from the {reference['mode']} sweep's")
    for fast in ("full_seq", "full", "select_seq", "select"):
        if "naive" in by and fast in by and by[fast]["selected"] != by["naive"]["selected"]:
            problems.append(f"{fast} selected layer {by[fast]['selected']}, the naive sweep {by['naive']['selected']}")
    if "authors" in by and "naive" in by:
        naive = {
            label: [scores[d] for d in by["naive"]["probe_docs"]] for label, scores in by["naive"]["doc_scores"].items()
        }
        authors = {("base" if k == "None" else k): v for k, v in by["authors"]["scores"].items()}
        if authors != naive:
            problems.append("the reload-per-layer scores differ from the in-memory sweep's")
    return problems


def table(title: str, rows: list[dict]) -> str:
    plain = next(r for r in rows if r["mode"] == "plain")
    head = (
        "| mode | wall s | x plain | x naive | model calls | layer forwards | decoder work x plain "
        "| vision calls | peak MB | x plain |"
    )
    lines = [
        f"**{title}** ({len(plain['probe_docs'])} probe docs, {plain['layers']} candidate layers)",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    naive = next((r for r in rows if r["mode"] == "naive"), None)
    for r in rows:
        vs_naive = f"{r['seconds'] / naive['seconds']:.2f}" if naive else "-"
        lines.append(
            f"| {r['mode']} | {r['seconds']:.1f} | {r['seconds'] / plain['seconds']:.2f} | {vs_naive} "
            f"| {r['model_calls']} | {r['layer_forwards']} | {r['layer_tokens'] / plain['layer_tokens']:.2f} "
            f"| {r['vision_calls']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / plain['peak_rss_mb']:.2f} |"
        )
    select = next((r for r in rows if r["mode"] == "select"), None)
    if select and select["pruned"]:
        lines += [
            "",
            "select pruned (layer: after docs): "
            + ", ".join(f"{k}: {v}" for k, v in sorted(select["pruned"].items(), key=lambda kv: int(kv[0]))),
        ]
    return "\n".join(lines)


def _ratio(by_task: list[dict], name: str, reference: str) -> float | None:
    """`name`'s seconds over `reference`'s, summed over the tasks where both ran."""
    both = [t for t in by_task if name in t and reference in t]
    return sum(t[name]["seconds"] for t in both) / sum(t[reference]["seconds"] for t in both) if both else None


def _gain_of(gains: dict, layer: int | None) -> float | None:
    return gains.get(str(layer), 0.0) if layer is not None else None


def _ranked(*keys: dict) -> list[str]:
    """Layers by the first key, then the next (highest first); equal keys: the lower layer first."""
    return sorted(keys[0], key=lambda layer: tuple(-key[layer] for key in keys) + (int(layer),))


def _top_curve(ref: dict, ranked: list[str]) -> dict[int, int | None]:
    """The layer the gain rule selects among the first N `ranked` layers, for every N, from the
    reference sweep's exact per-doc scores (what screen_top=N, screen_random=0 selects)."""
    from lmms_talo.method.rules import decide_round

    probe = ref["probe_docs"]
    scores = ref["doc_scores"]
    base = {d: scores["base"][d] for d in probe}
    return {
        n: decide_round(probe, base, {int(l): {d: scores[l][d] for d in probe} for l in ranked[:n]}, 0.0).selected
        for n in range(1, len(ranked) + 1)
    }


def _smooth_diagnostics(ref: dict, screen: dict, layers: list[str]) -> dict | None:
    """Where the runs kept per-doc margins and the screen's per-doc records (likelihood tasks):
    - the estimate against the exact change of the smooth score it estimates (summed margin change
      over the probe docs), which separates the first-order error from the 0/1 score's coarseness;
    - the layer screen_top=N selects when layers are ranked by their summed estimate alone (the
      screen's ranking before the predicted probe score), and by the exact margin change (the best a
      ranking by the smooth score's change could do)."""
    from lmms_talo.method.screen import spearman

    if "doc_margins" not in ref:
        return None
    probe, margins = ref["probe_docs"], ref["doc_margins"]
    estimates = screen["screen"][0]["estimates"]
    exact = {l: sum(margins[l][d] - margins["base"][d] for d in probe) for l in layers}
    return {
        "pairs": [(estimates[l], exact[l]) for l in layers],
        "spearman": spearman([estimates[l] for l in layers], [exact[l] for l in layers]),
        "summed_curve": _top_curve(ref, _ranked(estimates)),
        "oracle_curve": _top_curve(ref, _ranked(exact)),
    }


def engine_agreement(by_task: list[dict]) -> dict:
    """Each batched mode against its sequential twin, over the (variant, doc) pairs both ran: the
    fraction of identical probe scores, of bit-identical answers, and the tasks with the same
    selection and the same interaction vector (exact gains)."""
    out = {}
    for batched, sequential in TWINS.items():
        pairs = [(t[batched], t[sequential]) for t in by_task if batched in t and sequential in t]
        if not pairs:
            continue
        shared = [
            (label, doc, b, s)
            for b, s in pairs
            for label, scores in s["doc_answers"].items()
            for doc in scores
            if doc in b["doc_answers"].get(label, {})
        ]
        out[batched] = {
            "tasks": len(pairs),
            "pairs": len(shared),
            "same_score_fraction": sum(b["doc_scores"][l][d] == s["doc_scores"][l][d] for l, d, b, s in shared)
            / max(len(shared), 1),
            "bit_identical_fraction": sum(b["doc_answers"][l][d] == s["doc_answers"][l][d] for l, d, b, s in shared)
            / max(len(shared), 1),
            "same_selection": sum(b["selected"] == s["selected"] for b, s in pairs),
            "same_interaction_vector": sum(b["gains"] == s["gains"] for b, s in pairs),
            "engines": sorted({b["engine"].get("engine", "?") for b, _ in pairs}),
        }
    return out


def figures(model: str, per_task: list[dict]) -> dict:
    """The --json figures by name: per mode the summed seconds over the tasks it ran on, the ratio to
    the naive (and full) sweep over the tasks both ran on, peak RSS, exact variant passes; per screen
    mode the agreement with the full sweep on the same probe docs, the Spearman correlation of the
    screen's estimates with the exact gains, and the layer screen_top=N would select for every N."""
    from lmms_talo.method.screen import spearman

    by_task = [{r["mode"]: r for r in t["rows"]} for t in per_task]
    names = list(dict.fromkeys(m for t in by_task for m in t))
    modes = {}
    for name in names:
        rows = [t[name] for t in by_task if name in t]
        modes[name] = {
            "seconds": sum(r["seconds"] for r in rows),
            "tasks": len(rows),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "peak_rss_vs_plain": max(t[name]["peak_rss_mb"] / t["plain"]["peak_rss_mb"] for t in by_task if name in t)
            if all("plain" in t for t in by_task if name in t)
            else None,
            "ratio_vs_naive": _ratio(by_task, name, "naive"),
            "ratio_vs_full": _ratio(by_task, name, "full"),
        }
        if all("exact_passes" in r for r in rows):
            modes[name]["exact_passes"] = sum(r["exact_passes"] for r in rows)
    for name in [n for n in names if n.startswith("screen")]:
        same, equal, differences, xs, ys, per, curves, smooth = [], [], [], [], [], [], [], []
        for task, t in zip(per_task, by_task):
            ref = next((t[m] for m in ("full", "replay", "naive") if m in t), None)
            if name not in t or ref is None:
                continue
            screen = t[name]
            same.append(ref["selected"] == screen["selected"])
            gains = ref["gains"]
            equal.append(
                _gain_of(gains, screen["selected"]) == _gain_of(gains, ref["selected"])
            )  # the same layer, or one as good on the probe
            if not same[-1]:
                differences.append(
                    {
                        "task": task["task"],
                        "full_selected": ref["selected"],
                        "screen_selected": screen["selected"],
                        "full_gain_of_screen_layer": gains.get(str(screen["selected"]), 0.0)
                        if screen["selected"] is not None
                        else 0.0,
                        "best_gain": max(gains.values(), default=0.0),
                    }
                )
            if screen["screen"] and gains:
                entry = screen["screen"][0]
                # the screen's estimated gains: predicted probe-score gains (runs before them: summed estimates)
                estimated = entry.get("predicted_gains") or entry["estimates"]
                layers = sorted(gains, key=int)
                xs += [estimated[l] for l in layers]
                ys += [gains[l] for l in layers]
                per.append(
                    {
                        "task": task["task"],
                        "spearman": spearman([estimated[l] for l in layers], [gains[l] for l in layers]),
                    }
                )
                curves.append((ref["selected"], _top_curve(ref, _ranked(estimated, entry["estimates"]))))
                smooth.append(_smooth_diagnostics(ref, screen, layers))
        tops = sorted({n for _, curve in curves for n in curve})
        # called only below, in this same iteration: bind this mode's `same` and `tops`
        by_top = lambda cs, same=same, tops=tops: {
            n: (sum(curve[n] == sel for sel, curve in cs) + len(same) - len(cs)) / len(same) for n in tops
        }
        modes[name].update(
            same_layer_fraction=sum(same) / len(same) if same else None,
            equal_gain_fraction=sum(equal) / len(equal) if equal else None,
            differences=differences,
            spearman=spearman(xs, ys),
            spearman_per_task=per,
            same_layer_fraction_by_screen_top=by_top(curves),
        )
        smooth = [d for d in smooth if d is not None]
        if smooth and len(smooth) == len(curves):
            pairs = [p for d in smooth for p in d["pairs"]]
            modes[name].update(
                spearman_vs_exact_margin=spearman([x for x, _ in pairs], [y for _, y in pairs]),
                spearman_vs_exact_margin_per_task=[
                    {"task": t["task"], "spearman": d["spearman"]} for t, d in zip(per_task, smooth)
                ],
                same_layer_fraction_by_screen_top_ranked_by_summed_estimate=by_top(
                    [(c[0], d["summed_curve"]) for c, d in zip(curves, smooth)]
                ),
                same_layer_fraction_by_screen_top_ranked_by_exact_margin=by_top(
                    [(c[0], d["oracle_curve"]) for c, d in zip(curves, smooth)]
                ),
            )
    from provenance import provenance

    return {
        "provenance": provenance(),
        "model": model,
        "tasks": [t["task"] for t in per_task],
        "modes": modes,
        "engine_agreement": engine_agreement(by_task),
        "per_task": per_task,
    }


def summary(figures_: dict) -> str:
    """The README's table: every mode over every task of one run, and each batched mode against its
    sequential twin."""
    p = figures_.get("provenance", {})
    lines = [
        f"{figures_['model']}, {len(figures_['tasks'])} tasks, one run: {p.get('date')}, commit {p.get('commit')}, "
        f"{p.get('cpu')}, {figures_.get('threads_per_process', '?')} thread(s) per process",
        "",
        "| mode | wall s (sum) | x naive | peak MB (max) | x plain | same layer as full | scores = sequential "
        "| answers bit-identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    for name, m in figures_["modes"].items():
        agreement = figures_.get("engine_agreement", {}).get(name, {})
        same = m.get("same_layer_fraction")
        lines.append(
            f"| {name} | {m['seconds']:.1f} | {fmt(m['ratio_vs_naive'], '.2f')} | {m['peak_rss_mb']:.0f} "
            f"| {fmt(m.get('peak_rss_vs_plain'), '.2f')} | {fmt(same, '.0%')} "
            f"| {fmt(agreement.get('same_score_fraction'), '.1%')} "
            f"| {fmt(agreement.get('bit_identical_fraction'), '.1%')} |"
        )
    for name, a in figures_.get("engine_agreement", {}).items():
        lines.append(
            f"\n{name} vs {TWINS[name]}: same selection on {a['same_selection']} of {a['tasks']} tasks, same "
            f"interaction vector on {a['same_interaction_vector']}, over {a['pairs']} (variant, doc) pairs"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=("vlm", "smollm2", "easyvqa", "merge"), help="merge: with --merge FILES")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lmms_talo_bench")
    parser.add_argument("--shots", type=int, default=4, help="probe docs (probe_shots)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cpu", help="(a) cpu or cuda")
    parser.add_argument("--vlm-layers", type=int, default=30, help="(a) decoder layers of the realistic VLM")
    cache = Path(os.environ.get("LMMS_TALO_CACHE", Path.home() / ".cache" / "lmms_talo"))
    parser.add_argument(
        "--model",
        type=Path,
        default=cache / "models" / "SmolLM2-135M-Instruct",
        help="(b) the converted model folder (lmms-talo demo builds it)",
    )
    parser.add_argument("--task", default="bb_general_knowledge", help="(b) the demo task")
    parser.add_argument("--tasks", help="(b) several demo tasks, comma-separated (overrides --task)")
    parser.add_argument(
        "--include-path",
        type=Path,
        help="(b) the folder holding the tasks' lmms-eval YAML (default: the demo's, converted if missing)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--skip-tasks", help="merge: leave these tasks (comma-separated) out of the figures")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="recompute the --json figures from these --json files' tasks (no run)"
    )
    args = parser.parse_args(argv)
    if args.merge:
        runs = [json.loads(path.read_text()) for path in args.merge]
        skipped = set((args.skip_tasks or "").split(","))
        merged = figures(runs[0]["model"], [t for run in runs for t in run["per_task"] if t["task"] not in skipped])
        merged["provenance"] = runs[0].get("provenance")  # the run's, not this reprint's
        merged["threads_per_process"] = runs[0].get("threads_per_process")
        text = json.dumps(merged, indent=1, default=str)
        args.json.write_text(text) if args.json else print(text)
        print(summary(merged))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    modes = [m for m in args.modes.split(",") if m]
    if "plain" not in modes:
        modes.insert(0, "plain")
    if args.case == "vlm":
        cases = [
            (
                vlm_spec(args.work, args.shots, args.threads, args.device, args.vlm_layers),
                f"(a) random SmolLM2-135M-shaped LLaVA ({args.vlm_layers} layers), 576 image tokens, {args.device}",
            )
        ]
    elif args.case == "easyvqa":
        from lmms_talo.demo import easy_vqa

        cases = [
            (easyvqa_spec(easy_vqa.task_name(kind), args.shots, args.threads), f"(c) easy-VQA LLaVA, {kind} questions")
            for kind in easy_vqa.QUESTION_TYPES
        ]
    else:
        tasks = args.tasks.split(",") if args.tasks else [args.task]
        if args.include_path is None:
            from lmms_talo.demo import driver

            args.include_path = driver.prepare(cache, list(driver.DEFAULT_TASKS), print).tasks_dir / "lmms"
        missing = [t for t in tasks if not (args.include_path / f"{t}.yaml").exists()]
        if not (args.model / "config.json").exists() or missing:
            parser.error(
                f"no model at {args.model} or no task {missing} in {args.include_path}: run `lmms-talo demo` first"
            )
        cases = [
            (
                smollm2_spec(args.model, t, args.include_path, args.shots, args.threads),
                f"(b) SmolLM2-135M-Instruct, {t}",
            )
            for t in tasks
        ]
    per_task, problems = [], []
    for spec, title in cases:
        rows = measure(spec, modes)
        per_task.append({"task": spec["task"], "rows": rows})
        print(table(title, rows), flush=True)
        problems += [f"{spec['task']}: {p}" for p in check(rows)]
        if args.json:
            args.json.write_text(
                json.dumps(
                    figures(Path(spec["model_args"].split(",")[0].split("=", 1)[1]).name, per_task)
                    | {"threads_per_process": args.threads},
                    indent=1,
                    default=str,
                )
            )
    for problem in problems:
        print(f"MISMATCH: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(HERE))
        print(json.dumps(run_mode(json.loads(sys.argv[3]), sys.argv[2]), default=str))
        sys.exit(0)
    sys.path.insert(0, str(HERE))
    sys.exit(main())
