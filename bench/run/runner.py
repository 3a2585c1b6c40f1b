"""Runs a grid: skips finished cells, runs the rest (several at once where the machine has
the devices, or as Ray tasks on a cluster), records one parent run per invocation.

The runner is this module: given a plan (bench/run/plan.py: the grid stamped with its device
kind and the executor that runs it), it opens the grid's experiment, takes over runs whose
owner died (bench/run/claims.py), skips finished cells, starts the parent run and hands the
cells to the plan's executor: the local pool (bench/run/pool.py: one slot per GPU or per
share of the cores, the default one slot) or Ray (bench/run/cluster.py). Each cell,
wherever it runs, goes through bench/run/execute.py: claimed, its process started from a
fork server or fresh, its events and
outcome recorded by whoever supervises it, so a cell that dies hard is still recorded.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass

from bench import tracking
from bench.config.grid import Grid
from bench.config.spec import RunSpec
from bench.run import claims, tune
from bench.run.forkserver import Launcher
from bench.run.plan import Options, Plan, make_plan
from bench.run.preflight import StoreDown, bound_http_retries
from bench.run.progress import Progress
from bench.run.task import HELD, SKIPPED, CellTask, Outcome

__all__ = ["GridResult", "Outcome", "run_grid", "run_plan", "install_sigterm_handler"]


@dataclass
class GridResult:
    experiment_id: str
    parent_run_id: str | None
    outcomes: list[Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in (tracking.FAILED, tracking.KILLED)]

    @property
    def held(self) -> list[Outcome]:
        """Cells another runner held (ran or was running) when this one reached them."""
        return [o for o in self.outcomes if o.status == HELD]


def run_grid(grid: Grid, grid_text: str, rerun: bool = False, stream=sys.stderr,
             launcher: Launcher | None = None, executor=None) -> GridResult:
    """Plan `grid` with its own [run] options (bench/run/plan.py; `launcher` and `executor`
    as make_plan takes them) and run the plan: the library's way in, where `bench run`
    makes its plan from the command's options."""
    return run_plan(make_plan(grid, Options(rerun=rerun), launcher, executor), grid_text,
                    stream)


def run_plan(plan: Plan, grid_text: str, stream=sys.stderr) -> GridResult:
    """Run the plan's cells that have no FINISHED run yet (all of them with rerun): open
    the grid's experiment, take over runs whose owner died, start the parent run, hand the
    cells to the plan's executor (closed when the grid ends), record the outcome. A grid
    with a [tune] table runs its studies (bench/run/tune.py) under the one parent run."""
    bound_http_retries()
    grid, executor = plan.grid, plan.executor
    exp_id, restored = tracking.open_experiment(grid.name)
    closed = claims.take_over(exp_id)
    if closed:
        print(f"took over {len(closed)} run(s) left RUNNING by a runner that died: marked "
              f"KILLED", file=stream)
    if restored:
        _say_restored(grid, exp_id, plan.rerun, stream)
    if grid.tune:
        return _run_tuned(plan, exp_id, grid_text, stream)
    plan.look_up_finished(set() if plan.rerun else tracking.finished_hashes(exp_id))
    skipped = [Outcome(s, SKIPPED) for s in plan.skipped]
    print(f"grid {grid.name!r}: {len(grid.specs)} cells on {grid.device_kind}, "
          f"{len(skipped)} already finished, {len(plan.todo)} to run, {executor.width} at "
          f"once  (MLflow: {tracking.tracking_uri()}, experiment {exp_id})", file=stream)
    if not plan.todo:
        executor.close()
        return GridResult(exp_id, None, skipped)
    with Invocation(plan, exp_id, grid_text, len(plan.todo), stream) as inv:
        inv.outcomes += skipped
        inv.run(plan.todo)
    return GridResult(exp_id, inv.parent, inv.outcomes)


def _run_tuned(plan: Plan, exp_id: str, grid_text: str, stream) -> GridResult:
    """The studies of a [tune] grid round by round, then their final cells, all under one
    parent run; what each study chose is recorded on the parent and on its final runs."""
    grid = plan.grid
    studies = tune.make_studies(grid)
    t = grid.tune
    expected = len(studies) * (t.trials + len(t.final_seeds))
    print(f"grid {grid.name!r}: {len(studies)} studies on {grid.device_kind}, {t.describe()}: "
          f"up to {expected} cells, {plan.executor.width} at once  (MLflow: "
          f"{tracking.tracking_uri()}, experiment {exp_id})", file=stream)
    with Invocation(plan, exp_id, grid_text, expected, stream) as inv:
        finals = tune.run_studies(studies, inv.run_or_find)
        inv.run_or_find(finals)
        tune.record(studies, inv.parent, inv.found(finals))
        # the cells this invocation stands for: every study's trials and its finals
        trials = [spec for s in studies for _, spec in s.asked]
        tracking.log_text(inv.parent, json.dumps(tracking.cell_list(grid, trials + finals),
                                                 indent=1), tracking.CELLS_ARTIFACT)
    return GridResult(exp_id, inv.parent, inv.outcomes)


class Invocation:
    """One grid invocation: its parent run, heartbeat and progress, and the cells run under
    it (a plain grid's at once; a tuned grid's round by round). Closing it records the
    outcome on the parent and closes the executor."""

    WAIT_FOR_HELD_S = 10.0  # how often a tuned round looks whether another runner's cells ended

    def __init__(self, plan: Plan, exp_id: str, grid_text: str, expected: int, stream):
        self.plan, self.exp_id, self.stream = plan, exp_id, stream
        self.parent = tracking.start_parent(exp_id, plan.grid, expected, grid_text,
                                            plan.executor.describe())
        self.since = tracking.get_run(self.parent).info.start_time if plan.rerun else None
        self.progress = Progress(expected, plan.executor.width, stream)
        self.heartbeat = claims.Heartbeat()
        self.heartbeat.add(self.parent)
        self.outcomes: list[Outcome] = []
        self.expected, self.started = expected, 0
        self.ran_here: set[str] = set()

    def __enter__(self) -> Invocation:
        return self

    def __exit__(self, kind, value, tb) -> None:
        killed = kind is not None and issubclass(kind, KeyboardInterrupt)
        self.heartbeat.close()
        self.plan.executor.close()
        if kind is not None and issubclass(kind, StoreDown):
            return  # nothing to record it in: the next invocation takes the parent over
        _record_parent(self.parent, self.outcomes,
                       tracking.KILLED if killed else tracking.FINISHED)

    def run(self, specs: list[RunSpec], prune: dict[str, list] | None = None
            ) -> list[Outcome]:
        """Every spec as a cell of this invocation (`prune`: a tuned trial's pruning
        thresholds by hash); their outcomes as they come."""
        tasks = [CellTask(self.exp_id, self.parent, self.plan.grid, s, self.started + i,
                          max(self.expected, self.started + len(specs)), self.since,
                          prune_below=(prune or {}).get(s.hash))
                 for i, s in enumerate(specs)]
        self.started += len(specs)
        new: list[Outcome] = []
        self.plan.executor.run(tasks, self.progress, self.heartbeat, new.append)
        self.outcomes += new
        down = getattr(self.plan.executor, "store_down", None)
        if down:  # the grid stops asking for cells; finished ones are in the store
            raise StoreDown(tracking.tracking_uri(), down)
        self.ran_here |= {o.spec.hash for o in new if o.status == tracking.FINISHED}
        return new

    def run_or_find(self, specs: list[RunSpec], prune: dict[str, list] | None = None
                    ) -> dict[str, tune.Result]:
        """Each spec's result: a finished cell found in the store (with rerun, only one this
        invocation ran), else run here; a cell another runner holds is waited for, and run
        here if its runner died. Returns tune.Result by hash."""
        pending = specs
        while pending:
            done = self.ran_here if self.plan.rerun else tracking.finished_hashes(self.exp_id)
            todo = [s for s in pending if s.hash not in done]
            self.outcomes += [Outcome(s, SKIPPED) for s in pending if s.hash in done]
            held = [o.spec for o in self.run(todo, prune) if o.status == HELD] if todo else []
            if held:
                time.sleep(self.WAIT_FOR_HELD_S)
                claims.take_over(self.exp_id)
            pending = held
        return self.found(specs)

    def found(self, specs: list[RunSpec]) -> dict[str, tune.Result]:
        grid_tune = self.plan.grid.tune
        return tune.results(tracking.cell_runs(self.exp_id), specs,
                            self.parent if self.plan.rerun else None,
                            curves=bool(grid_tune and grid_tune.pruner == "median"))


def _record_parent(parent: str, outcomes: list[Outcome], status: str) -> None:
    ran = [o for o in outcomes if o.status not in (SKIPPED, HELD)]
    failed = [o for o in ran if o.status != tracking.FINISHED]
    tracking.set_tags(parent, {"failed": str(len(failed)),
                               "finished": str(len(ran) - len(failed)),
                               "held_elsewhere": str(sum(o.status == HELD for o in outcomes))})
    tracking.log_metrics(parent, summary_metrics(outcomes))
    tracking.end_run(parent, status if status == tracking.KILLED
                     else (tracking.FAILED if failed else tracking.FINISHED))


def summary_metrics(outcomes: list[Outcome]) -> dict[str, float]:
    """The parent run's counts of this invocation's cells by outcome. No accuracy across
    cells: a mean over unlike strategies reads as nothing (bench/summary.py logs the true
    summaries, per framework and strategy, when the parent ends)."""
    ran = [o for o in outcomes if o.status not in (SKIPPED, HELD)]
    return {"cells_finished": sum(o.status == tracking.FINISHED for o in ran),
            "cells_failed": sum(o.status != tracking.FINISHED for o in ran),
            "cells_skipped": sum(o.status in (SKIPPED, HELD) for o in outcomes)}


def _say_restored(grid: Grid, exp_id: str, rerun: bool, stream) -> None:
    """A deleted experiment keeps its name (and runs) until purged, so it was restored: say
    so, since its finished cells count as done again."""
    held = len({s.hash for s in grid.specs} & tracking.finished_hashes(exp_id))
    fate = "they run again (--rerun)" if rerun else "they will be skipped"
    uri = tracking.tracking_uri()
    store = ("--tracking-uri" if uri.startswith(("http://", "https://"))
             else "--backend-store-uri")
    print(f"experiment {grid.name!r} (id {exp_id}) had been deleted; restored it. It holds "
          f"{held} finished cell(s) of this grid: {fate}. To start fresh: --rerun (every "
          f"cell runs again, the old runs stay), or purge it first: mlflow experiments "
          f"delete --experiment-id {exp_id} && mlflow gc {store} {uri} --experiment-ids "
          f"{exp_id}", file=stream)


def install_sigterm_handler() -> None:
    """SIGTERM (a scheduler stopping the job) ends the grid like Ctrl-C: cell and parent
    runs are marked KILLED, finished cells stay FINISHED. SIGINT does so too even where the
    shell that started the runner ignored it (a `cmd &` in a script): a runner is stopped the
    same way whoever asks."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
