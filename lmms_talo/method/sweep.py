"""The layer sweep of one sub-task: baseline + one pass per candidate layer over the probe set,
with the authors' redraws (lmms_talo.method.probe_split: fresh pool units after a perfect round-0 baseline or a
round with no gain), and every per-unit result persisted as it lands.

The sweep is written against two callables, so that any harness (lmms-eval, lm-eval) can drive it:
  answer(knockout, docs) -> {doc: [responses]}   runs the model on those docs' requests
  score(doc, responses)  -> float in [0, 1]

Two engines (lmms_talo.method.batching). The batched one, the default, hands a round's probe docs to
`answer` together, one call per variant, so the harness's batching puts their requests in rows of
one model call; it checks itself against the sequential one before any knockout runs batched
(LayerSweep._check_batching) and steps aside on any difference. The sequential one runs doc by doc.
Either way the base pass of a call's docs runs first, then their knockout variants. With prefix
replay (lmms_talo.method.prefix_replay) the base pass records what the knockouts cannot change and
the variants replay it, so only one call's docs have records alive at a time. Replay checks itself in
every sweep (one sub-task, one request type): on the first call it replays (and on the first whose
model calls take another route), one variant also runs in full, and any difference turns replay off
for the rest of the run (LayerSweep._checked_run). Three modes:
  full    every candidate layer on every probe doc: the whole Task-Layer Interaction Vector.
  select  the same selected layer with less work: a layer stops being evaluated once even perfect
          scores on its remaining docs could not make it the selection (exact pruning, LayerPruner).
  screen  a gradient screen (lmms_talo.method.screen) estimates every layer's effect from one forward and
          backward pass per probe doc and ranks the layers by the probe score it predicts; the top
          screen_top layers and screen_random seeded others run exactly, and the rule decides among
          those only (the selection is always exactly scored).
Under several processes (lmms_talo.method.parallel) each rank runs a share of the layers and the ranks
merge their scores, so every rank decides the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lmms_talo.logs import log
from lmms_talo.method.batching import SweepEngine, compare_engines
from lmms_talo.method.interventions import BASE, Knockout, VariantLabel, layer_label
from lmms_talo.method.parallel import RankMismatchError, Ranks
from lmms_talo.method.prefix_replay import PrefixReplay, ReplayStats
from lmms_talo.method.probe_split import MAX_REDRAWS, ProbeRound, ProbeSplit
from lmms_talo.method.rules import RoundOutcome, SelectionRule, baseline_is_perfect, make_rule, mean
from lmms_talo.method.screen import Screen, chosen_layers, predicted_scores, spearman

Answer = Callable[[Knockout | None, Sequence[Hashable]], dict]
Score = Callable[[Hashable, list], float]
Statistic = Callable[[Hashable, list], float]  # a per-doc statistic from the same responses (select_stat)

SWEEP_MODES = ("full", "select", "screen")
SCREEN = VariantLabel("screen")  # the store's key of a doc's gradient estimates


class ResultStore(Protocol):
    """Where the sweep persists each (variant, doc) result as it lands, and finds it again after a
    crash (lmms_talo.outputs.probe_store.ProbeStore)."""

    def get(self, variant: VariantLabel, doc: Hashable) -> tuple[float, list] | None: ...

    def put(self, variant: VariantLabel, doc: Hashable, score: float, responses: list) -> None: ...


class SweepModeError(ValueError):
    """An unknown sweep mode."""


def check_sweep_mode(mode: str, rule: SelectionRule | None = None) -> str:
    """A known mode that can serve `rule`: select mode's pruning bounds are the gain rule's."""
    if mode not in SWEEP_MODES:
        raise SweepModeError(
            f"sweep={mode!r} is unknown: use full (every layer on every probe doc, the whole interaction "
            f"vector), select (the same selected layer, hopeless layers pruned early) or screen (a gradient "
            f"screen ranks the layers, the top screen_top and screen_random others run exactly)"
        )
    if mode == "select" and rule is not None and rule.guarded:
        raise SweepModeError(
            f"sweep=select prunes layers by the gain rule's bounds, so it cannot serve select_rule="
            f"{rule.name} (which needs every layer's scores): use sweep=full, or select_rule=gain"
        )
    return mode


@dataclass(frozen=True)
class PrunedLayer:
    """A layer that select mode stopped evaluating, and why."""

    after_docs: int  # probe docs it had been scored on
    reason: str

    def to_dict(self) -> dict:
        return {"after_docs": self.after_docs, "reason": self.reason}


@dataclass
class SweepResult:
    candidate_layers: tuple[int, ...]
    rounds: list[RoundOutcome]
    doc_scores: dict[str, dict] = field(default_factory=dict)  # variant label -> {doc: score}
    doc_stats: dict[str, dict] = field(default_factory=dict)  # variant label -> {doc: statistic}, with a statistic
    docs_computed: int = 0  # (variant, doc) pairs run on the model, every process's summed
    docs_reused: int = 0  # pairs read back from the store, every process's summed
    seconds: float = 0.0
    mode: str = "full"
    pruned: list[dict[int, PrunedLayer]] = field(default_factory=list)  # per round (select mode)
    replay: dict = field(default_factory=dict)  # prefix replay's work counters, when it was on
    engine: dict = field(default_factory=dict)  # batched or sequential, why, and its self-check (SweepEngine)
    probe_rounds: list[ProbeRound] = field(default_factory=list)  # each round's units and why it was drawn
    stopped: str = ""  # why the rounds ended
    screen: list[dict] = field(
        default_factory=list
    )  # per screened round (screen mode): estimates, exact layers, spearman

    @property
    def final(self) -> RoundOutcome:
        return self.rounds[-1]

    @property
    def selected(self) -> int | None:
        return self.final.selected

    def pruned_by_round(self) -> list[dict[int, PrunedLayer]]:
        """One {layer: PrunedLayer} per round (empty where nothing was pruned)."""
        return [self.pruned[i] if i < len(self.pruned) else {} for i in range(len(self.rounds))]


class LayerPruner:
    """Exact pruning for the gain rule (rules.decide_round: the highest mean probe score wins,
    ties go to the lowest layer, and it is selected only if its gain exceeds the threshold).

    Per-doc scores lie in [0, 1], so a layer's final mean lies between its mean with the unseen
    docs scored 0 and with them scored 1. Both bounds are computed with rules.mean over the probe
    docs in probe order, the very arithmetic of the final decision; float addition is monotone, so
    they bound the final value exactly, rounding included. A layer is dropped when
      - its upper bound minus the baseline cannot exceed the threshold, or
      - another live layer's lower bound beats its upper bound, or equals it and is a lower layer.
    The selected layer is never dropped (it has the best final score, strictly better than every
    lower layer, and a gain over the threshold), so deciding among the fully scored survivors gives
    the full sweep's selection.
    """

    def __init__(self, probe: Sequence[Hashable], layers: Sequence[int], baseline: float, threshold: float):
        self.probe = list(probe)
        self.layers = list(layers)
        self.baseline = baseline
        self.threshold = threshold
        self.scores: dict[int, dict] = {layer: {} for layer in layers}
        self.pruned: dict[int, PrunedLayer] = {}

    def alive(self) -> list[int]:
        return [layer for layer in self.layers if layer not in self.pruned]

    def bound(self, layer: int, unseen: float) -> float:
        seen = self.scores[layer]
        return mean([seen.get(doc, unseen) for doc in self.probe])

    def observe(self, layer_scores: Mapping[int, Mapping[Hashable, float]]) -> None:
        """Take new per-doc scores ({layer: {doc: score}}), then drop every layer that cannot win."""
        for layer, scores in layer_scores.items():
            self.scores[layer].update(scores)
        alive = self.alive()
        upper = {layer: self.bound(layer, 1.0) for layer in alive}
        lower = {layer: self.bound(layer, 0.0) for layer in alive}
        for layer in alive:
            reason = None
            if upper[layer] - self.baseline <= self.threshold:
                reason = (
                    f"cannot gain more than the threshold {self.threshold:g} "
                    f"(at most {upper[layer] - self.baseline:+.3f})"
                )
            else:
                rival = next(
                    (
                        m
                        for m in alive
                        if m != layer and (lower[m] > upper[layer] or (lower[m] == upper[layer] and m < layer))
                    ),
                    None,
                )
                if rival is not None:
                    reason = f"layer {rival} scores at least {lower[rival]:.3f}, this layer at most {upper[layer]:.3f}"
            if reason:
                self.pruned[layer] = PrunedLayer(len(self.scores[layer]), reason)


class LayerSweep:
    """Runs variants over probe docs through a ResultStore, so nothing is computed twice."""

    def __init__(
        self,
        answer: Answer,
        score: Score,
        store: ResultStore,
        *,
        mode: str = "full",
        replay: PrefixReplay | None = None,
        ranks: Ranks | None = None,
        rule: SelectionRule | None = None,
        statistic: Statistic | None = None,
        screen: Screen | None = None,
        engine: SweepEngine | None = None,
    ):
        self.rule = rule or make_rule("gain")
        if self.rule.stat != "score" and statistic is None:
            raise SweepModeError(
                f"select_stat={self.rule.stat} needs a per-doc statistic, and this sweep computes none"
            )
        self.statistic = statistic if self.rule.stat != "score" else None
        self.answer = answer
        self.score = score
        self.store = store
        self.mode = check_sweep_mode(mode, self.rule)
        self.replay = replay
        self.ranks = ranks or Ranks()
        self.screen = screen
        if self.mode == "screen" and screen is None:
            raise SweepModeError(
                "sweep=screen needs a gradient screen (lmms_talo.method.screen.Screen), and this sweep was given none"
            )
        self._known: dict[tuple[VariantLabel, str], tuple[float, list]] = {}  # computed or merged in this process
        self._checked_shapes: set[frozenset] = set()  # shapes of replayed passes compared with a full pass
        self.engine = engine or SweepEngine(False, "no engine was chosen: one doc per call")
        self._holding = False  # a held block keeps replay's records across several _docs calls
        self._recorded: tuple | None = None  # the docs whose base pass replay's records hold
        self._batch_checked = False  # the batched engine's self-check ran (once per sweep)
        self._stale: set[tuple[VariantLabel, str]] = set()  # batched results to recompute after a fallback

    # --- one (variant, doc) at a time ---

    def record(self, label: VariantLabel, doc: Hashable) -> tuple[float, list] | None:
        """(score, responses) of a variant on a doc, computed here, merged from a rank or stored; None
        for a batched result the engine's fallback has put aside (it is computed again, and overwritten)."""
        if (label, str(doc)) in self._stale:
            return None
        return self._known.get((label, str(doc))) or self.store.get(label, doc)

    def _remember(self, label: VariantLabel, doc: Hashable, score: float, responses: list, result: SweepResult) -> None:
        self._known[(label, str(doc))] = (score, responses)
        result.doc_scores.setdefault(label, {})[str(doc)] = score
        if self.statistic is not None:
            result.doc_stats.setdefault(label, {})[str(doc)] = self.statistic(doc, responses)

    def paired_statistic(self, reference: VariantLabel, labels: Mapping, docs: Sequence[Hashable], result: SweepResult):
        """(reference label's, {key: label's}) statistic per doc, for the rule's paired tests; None
        when the statistic is the score itself."""
        if self.statistic is None:
            return None
        stats = result.doc_stats
        pick = lambda label: {d: stats[label][str(d)] for d in docs}
        return pick(reference), {key: pick(label) for key, label in labels.items()}

    def _run(self, knockout: Knockout | None, docs: Sequence[Hashable], replaying: bool) -> dict:
        """{doc: (score, responses)} of one variant on `docs`, in one harness call."""
        context = self.replay.variant(knockout) if replaying else contextlib.nullcontext()
        with context:
            answers = self.answer(knockout, list(docs))
        return {doc: (self.score(doc, answers[doc]), answers[doc]) for doc in docs}

    def _pass_shape(self, before: ReplayStats) -> frozenset:
        """What a replayed pass did, in kinds of model calls: a doc whose calls take another route
        (a context then continuations on its cache, a call replay could not match) is checked anew."""
        now = self.replay.stats
        on_cache = now.calls_replayed_on_cache - before.calls_replayed_on_cache
        kinds = {
            "replayed on an empty cache": now.calls_replayed - before.calls_replayed - on_cache,
            "replayed on a filled cache": on_cache,
            "computed in full (unmatched)": now.calls_unmatched - before.calls_unmatched,
        }
        return frozenset(kind for kind, count in kinds.items() if count > 0)

    def _checked_run(self, knockout: Knockout, docs: Sequence[Hashable]) -> dict:
        """Prefix replay's run-time self-check: the variant with replay and, the first time a pass of
        this shape replays anything, in full; any difference (responses, score or any call's logits,
        bit for bit) turns replay off for the rest of the run, and the full result is kept. In a sweep (one sub-task,
        one request type) every doc has the same shape as a rule: one extra full pass in all."""
        before = dataclasses.replace(self.replay.stats)
        with self.replay.logits_trace() as replayed_logits:
            replayed = self._run(knockout, docs, True)
        shape = self._pass_shape(before)
        if self.replay.stats.layers_replayed == before.layers_replayed or shape in self._checked_shapes:
            return replayed
        with self.replay.logits_trace() as full_logits:
            full = self._run(knockout, docs, False)
        self._checked_shapes.add(shape)
        self.replay.stats.checks += 1
        where = f"on probe doc(s) {', '.join(map(str, docs))}, knockout {knockout.label} with replay gave"
        why = "a transformers change replay does not follow, or a non-deterministic model"
        if not (replayed == full or repr(replayed) == repr(full)):  # repr: NaN equals NaN
            self.replay.disable(f"{where} {replayed!r:.200}, in full {full!r:.200} ({why})")
        elif replayed_logits != full_logits:
            self.replay.disable(f"{where} the same answers as in full but other logits ({why})")
        return full

    def _scores(
        self,
        knockout: Knockout | None,
        docs: Sequence[Hashable],
        result: SweepResult,
        replaying: bool = False,
        record: bool = False,
        check: bool = False,
    ) -> dict:
        """{doc: score} of one variant on `docs`: from the store, the rest in one harness call.
        `record`: the base pass under prefix replay, which runs on every doc even when stored, because
        it records what the knockouts replay. `check`: replay's self-check (`_checked_run`)."""
        label = knockout.label if knockout else BASE
        hits = {doc: self.record(label, doc) for doc in docs}
        todo = list(docs) if record else [doc for doc in docs if hits[doc] is None]
        for doc in docs:
            if doc not in todo:
                result.docs_reused += 1
                self._remember(label, doc, *hits[doc], result)
        if todo:
            outputs = self._checked_run(knockout, todo) if check else self._run(knockout, todo, replaying or record)
            for doc, (value, responses) in outputs.items():
                self._keep(label, doc, value, responses, hits[doc], result)
        return {doc: self._row(label, doc)[0] for doc in docs}

    def _keep(self, label: VariantLabel, doc: Hashable, value: float, responses: list, hit, result) -> None:
        """A computed result: stored (unless it was), remembered and counted."""
        self._stale.discard((label, str(doc)))
        result.docs_computed += 1
        if hit is None:
            self.store.put(label, doc, value, responses)
        elif hit[0] != value:
            log.warning(
                "lmms-talo: doc %s (%s) scored %s now and %s in the store: the model is not deterministic",
                doc,
                label,
                value,
                hit[0],
            )
        self._remember(label, doc, value, responses, result)

    @contextlib.contextmanager
    def _doc_records(self) -> Iterator[None]:
        """Replay's records live for the block, or for the held block around it (`_held_records`)."""
        try:
            yield
        finally:
            if self.replay is not None and not self._holding:
                self.replay.forget()
                self._recorded = None

    @contextlib.contextmanager
    def _held_records(self) -> Iterator[None]:
        """One round on the batched engine: the base pass that scores the docs also records for the
        knockouts that follow (after the self-check, and the screen's gradient pass): the base runs once."""
        outermost = not self._holding
        self._holding = True
        try:
            yield
        finally:
            if outermost:
                self._holding = False
                if self.replay is not None:
                    self.replay.forget()
                self._recorded = None

    def _chunks(self, docs: Sequence[Hashable], size: int | None = None) -> list[list]:
        """`docs` in groups of one harness call each: one doc per call on the sequential engine."""
        size = (size or len(docs) or 1) if self.engine.batched else 1
        return [list(docs[i : i + size]) for i in range(0, len(docs), size)]

    def _docs(
        self,
        docs: Sequence[Hashable],
        knockouts: Sequence[Knockout],
        result: SweepResult,
        go_on: Callable[[dict], bool] | None = None,
        record: bool = False,
    ) -> tuple[dict, dict[str, dict]]:
        """The base scores of `docs`, then (if `go_on(base)`) each knockout's {doc: score}, one harness
        call per variant over all of `docs`. Prefix replay is used when some knockout must run and it
        saves work: the base pass that records runs even when its result is known, which pays off
        only if enough layers are then replayed (`record`: record now, for knockouts run later in a
        held block). The variant of the highest layer to run goes first, through replay's self-check
        (`_checked_run`): it replays the most layers (every recorded layer output and K/V write
        below it), so it exercises the most replay, and if replay is wrong no other variant used it."""
        docs = list(docs)
        todo = [k for k in knockouts if any(self.record(k.label, doc) is None for doc in docs)]
        recorded = self._recorded == tuple(docs)  # a held base pass recorded exactly these docs' calls
        replaying = (
            self.replay is not None
            and self.replay.enabled
            and (bool(todo) or record)
            and (recorded or record or any(self.record(BASE, d) is None for d in docs) or self.replay.saves_work(todo))
        )
        checked = max(todo, key=lambda k: min(k.layers, default=0)) if replaying and todo else None
        with self._doc_records():
            base = self._scores(None, docs, result, record=replaying and not recorded)
            if replaying:
                self._recorded = tuple(docs)
            if go_on is not None and not go_on(base):
                return base, {}
            ordered = sorted(knockouts, key=lambda k: k is not checked)  # the checked variant first
            scores = {k.label: self._scores(k, docs, result, replaying, check=k is checked) for k in ordered}
            return base, {k.label: scores[k.label] for k in knockouts}

    def doc_scores(self, knockout: Knockout | None, docs: Sequence[Hashable], result: SweepResult) -> dict:
        """One variant over several docs (the multi-layer search and confirm use this)."""
        scores: dict = {}
        for chunk in self._chunks(docs):
            scores.update(self._scores(knockout, chunk, result))
        return scores

    # --- the batched engine's self-check ---

    def _check_batching(self, docs: Sequence[Hashable], layers: Sequence[int], intervention: str, result) -> bool:
        """Before the sweep computes any knockout batched: the highest layer's knockout over the first
        round's docs, batched and one doc per call, without replay; any difference in a doc's score
        (or statistic) puts this sub-task on the sequential engine (lmms_talo.method.batching), and
        the base scores computed batched so far are computed again, one doc per call. Every rank
        checks the same variant and the ranks share their verdicts, so they all switch together.
        True when the engine fell back."""
        if not self.engine.batched or self._batch_checked:
            return False  # the same on every rank
        self._batch_checked = True
        reason = None
        knockout = Knockout((max(layers),), intervention)
        docs = list(docs)
        if len(docs) > 1 and any(self.record(knockout.label, d) is None for d in docs):
            batched = self._run(knockout, docs, False)
            sequential = {}
            for doc in docs:
                sequential.update(self._run(knockout, [doc], False))
            self.engine.check, reason = compare_engines(knockout.label, batched, sequential, self.statistic)
            kept = sequential if reason else batched
            for doc, (value, responses) in kept.items():
                self._keep(knockout.label, doc, value, responses, self.record(knockout.label, doc), result)
        reasons = [r for r in self.ranks.all_gather(reason) if r]
        if not reasons:
            return False
        self.engine.fall_back(reasons[0])
        self._stale = {key for key in self._known if key[0] == BASE}
        return True

    # --- rounds ---

    def _merge(self, base: dict, rows: dict[str, dict], result: SweepResult) -> dict[str, dict]:
        """All ranks' rows ({label: {doc: (score, responses)}}); the ranks must agree on the base."""
        if not self.ranks.distributed:
            return rows
        bases = self.ranks.all_gather(base)
        if any(b != bases[0] for b in bases):
            raise RankMismatchError("the ranks scored the base model differently on the probe docs")
        merged = {}
        for part in self.ranks.all_gather(rows):
            for label, docs in part.items():
                merged.setdefault(label, {}).update(docs)
        for label, docs in merged.items():
            for doc, (value, responses) in docs.items():
                self._remember(label, doc, value, responses, result)
        return merged

    def _row(self, label: VariantLabel, doc: Hashable) -> tuple[float, list]:
        return self._known[(label, str(doc))]

    def _full_round(
        self, probe, layers, intervention, result, skip_if_perfect: bool, stream: str, family: int | None = None
    ) -> tuple[RoundOutcome, dict]:
        """Every layer (this rank's share) on every probe doc: one call per variant over the round's
        docs on the batched engine, doc by doc on the sequential one. With `skip_if_perfect`, a
        perfect baseline skips the layers."""
        knockouts = [Knockout((layer,), intervention) for layer in self.ranks.share(layers)]
        rows_of = self._batched_rows if self.engine.batched else self._sequential_rows
        base, rows = rows_of(probe, layers, knockouts, intervention, result, skip_if_perfect)
        rows = self._merge(base, rows, result)
        if skip_if_perfect and baseline_is_perfect(mean([base[d] for d in probe])):
            return self.rule.decide(probe, base, {}, stream), {}
        layer_scores = {layer: {d: rows[layer_label(layer)][d][0] for d in probe} for layer in layers}
        statistic = self.paired_statistic(BASE, {layer: layer_label(layer) for layer in layers}, probe, result)
        return self.rule.decide(probe, base, layer_scores, stream, statistic, family), {}

    def _batched_rows(self, probe, layers, knockouts, intervention, result, skip_if_perfect):
        """The base over the round's docs in one call (recording for replay); unless a perfect
        baseline skips the layers, the engine's self-check, then each knockout in one call."""
        with self._held_records():
            base = self._base_scores(probe, result, record=True)
            if skip_if_perfect and all(value >= 1.0 for value in base.values()):
                return base, {k.label: {} for k in knockouts}
            if not self._check_batching(probe, layers, intervention, result):
                scores = self._docs(probe, knockouts, result)[1]
                return base, {label: {doc: self._row(label, doc) for doc in docs} for label, docs in scores.items()}
        return self._sequential_rows(probe, layers, knockouts, intervention, result, skip_if_perfect)

    def _sequential_rows(self, probe, layers, knockouts, intervention, result, skip_if_perfect):
        """Doc by doc. While every doc so far has a perfect base score the baseline may be perfect,
        which skips the layers: those docs' variants wait until a doc with an imperfect base score appears."""
        base: dict = {}
        rows: dict[str, dict] = {k.label: {} for k in knockouts}
        waiting = skip_if_perfect
        deferred: list = []

        def keep(doc, scores):
            for label in scores:
                rows[label][doc] = self._row(label, doc)

        for doc in probe:
            # go_on is called inside this _docs call only: bind this iteration's `waiting`
            go_on = lambda b, waiting=waiting: not (waiting and all(v >= 1.0 for v in b.values()))
            doc_base, scores = self._docs([doc], knockouts, result, go_on=go_on)
            base[doc] = doc_base[doc]
            if waiting and base[doc] >= 1.0:
                deferred.append(doc)
                continue
            keep(doc, scores)
            if waiting:
                waiting = False
                for earlier in deferred:
                    keep(earlier, self._docs([earlier], knockouts, result)[1])
        return base, rows

    def _base_scores(self, probe, result, record: bool = False) -> dict:
        base: dict = {}
        for chunk in self._chunks(probe):
            base.update(self._docs(chunk, [], result, record=record)[0])
        self._merge(base, {}, result)
        return base

    def _select_round(
        self, probe, layers, intervention, result, skip_if_perfect: bool, stream: str
    ) -> tuple[RoundOutcome, dict]:
        """Base scores first (the pruning bounds need the baseline), then the layers doc by doc (a
        chunk of docs_per_call docs on the batched engine), docs with the lowest base score first:
        knockouts tend to miss them too, so layers that cannot win are dropped early. Only the gain
        rule is served (see __init__)."""
        threshold = self.rule.threshold
        base = self._base_scores(probe, result)
        if skip_if_perfect and baseline_is_perfect(mean([base[d] for d in probe])):
            return self.rule.decide(probe, base, {}, stream), {}
        if self._check_batching(probe, layers, intervention, result):
            base = self._base_scores(probe, result)  # one doc per call now
            if skip_if_perfect and baseline_is_perfect(mean([base[d] for d in probe])):
                return self.rule.decide(probe, base, {}, stream), {}
        pruner = LayerPruner(probe, layers, mean([base[d] for d in probe]), threshold)
        for chunk in self._chunks(sorted(probe, key=lambda d: base[d]), self.engine.docs_per_call):
            alive = pruner.alive()
            if not alive:
                break
            knockouts = [Knockout((layer,), intervention) for layer in self.ranks.share(alive)]
            self._docs(chunk, knockouts, result)
            rows = {k.label: {doc: self._row(k.label, doc) for doc in chunk} for k in knockouts}
            merged = self._merge(base, rows, result)
            pruner.observe({int(label): {d: v[0] for d, v in docs.items()} for label, docs in merged.items()})
        survivors = pruner.alive()
        if not survivors:
            reason = f"no layer can gain more than the threshold {threshold:g}: every candidate was pruned"
            return RoundOutcome(tuple(probe), mean([base[d] for d in probe]), {}, {}, None, reason), pruner.pruned
        outcome = self.rule.decide(
            probe, base, {layer: pruner.scores[layer] for layer in survivors}, stream, family=len(layers)
        )
        return outcome, pruner.pruned

    def _screen_estimates(self, probe, layers, intervention) -> dict:
        """{doc: (S, {layer: estimated change of S})} for the probe docs, from the store (label
        "screen") or computed (each rank a share of the docs, then merged), persisted as each lands."""
        estimates, todo = {}, []
        for doc in probe:
            hit = self.record(SCREEN, doc)
            stored = hit[1][0] if hit else {}
            if all(str(layer) in stored for layer in layers):
                estimates[doc] = (hit[0], {layer: stored[str(layer)] for layer in layers})
            else:
                todo.append(doc)
        mine = {}
        for doc in self.ranks.share(todo):
            with self._doc_records():
                value, effects = self.screen.effects(doc, self._row(BASE, doc)[1], layers, intervention)
            self.store.put(SCREEN, doc, value, [{str(layer): e for layer, e in effects.items()}])
            mine[doc] = (value, effects)
        for part in self.ranks.all_gather(mine):
            estimates.update(part)
        return estimates

    def _screen_round(
        self, probe, layers, intervention, result, skip_if_perfect: bool, stream: str
    ) -> tuple[RoundOutcome, dict]:
        """Base scores, the screen's estimates, then the full round over the chosen layers only:
        the rule decides among exactly scored layers. With screen_top >= the number of layers this is
        the full round itself. On the batched engine the base pass that scores the docs also records
        for replay (held through the gradient pass), so the base runs once."""
        held = self._held_records() if self.engine.batched else contextlib.nullcontext()
        with held:
            return self._screened_round(probe, layers, intervention, result, skip_if_perfect, stream)

    def _screened_round(self, probe, layers, intervention, result, skip_if_perfect, stream):
        base = self._base_scores(probe, result, record=self.engine.batched)
        baseline = mean([base[d] for d in probe])
        if skip_if_perfect and baseline_is_perfect(baseline):
            return self.rule.decide(probe, base, {}, stream), {}
        screened = self._screen_estimates(probe, layers, intervention)
        estimates = {d: effects for d, (_, effects) in screened.items()}
        totals = {layer: sum(estimates[d][layer] for d in probe) for layer in layers}
        predicted = {
            layer: score - baseline
            for layer, score in predicted_scores(
                {d: base[d] for d in probe}, {d: screened[d][0] for d in probe}, estimates, layers
            ).items()
        }
        top, drawn = chosen_layers(
            predicted, totals, self.screen.top, self.screen.others, f"{self.screen.seed}:{stream}:{len(result.rounds)}"
        )
        exact = sorted(top + drawn)
        outcome, pruned = self._full_round(probe, exact, intervention, result, False, stream, family=len(layers))
        gains = outcome.gains
        result.screen.append(
            {
                "round": len(result.rounds),
                "estimates": {str(layer): totals[layer] for layer in layers},
                "predicted_gains": {str(layer): predicted[layer] for layer in layers},
                "top": top,
                "random": drawn,
                "exact_gains": {str(layer): gains[layer] for layer in exact},
                "spearman": spearman([predicted[layer] for layer in exact], [gains[layer] for layer in exact]),
                **self.screen.packing.to_report(),
            }
        )
        return outcome, pruned

    def _sum_over_ranks(self, result: SweepResult) -> None:
        """The work counters of every process, summed (each rank ran a share of the layers)."""
        parts = self.ranks.all_gather((result.docs_computed, result.docs_reused, result.replay))
        result.docs_computed = sum(computed for computed, _, _ in parts)
        result.docs_reused = sum(reused for _, reused, _ in parts)
        stats = [replay for _, _, replay in parts if replay]
        if len(stats) > 1:
            statuses = list(dict.fromkeys(s["status"] for s in stats))
            result.replay = {
                **{key: sum(s[key] for s in stats) for key in stats[0] if key != "status"},
                "status": statuses[0]
                if len(statuses) == 1
                else "; ".join(f"rank {rank}: {s['status']}" for rank, s in enumerate(stats)),
            }

    def run(
        self,
        split: ProbeSplit,
        candidate_layers: Sequence[int],
        intervention: str,
        max_redraws: int = MAX_REDRAWS,
    ) -> SweepResult:
        """Probe rounds as the authors' protocol draws them (lmms_talo.method.probe_split) until a layer clears
        the threshold, or no redraw is left; the rule decides each round."""
        threshold = self.rule.threshold
        started = time.perf_counter()
        result = SweepResult(tuple(candidate_layers), [], mode=self.mode)
        play = {"select": self._select_round, "screen": self._screen_round}.get(self.mode, self._full_round)
        replaying = self.replay.installed() if self.replay is not None else contextlib.nullcontext()
        with replaying:
            self.ranks.barrier()  # every rank has read the store before any rank appends to it
            probe_round = split.first_round()
            while True:
                result.probe_rounds.append(probe_round)
                blocker = split.no_redraw(result.probe_rounds, max_redraws)
                # Round 0 with a perfect baseline is redrawn unswept when a redraw is possible (the
                # authors); otherwise a perfect baseline skips the layers only where no layer could
                # clear the threshold anyway (scores lie in [0, 1]).
                redraw_if_perfect = probe_round.index == 0 and blocker is None
                outcome, pruned = play(
                    list(probe_round.docs),
                    list(candidate_layers),
                    intervention,
                    result,
                    skip_if_perfect=redraw_if_perfect or threshold >= 0,
                    stream=split.name,
                )
                result.rounds.append(outcome)
                result.pruned.append(pruned)
                if outcome.cleared:
                    result.stopped = (
                        f"round {probe_round.index} selected layer {outcome.selected}"
                        if outcome.selected is not None
                        else f"round {probe_round.index}: a layer's gain cleared the threshold; {outcome.reason}"
                    )
                    break
                if blocker is not None:
                    result.stopped = f"no layer selected; no redraw: {blocker}"
                    break
                perfect = redraw_if_perfect and baseline_is_perfect(outcome.baseline)
                probe_round = split.redraw(result.probe_rounds, perfect)
        if self.replay is not None:
            result.replay = dataclasses.asdict(self.replay.stats)
        result.engine = self.engine.to_report()
        self._sum_over_ranks(result)
        result.doc_scores = _canonical(result, [r.docs for r in result.probe_rounds])
        result.seconds = time.perf_counter() - started
        return result


def _canonical(result: SweepResult, probes: list) -> dict:
    """Per-doc scores in a fixed order (base, then candidate layers; docs as first probed), whatever
    order the docs were run in and whichever rank ran them."""
    labels = [BASE] + [layer_label(layer) for layer in result.candidate_layers]
    labels += [label for label in result.doc_scores if label not in labels]
    docs = list(dict.fromkeys(str(d) for probe in probes for d in probe))
    ordered = {}
    for label in labels:
        scores = result.doc_scores.get(label)
        if scores:
            ordered[label] = {d: scores[d] for d in docs if d in scores}
            ordered[label].update({d: s for d, s in scores.items() if d not in ordered[label]})
    return ordered
