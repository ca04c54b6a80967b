"""The grid's driver: the groups handed to the slots of a pool (Ray's or plain processes), the longest first, the
progress a user sees, and what the grid stage keeps (`runs/grid.json`)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vggdepth.config import Params
from vggdepth.data import PreparedData
from vggdepth.files import write_json
from vggdepth.grid.on_ray import RayPool, cluster_resources, ray_address, start_ray
from vggdepth.grid.plan import (
    PROCESSES,
    GridError,
    Packing,
    PlannedRun,
    duration,
    group_name,
    group_runs,
    local_resources,
    packing_and_plan,
    plan_runs,
)
from vggdepth.grid.processes import ProcessPool
from vggdepth.grid.workers import STOPPED, Diverged
from vggdepth.locks import writing
from vggdepth.runs import TRAINING_FILES, RunFiles
from vggdepth.signals import keeping

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 60  # without a terminal: one progress line at most this often


@dataclass
class GridResult:
    trained: dict[str, dict] = field(default_factory=dict)  # run name -> summary
    failed: dict[str, str] = field(default_factory=dict)  # run name -> why
    stopped: dict[str, str] = field(default_factory=dict)  # run name -> why (a deadline; resumes when re-run)
    diverged: dict[str, str] = field(default_factory=dict)  # the failed runs whose loss became NaN or infinite -> what
    seconds: float = 0.0

    def take(self, name: str, outcome: dict | str | Diverged) -> str:
        """A run's outcome (as `workers.told` makes it) into the books; the line that says it. A diverged run is a
        failed one, also in `diverged` with what happened in a few words."""
        if isinstance(outcome, dict):
            self.trained[name] = outcome
            return (
                f"grid: {name} done: val acc {outcome['val_acc']:.4f} (best {outcome['best_val_acc']:.4f} at epoch "
                f"{outcome['best_epoch']}), {outcome['images_per_second']:.0f} img/s on {outcome['node']}"
            )
        if isinstance(outcome, Diverged):
            self.diverged[name] = outcome.what
            outcome = outcome.why
        elif outcome.startswith(STOPPED):
            self.stopped[name] = outcome.removeprefix(STOPPED)
            return f"grid: {name} {outcome}"
        self.failed[name] = outcome
        return f"grid: {name} FAILED: {outcome}"

    @property
    def ended(self) -> int:
        return len(self.trained) + len(self.failed) + len(self.stopped)


class _Progress:
    """One grid progress line (a bar on a terminal): runs finished, epochs done, images/s, ETA."""

    def __init__(self, planned: list[PlannedRun], images_per_epoch: int):
        self.total_runs = len(planned)
        self.total_epochs = sum(r.epochs - r.done for r in planned)
        self.images_per_epoch = images_per_epoch
        self.started = time.monotonic()
        self.interactive = sys.stderr.isatty()
        self.last_line = self.started
        self.bar = tqdm(total=self.total_epochs, unit="epoch", desc="grid", disable=not self.interactive)

    def update(self, epochs: int, finished: int) -> None:
        elapsed = time.monotonic() - self.started
        speed = epochs * self.images_per_epoch / elapsed if elapsed > 0 else 0.0
        left = (self.total_epochs - epochs) * self.images_per_epoch / speed if speed > 0 else math.inf
        eta = duration(left) if math.isfinite(left) else "?"
        text = f"runs {finished}/{self.total_runs} | {speed:.0f} img/s | ETA {eta}"
        if self.interactive:
            self.bar.update(epochs - self.bar.n)
            self.bar.set_postfix_str(text)
        elif time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = time.monotonic()
            print(f"grid: epochs {epochs}/{self.total_epochs} | {text}", file=sys.stderr, flush=True)

    def say(self, line: str) -> None:
        if self.interactive:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def run_grid(
    params: Params,
    data: PreparedData,
    data_dir: Path,
    runs: Path,
    *,
    probe: bool = True,
    deadline: float | None = None,
    start_margin_s: float = 0.0,
    after_group=None,
    only: Collection[str] | None = None,
    context=None,
) -> tuple[GridResult, list[PlannedRun], Packing]:
    """Train every stale run of the grid, its groups concurrently (on Ray, or in plain processes with
    `grid.backend: processes`); returns what trained, what failed and the plan. `deadline` (epoch time): no group
    starts with less than `start_margin_s` left, and a run stops after its last epoch that ends before it
    (`GridResult.stopped`).
    `after_group(result)` is called whenever a group ends. `only`: the runs of these variants, not every one (the
    depth sweep's). `context` (vggdepth.tracking.store.PipelineContext): the MLflow parent run the runs go under;
    by default this pipeline run's.
    The grid is the one writer of every run folder of the study until that run has finished (vggdepth.locks: a
    train stage or a second grid on them is refused; a finished run's folder is let go at the end of its group, so
    its evaluation can start while the grid trains the others). Interrupted (SIGTERM, or the stage's parent gone:
    vggdepth.signals), it stops its workers, closes their MLflow runs as KILLED and says that every run keeps its
    last finished epoch."""
    runs = runs.resolve()
    variants = [v for v in params.variants if only is None or v in only]
    folders = [RunFiles.of(runs, variant, seed).root for variant in variants for seed in params.seeds]
    kept = f"every run in {runs} keeps its last finished epoch; run the grid again (dvc repro) to resume them"
    held: dict[str, ExitStack] = {}  # run name -> its folder's lock
    try:
        for folder in folders:  # all or none: a busy folder refuses the grid before any work
            lock = ExitStack()
            lock.enter_context(writing(folder))
            held[folder.name] = lock

        def let_go(names) -> None:  # finished runs: their folders are the evaluate stage's now
            for name in names:
                if name in held:
                    held.pop(name).close()

        def group_ended(result: GridResult) -> None:
            let_go(result.trained)
            if after_group is not None:
                after_group(result)

        with keeping(lambda: kept):
            return _run_grid(
                params, data, data_dir, runs, probe, deadline, start_margin_s, group_ended, let_go, only, context
            )
    finally:
        for lock in held.values():
            lock.close()


def _run_grid(params, data, data_dir, runs, probe, deadline, start_margin_s, after_group, let_go, only, context):
    """`run_grid`, its locks held; `let_go(names)` releases those of runs already finished."""
    planned = plan_runs(params, runs, data.stats, only=only)
    stale = [r for r in planned if r.stale]
    let_go([r.files.root.name for r in planned if not r.stale])
    result = GridResult()
    if not stale:
        say = "grid: every run is trained to train.epochs; nothing to do"
        print(say, file=sys.stderr, flush=True)
        return result, planned, Packing("cpu", 0, 0, 0, 0)

    store = None
    if params.tracking.enabled:  # before any worker: an unusable store stops the grid at once; experiment and
        from vggdepth.tracking.store import PipelineContext, open_store  # parent run exist before writers start

        store = open_store(params)
        context = context or PipelineContext.detect(params)
        store.parent_run(context)
    recorder_args = (
        params,
        str(runs),
        str(data_dir.resolve()),
        store.uri if store is not None else None,
        str(store.root) if store is not None else "",
        context,
    )
    if params.grid.backend == "processes":
        packing, lines, seconds = packing_and_plan(
            params, data, planned, local_resources(), None, probe=probe, where=PROCESSES
        )
        _say_lines(lines)
        pool = ProcessPool(params, data_dir.resolve(), recorder_args, packing, deadline)
        try:
            result = _launch(
                pool, params, stale, packing, seconds, len(data.train), deadline, start_margin_s, after_group
            )
        finally:
            pool.close()
        return result, planned, packing

    address = ray_address(params)
    if address is None:  # this machine: probed before Ray's processes start, so they do not slow the probe
        packing, lines, seconds = packing_and_plan(params, data, planned, local_resources(), address, probe=probe)
    ray = start_ray(address)
    pool = None
    try:
        if address is not None:
            packing, lines, seconds = packing_and_plan(
                params, data, planned, cluster_resources(ray), address, probe=probe
            )
        _say_lines(lines)
        pool = RayPool(ray, params, data, recorder_args, packing, deadline)
        result = _launch(pool, params, stale, packing, seconds, len(data.train), deadline, start_margin_s, after_group)
    finally:
        if pool is not None:
            pool.close()
        ray.shutdown()
    return result, planned, packing


def _say_lines(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def _launch(
    pool, params, stale, packing, seconds, images_per_epoch, deadline, start_margin_s, after_group
) -> GridResult:
    """Hand the groups to the pool's slots, the longest first (the last to start is short), one group per slot at a
    time; follow the recorder's progress until every group has ended."""
    started = time.monotonic()
    result = GridResult()
    startable = [r for r in stale if not r.problem]
    groups = sorted(
        group_runs(params, startable, packing.group), key=lambda g: -max(seconds.get(r.name, 0.0) for r in g)
    )
    progress = _Progress(startable + [r for r in stale if r.problem], images_per_epoch)
    for run in stale:
        if run.problem:
            progress.say(result.take(run.name, run.problem))
    if any(len(g) > 1 for g in groups):
        progress.say("grid: groups: " + "; ".join(group_name(g) for g in groups))

    def starts(group: list[PlannedRun]) -> dict[str, dict[str, bytes]]:
        return {
            run.name: {
                rel: (run.files.root / rel).read_bytes()
                for rel in TRAINING_FILES
                if rel.startswith("checkpoints/") and (run.files.root / rel).exists()
            }
            for run in group
        }

    def start_next() -> None:
        group = groups.pop(0)
        if deadline is not None and time.time() >= deadline - start_margin_s:
            for run in group:
                progress.say(result.take(run.name, f"{STOPPED}not started, the time was spent"))
            return
        pool.submit(group, starts(group))

    while groups and len(pool.pending) < packing.slots:
        start_next()
    try:
        while pool.pending:
            for group, outcome in pool.wait(timeout=2.0):
                outcomes = outcome if isinstance(outcome, list) else [(r.name, outcome) for r in group]
                for name, each in outcomes:
                    if not isinstance(each, dict):  # close its MLflow run, if the run itself did not
                        pool.record("lost", name, each.why if isinstance(each, Diverged) else each)
                    progress.say(result.take(name, each))
                if after_group is not None:
                    after_group(result)
                while groups and len(pool.pending) < packing.slots:
                    start_next()
            epochs, messages = pool.record("state")
            for message in messages:
                progress.say(message)
            progress.update(epochs, result.ended)
    finally:
        progress.close()
    result.seconds = time.monotonic() - started
    return result


def grid_record(result: GridResult, planned: list[PlannedRun], packing: Packing, images_per_epoch: int) -> dict:
    """What `runs/grid.json` keeps of a grid: its packing, its speed, and per run what trained where."""
    trained_images = sum(images_per_epoch * (r.epochs - r.done) for r in planned if r.name in result.trained)
    return {
        "packing": packing.describe() if result.trained else "nothing to train",
        "seconds": round(result.seconds, 1),
        "images_per_second": round(trained_images / result.seconds, 1) if result.seconds else 0.0,
        "runs": {
            r.name: (
                {"trained_epochs": r.epochs - r.done, "node": result.trained[r.name]["node"]}
                if r.name in result.trained
                else {"trained_epochs": 0, "node": None}
            )
            for r in planned
        },
    }


def finish(result: GridResult, planned: list[PlannedRun], packing: Packing, out: Path, images: int) -> None:
    """Write `out` (runs/grid.json) when every run trained; else name the failed runs and write nothing."""
    if result.failed:
        names = ", ".join(sorted(result.failed))
        trained = f"; {len(result.trained)} other run(s) finished and are kept" if result.trained else ""
        raise GridError(
            f"{len(result.failed)} of {sum(r.stale for r in planned)} runs failed: {names}{trained}. Re-running "
            "trains only what is unfinished, resuming from each run's last epoch"
        )
    write_json(out, grid_record(result, planned, packing, images))
