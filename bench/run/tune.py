"""The tuning loop of a grid with a [tune] table (bench/config/tune.py): one Optuna study
per cell of the grid's axes, each trial an ordinary cell, then the chosen setting re-run
over the final seeds.

    round 0: every study asks `batch` trials -> trial cells -> run (claimed, skipped when
             finished, in parallel slots or on Ray, as any cell) -> told in trial order
    round 1: ... until every study has told `trials` trials (finished, pruned or failed
             alike count against the budget)
    finals:  each study's best trial by its validation metric -> one cell per final seed

Where the study lives: nowhere but in the tracking store. A study is rebuilt on every
invocation by replaying it: the same seeded sampler is asked the same rounds and told the
same results, read back from the trial cells' MLflow runs (found by spec hash, as finished
cells are). Asking in rounds and telling in trial order makes the proposals a function of
the grid and the results only, so a study killed mid-round resumes with no trial lost or
run twice, two runners on one grid propose the same trials (and the claims let each run
once), and the choice is the same. The sampler's random state needs no file of its own.
Test metrics are never read here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import tracking
from bench.config.grid import Grid
from bench.config.spec import RunSpec
from bench.config.tune import Tune

TRIAL, FINAL = "trial", "final"
PRUNED = "pruned"


@dataclass
class Result:
    """What the store holds of one trial cell: its state (finished, pruned, failed) and
    its validation metrics (never its test metrics)."""

    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    cost: dict[str, float] = field(default_factory=dict)
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> val_acc (pruning)


@dataclass
class Study:
    """One study: a cell of the grid's axes (its trial seed), its Optuna study, the trial
    cells asked so far and how many of them were told."""

    base: RunSpec
    tune: Tune
    optuna_study: object
    asked: list[tuple[object, RunSpec]] = field(default_factory=list)
    told: int = 0
    results: dict[str, Result] = field(default_factory=dict)  # by trial cell hash

    @property
    def key(self) -> str:
        """The study's name: the cell's without its seed."""
        return self.base.name.rsplit("/seed", 1)[0]

    @property
    def done(self) -> bool:
        return self.told >= self.tune.trials

    def prune_below(self) -> list | None:
        """Median pruning for the next round's trials: [[epoch, the median val_acc of the
        finished trials at that epoch]] from epoch `prune_after` on; None when off or when
        no trial has finished yet. Decided before the round, from earlier rounds only, so a
        replayed study prunes the same trials."""
        if self.tune.pruner != "median":
            return None
        by_epoch: dict[int, list[float]] = {}
        for _, spec in self.asked[:self.told]:
            r = self.results[spec.hash]
            if r.state != "FINISHED":
                continue
            for epoch, acc in r.curve.items():
                if epoch >= self.tune.prune_after:
                    by_epoch.setdefault(epoch, []).append(acc)
        return [[e, _median(v)] for e, v in sorted(by_epoch.items())] or None

    def ask_round(self) -> list[RunSpec]:
        space = self.tune.space_for(self.base.strategy)
        dists = {k: s.distribution() for k, s in space.items()}
        n = min(self.tune.round_size, self.tune.trials - len(self.asked))
        new = []
        for _ in range(n):
            trial = self.optuna_study.ask(dists)
            spec = with_values(self.base, trial.params, TRIAL)
            self.asked.append((trial, spec))
            new.append(spec)
        return new

    def tell_round(self, results: dict[str, Result]) -> None:
        """Tell every asked trial not yet told, in trial order."""
        from optuna.trial import TrialState

        for trial, spec in self.asked[self.told:]:
            r = self.results[spec.hash] = results[spec.hash]
            if r.state == "FINISHED" and self.tune.metric in r.metrics:
                self.optuna_study.tell(trial, r.metrics[self.tune.metric])
            elif r.state == PRUNED:
                self.optuna_study.tell(trial, state=TrialState.PRUNED)
            else:
                self.optuna_study.tell(trial, state=TrialState.FAIL)
            self.told += 1

    def best(self) -> tuple[RunSpec, float] | None:
        """The chosen trial cell and its validation score (Optuna's best trial: the first
        of equals in trial order); None when no trial finished."""
        by_number = {t.number: s for t, s in self.asked[:self.told]}
        try:
            best = self.optuna_study.best_trial
        except ValueError:  # no completed trial
            return None
        return by_number[best.number], best.value

    def strategy_family(self) -> str:
        """The study's strategy label with its searched parameters as `*`
        (`partial[depth=*,bn=frozen]`): what the report compares across settings."""
        own = self.tune.strategy_space.get(self.base.strategy, {})
        if not own:
            return self.base.strategy_label
        shown = [f"{k}=*" if k in own else f"{k}={v}" for k, v in self.base.strategy_params
                 if k in own or f"{k}=" in self.base.strategy_label]
        return f"{self.base.strategy}[{','.join(shown)}]"

    def summary(self) -> dict:
        """The study as tuning.json records it."""
        chosen = self.best()
        states: dict[str, int] = {}
        cost = {k: 0.0 for k in COST}
        for _, spec in self.asked[:self.told]:
            r = self.results[spec.hash]
            states[r.state] = states.get(r.state, 0) + 1
            for k in COST:
                cost[k] += r.cost.get(k, 0.0)
        b = self.base
        return {"study": self.key, "framework": b.framework, "backbone": b.backbone,
                "weights": b.weights, "strategy": b.strategy_label, "dataset": b.dataset,
                "sampler": self.tune.sampler_kind(b.strategy), "trials": self.told,
                "trial_states": states, "metric": self.tune.metric,
                "chosen": ({k: v for k, v in chosen[0].to_params().items()
                            if k in self.tune.space_for(b.strategy)} if chosen else None),
                "chosen_value": chosen[1] if chosen else float("nan"),
                "chosen_run_id": self.results[chosen[0].hash].run_id if chosen else None,
                "trial_runs": [self.results[s.hash].run_id for _, s in self.asked[:self.told]],
                "trial_epochs": cost["epochs_trained"], "trial_seconds": cost["cell_seconds"]}

    def finals(self) -> list[RunSpec]:
        chosen = self.best()
        if chosen is None:
            return []
        spec, _ = chosen
        return [final_spec(spec, seed, self.tune.refit) for seed in self.tune.final_seeds]


def with_values(base: RunSpec, values: dict[str, object], role: str) -> RunSpec:
    """`base` with a trial's searched values (`strategy.<k>` for the strategy's own)."""
    fields_ = {k: _readable(v) for k, v in values.items() if not k.startswith("strategy.")}
    own = {k[len("strategy."):]: v for k, v in values.items() if k.startswith("strategy.")}
    params = {**dict(base.strategy_params), **own}
    return dataclasses.replace(base, **fields_, strategy_params=tuple(params.items()),
                               role=role)


def final_spec(trial: RunSpec, seed: int, refit: str) -> RunSpec:
    return dataclasses.replace(trial, role=FINAL, seed=seed, train_on=refit)


def _readable(v: object) -> object:
    """A sampled float to 4 significant digits: run names stay readable and a value means
    the same cell however many digits the sampler drew."""
    if isinstance(v, float) and v != 0 and math.isfinite(v):
        return float(f"{v:.4g}")
    return v


def make_studies(grid: Grid) -> list[Study]:
    """One study per cell of the grid's axes (grid.specs, at the trial seed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = grid.tune
    studies = []
    for base in grid.specs:
        space = tune.space_for(base.strategy)
        if tune.sampler_kind(base.strategy) == "grid":
            sampler = grid_sampler({k: list(s.values) for k, s in space.items()},
                                   seed=tune.seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=tune.seed,
                                                 n_startup_trials=max(1, tune.trials // 2))
        studies.append(Study(base, tune, optuna.create_study(direction=tune.direction,
                                                             sampler=sampler)))
    return studies


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its stop at the grid's end (Study.stop, allowed
        only inside study.optimize): the harness asks exactly `trials` trials, at most the
        grid's points (bench/config/tune.py)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler


def grid_sampler(space: dict, seed: int):
    return _grid_sampler_class()(space, seed=seed)


# runs (or finds finished) cells, each trial with its pruning thresholds (by hash), and
# returns each one's Result by hash
RunCells = Callable[[list[RunSpec], dict[str, list]], dict[str, Result]]


def run_studies(studies: list[Study], run_cells: RunCells) -> list[RunSpec]:
    """Every study to its budget, round by round. Returns the final cells."""
    while not all(s.done for s in studies):
        round_specs, prune = [], {}
        for s in studies:
            if s.done:
                continue
            below = s.prune_below()
            for spec in s.ask_round():
                round_specs.append(spec)
                if below:
                    prune[spec.hash] = below
        results = run_cells(list(dict.fromkeys(round_specs)), prune)  # a repeat runs once
        for s in studies:
            if not s.done:
                s.tell_round(results)
    return [spec for s in studies for spec in s.finals()]


def _median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


# ---- reading trials back from the store, and recording the choice ---------------------------
SELECTING = ("val_", "best_val")  # the only metrics a study reads: never a test metric


def results(runs: list, specs: list[RunSpec], parent: str | None = None,
            curves: bool = False) -> dict[str, Result]:
    """Each spec's Result from the experiment's cell runs (`parent`: only runs under that
    invocation, for --rerun): its newest FINISHED run, else its newest run; its validation
    metrics only, so a test metric cannot reach a choice even by mistake; with `curves`
    its per-epoch val_acc too (median pruning)."""

    wanted = {s.hash for s in specs}
    by_hash: dict[str, list] = {}
    for r in runs:
        h = r.data.tags.get(tracking.TAG + "spec_hash")
        if h in wanted and (parent is None or r.data.tags.get(tracking.PARENT_TAG) == parent):
            by_hash.setdefault(h, []).append(r)
    out = {}
    for s in specs:
        found = sorted(by_hash.get(s.hash, []), key=lambda r: (r.info.status == "FINISHED",
                                                                r.info.start_time))
        if not found:
            out[s.hash] = Result("MISSING")
            continue
        run = found[-1]
        state = run.info.status
        if state == "FINISHED" and run.data.tags.get(tracking.TAG + "trial_state") == PRUNED:
            state = PRUNED
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(SELECTING)}
        curve = ({step: v for _, step, v in tracking.metric_history(run.info.run_id,
                                                                     ("val_acc",))}
                 if curves and state == "FINISHED" else {})
        out[s.hash] = Result(state, metrics, run.info.run_id,
                             {k: run.data.metrics[k] for k in COST if k in run.data.metrics},
                             curve)
    return out


COST = ("epochs_trained", "cell_seconds")  # what a trial cost, summed per study


def record(studies: list[Study], parent: str, finals: dict[str, Result]) -> None:
    """What each study chose, on the parent run (tuning.json: per study its sampler, trial
    counts by state, the chosen values and validation score, the trial runs, the cost) and
    on each final run (the trial run it re-runs, the study, the score that chose it)."""

    records = [s.summary() for s in studies]
    tracking.log_text(parent, json.dumps(records, indent=1, default=str), "tuning.json")
    tracking.set_tags(parent, {"tune_protocol": studies[0].tune.describe() if studies else "",
                               "role": "tuned grid"})
    for s, rec in zip(studies, records, strict=True):
        for run_id in rec["trial_runs"]:
            if run_id:
                tracking.set_tags(run_id, {"tune_study": s.key})
        searched = list(s.tune.space_for(s.base.strategy))
        for spec in s.finals():
            r = finals.get(spec.hash)
            if r is not None and r.run_id:
                tracking.set_tags(r.run_id, {"tune_study": s.key,
                                             "tuned_from": rec["chosen_run_id"] or "",
                                             "tune_metric": s.tune.metric,
                                             "tune_value": f"{rec['chosen_value']:.6g}",
                                             "tuned_fields": ",".join(searched),
                                             "study_strategy": s.strategy_family()})
