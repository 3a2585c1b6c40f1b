"""Runs a grid: skips finished cells, runs the rest (several at once where the machine has
the devices, or as Ray tasks on a cluster), records one parent run per invocation.

The driver is this module: it opens the grid's experiment, takes over runs whose owner died
(bench/claims.py), plans what is left, starts the parent run and hands the cells to an
executor: the local pool (bench/pool.py: one slot per GPU or per share of the cores, the
default one slot) or Ray (bench/cluster.py). Each cell, wherever it runs, goes through
bench/execute.py: claimed, its process started from a fork server or fresh, its events and
outcome recorded by whoever supervises it, so a cell that dies hard is still recorded.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

from bench import claims, tracking
from bench.execute import HELD, SKIPPED, CellTask, Outcome
from bench.forkserver import Launcher
from bench.grid import Grid
from bench.progress import Progress
from bench.spec import RunSpec

__all__ = ["GridResult", "Outcome", "plan", "run_grid", "install_sigterm_handler"]


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
    """Run the grid's cells that have no FINISHED run yet (all of them with `rerun`).

    A grid not yet stamped with its device kind (Grid.on_device: the CLI does it) is stamped
    here, before finished cells are looked up. `executor`: where cells run (default: the
    local pool with the grid's [run] parallel, bench/pool.py, starting cell processes with
    `launcher`: fork servers, else fresh interpreters); closed when the grid ends."""
    from bench import pool

    if grid.device_kind is None:
        grid = grid.on_device()
    exp_id, restored = tracking.open_experiment(grid.name)
    closed = claims.take_over(exp_id)
    if closed:
        print(f"took over {len(closed)} run(s) left RUNNING by a runner that died: marked "
              f"KILLED", file=stream)
    todo, skipped = plan(grid, exp_id, rerun)
    if restored:
        _say_restored(grid, exp_id, rerun, stream)
    outcomes = [Outcome(s, SKIPPED) for s in skipped]
    executor = executor or pool.LocalPool(pool.slots_for(grid, grid.parallel),
                                          launcher or Launcher())
    print(f"grid {grid.name!r}: {len(grid.specs)} cells on {grid.device_kind}, "
          f"{len(outcomes)} already finished, {len(todo)} to run, {executor.width} at once  "
          f"(MLflow: {tracking.tracking_uri()}, experiment {exp_id})", file=stream)
    if not todo:
        executor.close()
        return GridResult(exp_id, None, outcomes)

    parent = tracking.start_parent(exp_id, grid, len(todo), grid_text, executor.describe())
    since = tracking.get_run(parent).info.start_time if rerun else None
    tasks = [CellTask(exp_id, parent, grid, s, i, len(todo), since) for i, s in enumerate(todo)]
    progress = Progress(len(todo), executor.width, stream)
    heartbeat = claims.Heartbeat()
    heartbeat.add(parent)
    status = tracking.FINISHED
    try:
        executor.run(tasks, progress, heartbeat, outcomes.append)
    except KeyboardInterrupt:
        status = tracking.KILLED
        raise
    finally:
        heartbeat.close()
        executor.close()
        ran = [o for o in outcomes if o.status not in (SKIPPED, HELD)]
        failed = [o for o in ran if o.status != tracking.FINISHED]
        tracking.set_tags(parent, {"failed": str(len(failed)),
                                   "finished": str(len(ran) - len(failed)),
                                   "held_elsewhere": str(sum(o.status == HELD
                                                             for o in outcomes))})
        tracking.log_metrics(parent, summary_metrics(outcomes))
        tracking.end_run(parent, status if status == tracking.KILLED
                         else (tracking.FAILED if failed else tracking.FINISHED))
    return GridResult(exp_id, parent, outcomes)


def summary_metrics(outcomes: list[Outcome]) -> dict[str, float]:
    """What the parent run's row shows in the UI: the cells this invocation ran by outcome,
    and their test accuracy (best, mean; per framework where it ran several)."""
    ran = [o for o in outcomes if o.status not in (SKIPPED, HELD)]
    out = {"cells_finished": sum(o.status == tracking.FINISHED for o in ran),
           "cells_failed": sum(o.status != tracking.FINISHED for o in ran),
           "cells_skipped": sum(o.status in (SKIPPED, HELD) for o in outcomes)}
    accs: dict[str, list[float]] = {}
    for o in ran:
        if o.status == tracking.FINISHED and "test_acc" in o.metrics:
            accs.setdefault(o.spec.framework, []).append(o.metrics["test_acc"])
    every = [a for v in accs.values() for a in v]
    if every:
        out.update(test_acc_best=max(every), test_acc_mean=sum(every) / len(every))
    if len(accs) > 1:
        for fw, v in sorted(accs.items()):
            out[f"test_acc_best_{fw}"] = max(v)
            out[f"test_acc_mean_{fw}"] = sum(v) / len(v)
    return out


def plan(grid: Grid, exp_id: str, rerun: bool = False) -> tuple[list[RunSpec], list[RunSpec]]:
    """(cells to run, cells skipped): a cell is skipped when the experiment holds a FINISHED
    run of its hash, which names its device kind once the grid is stamped (on_device)."""
    done = set() if rerun else tracking.finished_hashes(exp_id)
    return ([s for s in grid.specs if s.hash not in done],
            [s for s in grid.specs if s.hash in done])


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
