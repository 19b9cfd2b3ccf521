"""TaLo's own model args: parsed, validated and removed before the base model class sees the rest."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lmms_talo.method.interventions import check_intervention
from lmms_talo.method.probe_split import MAX_REDRAWS
from lmms_talo.method.rules import RuleError, SelectionRule, make_rule
from lmms_talo.method.sweep import SweepModeError, check_sweep_mode


class TaloArgumentError(ValueError):
    """A TaLo model arg has a bad value."""


GRANULARITIES = (
    "auto",
    "task",
    "category",
)  # auto: category for the benchmarks lmms_talo.method.subtasks knows, task otherwise
PROBE_PROTOCOLS = ("authors",)  # the rounds of the authors' released code: see lmms_talo.method.probe_split
REMOVED_ARGS = {
    "resample_rounds": (
        "resample_rounds was removed: the probe rounds now follow the authors' protocol (redraws from the "
        "pool docs not used yet, at most 5). Use max_redraws=N for at most N redraws (max_redraws=0: one round)"
    ),
}


def parse_layers(spec: Any) -> tuple[int, ...] | None:
    """'1-5', '1..5', '3;7;9', '2-4;8' (';' or '|' between items: ',' separates model args)."""
    if spec is None or spec == "" or spec == "auto":
        return None
    if isinstance(spec, float) and spec.is_integer():  # the harness's arg parser reads "-1" as -1.0
        spec = int(spec)
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, (list, tuple)):
        return tuple(int(x) for x in spec)
    layers: list[int] = []
    for part in str(spec).replace("|", ";").replace(" ", ";").split(";"):
        if not part:
            continue
        bounds = part.split("..") if ".." in part else part.split("-") if "-" in part[1:] else [part]
        try:
            numbers = [int(b) for b in bounds]
        except ValueError as exc:
            raise TaloArgumentError(
                f"cannot parse layers={spec!r}: use a range like 1-31, a list like 3;7;9, or both (2-4;8)"
            ) from exc
        if len(numbers) == 2 and numbers[1] < numbers[0]:
            raise TaloArgumentError(f"layers range {part!r} is empty (end before start)")
        layers.extend(range(numbers[0], numbers[-1] + 1))
    if not layers:
        raise TaloArgumentError(f"layers={spec!r} names no layer")
    return tuple(dict.fromkeys(layers))


def parse_bool(value: Any) -> bool:
    """A boolean model arg: true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true or false), got {value!r}")


@dataclass(frozen=True)
class TaloConfig:
    probe_shots: int = 10
    intervention: str = "zero"
    layers: tuple[int, ...] | None = None  # None: 1 .. L-1
    threshold: float = 0.0
    granularity: str = "auto"
    category_field: str | None = None
    stratify_field: str | None = None
    seed: int = 0
    probe_protocol: str = "authors"
    max_redraws: int = MAX_REDRAWS  # the authors' limit: 5 redraws, 6 rounds
    force_layer: int | None = None
    report: str | None = None
    compare_base: bool = False
    state_dir: str | None = None
    select_rule: str = "gain"  # gain (the paper's) | sign_test | maxt | confirm: see lmms_talo.method.rules
    select_alpha: float = 0.05
    select_resamples: int = 1000
    select_stat: str = (
        "score"  # score | margin (likelihood-scored tasks): the rules' paired statistic (lmms_talo.method.rules.STATS)
    )
    select_base_rule: str = "gain"  # select_rule=confirm: the rule that decides the probe rounds
    max_layers: int = 1  # > 1: greedy multi-layer search on top of the selected layer (lmms_talo.method.greedy_search)
    transfer: bool = False  # also score each sub-task's test docs under the other sub-tasks' selections
    test_all_layers: bool = False  # also score the test docs under every candidate layer
    # full (the whole interaction vector) | select (exact pruning) | screen (gradient screen):
    # see lmms_talo.method.sweep
    sweep: str = "full"
    screen_top: int = 3  # sweep=screen: the layers with the highest estimated gain, run exactly
    screen_random: int = 0  # sweep=screen: further layers drawn with the seed, run exactly (a diagnostic)
    # many probe docs per model call, through the harness's own batching (lmms_talo.method.sweep);
    # false: one doc per call, the sequential engine
    sweep_batch: bool = True
    replay: bool = True  # prefix replay of the layers below each knockout: see lmms_talo.method.prefix_replay
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_intervention(self.intervention)
        for name in ("threshold", "select_alpha"):
            if not math.isfinite(getattr(self, name)):
                raise TaloArgumentError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.state_dir == "":
            raise TaloArgumentError(
                "state_dir is empty: give the probe store's folder, leave state_dir out for the default "
                "(~/.cache/lmms_talo/probe_results), or set state_dir=none to keep no store"
            )
        if self.probe_shots < 1:
            raise TaloArgumentError(f"probe_shots must be at least 1, got {self.probe_shots}")
        if self.granularity not in GRANULARITIES:
            raise TaloArgumentError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.probe_protocol not in PROBE_PROTOCOLS:
            raise TaloArgumentError(
                f"probe_protocol={self.probe_protocol!r} is unknown: the one protocol is authors (the rounds of the "
                f"authors' released code); max_redraws bounds its redraws"
            )
        if self.max_redraws < 0:
            raise TaloArgumentError(
                f"max_redraws must be at least 0 (0: one round; the authors: {MAX_REDRAWS}), got {self.max_redraws}"
            )
        if self.layers is not None and len(self.layers) == 0:
            raise TaloArgumentError("layers is empty: give at least one candidate layer, or leave it out for 1..L-1")
        if self.max_layers < 1:
            raise TaloArgumentError(f"max_layers must be at least 1, got {self.max_layers}")
        if self.screen_top < 1 or self.screen_random < 0:
            raise TaloArgumentError(
                f"screen_top must be at least 1 and screen_random at least 0 (got {self.screen_top} and "
                f"{self.screen_random}): the selected layer is one of the exactly run ones"
            )
        try:
            check_sweep_mode(self.sweep, self.selection_rule())
        except (RuleError, SweepModeError) as exc:
            raise TaloArgumentError(str(exc)) from exc

    def selection_rule(self) -> SelectionRule:
        confirming = {"base_rule": self.select_base_rule} if self.select_rule == "confirm" else {}
        if not confirming and self.select_base_rule != "gain":
            raise RuleError(
                f"select_base_rule={self.select_base_rule} is only read by select_rule=confirm: "
                "drop it, or add select_rule=confirm"
            )
        return make_rule(
            self.select_rule,
            threshold=self.threshold,
            alpha=self.select_alpha,
            resamples=self.select_resamples,
            seed=self.seed,
            stat=self.select_stat,
            **confirming,
        )

    @classmethod
    def pop_from(cls, kwargs: dict) -> TaloConfig:
        """Take TaLo's args out of `kwargs` (a model-args dict), leaving the base model's args."""
        converters = {
            "probe_shots": int,
            "intervention": str,
            "layers": parse_layers,
            "threshold": float,
            "granularity": str,
            "category_field": lambda v: str(v) or None,
            "stratify_field": lambda v: str(v) or None,
            "seed": int,
            "probe_protocol": str,
            "max_redraws": int,
            "force_layer": lambda v: None if v in (None, "", "none") else int(v),
            "report": str,
            "compare_base": parse_bool,
            "state_dir": str,
            "select_rule": str,
            "select_alpha": float,
            "select_resamples": int,
            "select_stat": str,
            "select_base_rule": str,
            "max_layers": int,
            "transfer": parse_bool,
            "test_all_layers": parse_bool,
            "sweep": str,
            "screen_top": int,
            "screen_random": int,
            "sweep_batch": parse_bool,
            "replay": parse_bool,
        }
        for name, message in REMOVED_ARGS.items():
            if name in kwargs:
                raise TaloArgumentError(message)
        values = {}
        for name, convert in converters.items():
            if name in kwargs:
                raw = kwargs.pop(name)
                try:
                    values[name] = convert(raw)
                except TaloArgumentError:
                    raise
                except (TypeError, ValueError) as exc:
                    raise TaloArgumentError(f"bad value for model arg {name}={raw!r}: {exc}") from exc
        if values.get("transfer") or values.get("test_all_layers"):
            if values.get("compare_base") is False:
                raise TaloArgumentError(
                    "transfer and test_all_layers report gains over the base model's test scores: "
                    "drop compare_base=false"
                )
            values["compare_base"] = True
        return cls(**values)

    @classmethod
    def arg_names(cls) -> set[str]:
        """The model-arg names TaLo takes for itself."""
        return {f.name for f in dataclasses.fields(cls) if f.name != "extra"}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data
