"""A grid's `[tune]` table: the same hyperparameter search for every strategy, chosen on
validation, the chosen setting re-run over seeds and reported on test.

    [tune]
    lr = { log = [1e-5, 1e-1] }   # a range (log-uniform); { range = [a, b] } is uniform
    weight_decay = [0.0, 1e-4]    # a list: these values (Optuna's grid sampler when every
                                  # searched field is a list, else TPE)
    trials = 8                    # the budget, the same for every strategy of the grid
                                  # (default, when only lists are searched: the grid's size)
    metric = "val_acc"            # what chooses; a test metric is refused
    final_seeds = [0, 1, 2]       # the chosen setting, re-run over these seeds
    refit = "train"               # or "train+val": retrain the choice on both parts (VTAB)
    seed = 0                      # the study's seed: the same trials in the same order
    batch = 8                     # trials asked at once per study (default: all of them)
    pruner = "median"             # stop a trial whose val_acc is below the median of the
    prune_after = 1               # finished trials' at the same epoch (after this many)

    [tune.partial]                # a strategy's own parameters, searched for it alone
    depth = [1, 2, 3]

Every cell of the grid's axes becomes one study (its framework, backbone, weights,
strategy, dataset...): `trials` trials, each an ordinary cell (role `trial`, seed
`final_seeds[0]`), then the best trial by `metric` re-run as one cell per final seed (role
`final`). The search space is declared here once; bench/run/tune.py runs the studies.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from strategies import registry
from strategies.constraint import Constraint

SEARCHABLE = ("lr", "weight_decay")  # RunSpec fields a [tune] table may search
METRICS = {"val_acc": "maximize", "best_val_acc": "maximize", "val_loss": "minimize"}
REFITS = ("train", "train+val")
PRUNERS = ("none", "median")
SETTINGS = {
    "trials": Constraint(int, minimum=1, help="trials per study: the same for every strategy"),
    "metric": Constraint(str, choices=tuple(METRICS), help="the validation metric that chooses"),
    "final_seeds": None,  # a list of seeds, checked in _seeds
    "refit": Constraint(str, choices=REFITS, help="what the chosen setting is retrained on"),
    "seed": Constraint(int, minimum=0, help="the study's seed (its sampler's)"),
    "batch": Constraint(int, minimum=1, help="trials asked at once per study"),
    "pruner": Constraint(str, choices=PRUNERS, help="early stopping of poor trials"),
    "prune_after": Constraint(int, minimum=1, help="epochs before a trial may be pruned"),
}


class TuneError(ValueError):
    """A [tune] table that cannot be searched; the message names the field."""


@dataclass(frozen=True)
class Space:
    """One searched field: a list of values, or a range (low, high), log-scaled or not."""

    values: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_list(self) -> bool:
        return bool(self.values)

    def distribution(self):
        """The Optuna distribution of this field (optuna imported here: grids load without
        it)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.is_list:
            return CategoricalDistribution(list(self.values))
        if isinstance(self.low, int) and isinstance(self.high, int) and not self.log:
            return IntDistribution(self.low, self.high)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.is_list:
            return "{" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v)
                                   for v in self.values) + "}"
        return f"{'log' if self.log else 'uniform'}[{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Tune:
    """A validated [tune] table."""

    space: dict[str, Space]  # RunSpec field -> its search
    strategy_space: dict[str, dict[str, Space]] = field(default_factory=dict)
    trials: int = 8
    metric: str = "val_acc"
    final_seeds: tuple[int, ...] = (0, 1, 2)
    refit: str = "train"
    seed: int = 0
    batch: int | None = None
    pruner: str = "none"
    prune_after: int = 1

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    @property
    def trial_seed(self) -> int:
        return self.final_seeds[0]

    @property
    def round_size(self) -> int:
        return min(self.batch or self.trials, self.trials)

    def space_for(self, strategy: str) -> dict[str, Space]:
        """The searched fields of one strategy's study: the shared ones and its own
        parameters as `strategy.<name>`."""
        own = self.strategy_space.get(strategy, {})
        return {**self.space, **{f"strategy.{k}": v for k, v in own.items()}}

    def sampler_kind(self, strategy: str) -> str:
        """`grid` when every searched field of the study is a list, else `tpe`."""
        return "grid" if all(s.is_list for s in self.space_for(strategy).values()) else "tpe"

    def describe(self) -> str:
        """The protocol in a phrase (the report's methods paragraph, the parent run)."""
        searched = ", ".join(f"{k} {v.describe()}" for k, v in self.space.items())
        own = "; ".join(f"{s}: " + ", ".join(f"{k} {v.describe()}" for k, v in sp.items())
                        for s, sp in self.strategy_space.items())
        return (f"{self.trials} trials per strategy ({searched}" + (f"; {own}" if own else "")
                + f"), chosen on {self.metric}, refit on {self.refit}, re-run over seeds "
                + ", ".join(map(str, self.final_seeds))
                + (f", median pruning after epoch {self.prune_after}"
                   if self.pruner == "median" else ""))


def parse(table: object, axes: dict, strategies: list[str], has_val: bool) -> Tune:
    """A [tune] table checked whole: every problem is collected, then one TuneError names
    each field, what was wrong and what is allowed. `axes`: the grid's axes (a field searched
    and also swept is refused); `strategies`: the grid's; `has_val`: whether every dataset
    of the grid has a validation part (refit = "train+val" needs one)."""
    if not isinstance(table, dict):
        raise TuneError(f"tune: expected a table, got {table!r}")
    problems: list[str] = []
    space: dict[str, Space] = {}
    strategy_space: dict[str, dict[str, Space]] = {}
    settings: dict[str, object] = {}
    for key, value in table.items():
        where = f"tune.{key}"
        if key in SETTINGS:
            settings[key] = _setting(key, value, where, problems)
        elif key in SEARCHABLE:
            space[key] = _space(value, where, problems)
            _field_rule(key, space[key], where, problems)
            if key in axes:
                problems.append(f"{where}: {key} is searched and also an axis (axes.{key}); "
                                f"search it or sweep it, not both")
        elif key in registry.STRATEGIES:
            strategy_space[key] = _strategy_space(key, value, strategies, problems)
        else:
            problems.append(f"{where}: unknown field; allowed: searched fields "
                            f"{', '.join(SEARCHABLE)}, a strategy's own table "
                            f"([tune.<strategy>]), settings {', '.join(SETTINGS)}")
    if "seed" in axes:
        problems.append("axes.seed: with [tune] the seeds are tune.final_seeds (the trials "
                        "use the first); remove the seed axis")
    if not space and not strategy_space:
        problems.append(f"tune: nothing is searched; add a field ({', '.join(SEARCHABLE)}) "
                        f"or a strategy's table")
    if settings.get("refit") == "train+val" and not has_val:
        problems.append("tune.refit: 'train+val' needs a validation part; a dataset of this "
                        "grid has none (its card's val fraction is 0)")
    if problems:
        raise TuneError("; ".join(problems))
    settings = {k: v for k, v in settings.items() if v is not None}
    if "final_seeds" in settings:
        settings["final_seeds"] = tuple(settings["final_seeds"])
    out = Tune(space=space, strategy_space=strategy_space, **settings)
    trials = _budget(out, strategies, table.get("trials"))
    return dataclasses.replace(out, trials=trials)


def _budget(t: Tune, strategies: list[str], given: object) -> int:
    """The trials per study: as given, or, when every study searches lists only, the
    smallest study's grid (so every strategy gets the same budget). A grid study cannot
    have more trials than points (Optuna's grid sampler stops there)."""
    sizes = {s: math.prod(len(v.values) for v in t.space_for(s).values())
             for s in strategies if t.sampler_kind(s) == "grid"}
    if given is None:
        if len(sizes) < len(strategies):
            raise TuneError("tune.trials: required when a searched field is a range (the "
                            "same number of trials for every strategy)")
        return min(sizes.values())
    small = {s: n for s, n in sizes.items() if n < given}
    if small:
        raise TuneError(f"tune.trials = {given}: more than the points of "
                        + ", ".join(f"{s}'s grid ({n})" for s, n in small.items())
                        + "; allowed: trials <= the smallest grid, or search a range")
    return given


def _setting(key: str, value: object, where: str, problems: list[str]) -> object:
    if key == "final_seeds":
        return _seeds(value, where, problems)
    if key == "metric" and isinstance(value, str) and "test" in value:
        problems.append(f"{where} = {value!r}: a test metric never selects anything; "
                        f"allowed: {', '.join(METRICS)}")
        return None
    msg = SETTINGS[key].check(value)
    if msg:
        problems.append(f"{where} = {value!r}: {msg}")
        return None
    return value


def _seeds(value: object, where: str, problems: list[str]) -> list[int] | None:
    ok = (isinstance(value, list) and value
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
          and len(set(value)) == len(value))
    if not ok:
        problems.append(f"{where} = {value!r}: allowed: a non-empty list of distinct seeds "
                        f">= 0, e.g. [0, 1, 2]")
        return None
    return value


def _space(value: object, where: str, problems: list[str]) -> Space:
    """A list of values, or { log = [low, high] } / { range = [low, high] }."""
    if isinstance(value, list):
        if not value or not all(_number(v) for v in value):
            problems.append(f"{where} = {value!r}: allowed: a non-empty list of numbers, or "
                            f"{{ log = [low, high] }} / {{ range = [low, high] }}")
            return Space()
        return Space(values=tuple(dict.fromkeys(value)))
    if isinstance(value, dict) and len(value) == 1 and set(value) <= {"log", "range"}:
        (kind, bounds), = value.items()
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(map(_number, bounds))):
            problems.append(f"{where}.{kind} = {bounds!r}: allowed: [low, high], two numbers")
            return Space()
        low, high = bounds
        if low >= high:
            problems.append(f"{where}.{kind} = {bounds!r}: empty or inverted range; allowed: "
                            f"low < high")
        if kind == "log" and low <= 0:
            problems.append(f"{where}.log = {bounds!r}: a log range needs bounds > 0")
        return Space(low=low, high=high, log=kind == "log")
    problems.append(f"{where} = {value!r}: allowed: a list of values, {{ log = [low, high] }} "
                    f"or {{ range = [low, high] }}")
    return Space()


def _field_rule(name: str, space: Space, where: str, problems: list[str]) -> None:
    """A searched RunSpec field's values (a list's, a range's bounds) keep the field's own
    rule: lr = [0.0] would run trials at lr 0."""
    from bench.config.spec import CONSTRAINTS

    rule = CONSTRAINTS[name].with_kind(float)
    for v in space.values or ((space.low, space.high) if space.low is not None else ()):
        if rule.problem(v) is not None:
            problems.append(f"{where}: the value {v!r} {rule.check(v)}")
            return


def _strategy_space(name: str, table: object, strategies: list[str],
                    problems: list[str]) -> dict[str, Space]:
    where = f"tune.{name}"
    if name not in strategies:
        problems.append(f"{where}: strategy {name!r} is not in this grid's axes.strategy "
                        f"({', '.join(strategies)})")
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table of the strategy's parameters")
        return {}
    params = {p.name: p for p in registry.get(name).params}
    out = {}
    for key, value in table.items():
        if key not in params:
            problems.append(f"{where}.{key}: {name} has no parameter {key!r}; allowed: "
                            f"{', '.join(params) or 'none'}")
            continue
        out[key] = _space(value, f"{where}.{key}", problems)
        # depth and block sets depend on the backbone: the grid checks them per cell
        rule = params[key].constraint
        for v in (out[key].values or (out[key].low, out[key].high)) if rule else ():
            msg = v is not None and rule.check(v)
            if msg:
                problems.append(f"{where}.{key} = {v!r}: {msg}")
    return out


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
