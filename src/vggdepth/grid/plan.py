"""The grid's plan: which runs are stale, how they group and share the machine (the packing), a short
throughput probe of the real trainer, and the estimate a user sees before anything trains."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from vggdepth.checkpoints import CheckpointError, arrange_checkpoints, epochs_in
from vggdepth.config import Params, Variant
from vggdepth.data import PreparedData
from vggdepth.engine import run_fingerprint
from vggdepth.errors import VggdepthError
from vggdepth.fused import fusable
from vggdepth.runs import RunFiles

log = logging.getLogger(__name__)

AUTO_GROUPS_PER_GPU = 4


class GridError(VggdepthError):
    """The grid cannot run, or some of its runs failed."""


# ---- which runs ---------------------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    """One (variant, seed) of the grid and how far its checkpoints already are."""

    variant: str
    seed: int
    files: RunFiles
    done: int  # epochs in its checkpoints under the current settings
    epochs: int  # train.epochs
    problem: str = ""  # why its checkpoints cannot be used (a damaged or unsafe file): it fails without training

    @property
    def name(self) -> str:
        return self.files.root.name

    @property
    def stale(self) -> bool:
        return self.done != self.epochs or bool(self.problem)


def plan_runs(
    params: Params, runs: Path, data_stats: dict, *, arrange: bool = True, only: Collection[str] | None = None
) -> list[PlannedRun]:
    """Every (variant, seed), in params order, with the epochs its checkpoints hold under the current settings.
    `arrange`: set checkpoints of other settings aside and bring earlier ones of these settings back, as training
    would (checkpoints.arrange_checkpoints), so the folders are ready for the runs to continue; else only look.
    `only`: these variants (the depth sweep's), not every one."""
    planned = []
    for variant, cfg in params.variants.items():
        if only is not None and variant not in only:
            continue
        for seed in params.seeds:
            files = RunFiles.of(runs, variant, seed)
            fingerprint = run_fingerprint(params.model, params.train, cfg, seed, data_stats)
            done, problem = 0, ""
            if files.checkpoints.exists():
                try:
                    done = _arranged_epochs(files, fingerprint) if arrange else epochs_in(files, fingerprint)
                except CheckpointError as exc:
                    problem = str(exc)
            planned.append(PlannedRun(variant, seed, files, done, params.train.epochs, problem))
    return planned


def _arranged_epochs(files: RunFiles, fingerprint: str) -> int:
    state, _ = arrange_checkpoints(files, fingerprint)
    return state["epoch"] if state is not None else 0


# ---- how runs share the machine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Packing:
    """How many groups train at once and what each one gets. A group is one run, or several runs of one shape
    fused into one network (vggdepth.fused): `group` runs at most, 0 for every run of a shape."""

    device: str  # "cpu" or "cuda"
    threads: int  # torch threads of each group
    cpus: float  # Ray CPUs of each group
    gpus: float  # Ray GPUs of each group (a fraction: several groups share a device)
    slots: int  # groups at once
    group: int = 1  # runs fused into one network at most; 0: every run of one shape

    def describe(self) -> str:
        one, many = ("run", "runs") if self.group == 1 else ("group of fused runs", "groups of fused runs")
        if self.device == "cuda":
            per_gpu = round(1 / self.gpus)
            return f"{self.slots} {many} at once, {per_gpu} per GPU, {self.threads} CPU thread each"
        if self.slots == 1:
            return f"1 {one} at a time on the CPU, {self.threads} torch thread(s)"
        return f"{self.slots} {many} at once on the CPU, {self.threads} torch thread(s) each"


def choose_packing(
    params: Params, cpus: float, gpus: float, node_cpus: float, runs: int, threads: int | None = None
) -> Packing:
    """CPU: `grid.threads_per_run`; or, when auto, `threads` as the probe chose (`packing_and_plan`); or else
    one thread per run and one run per core, every core shared out when fewer runs than cores are to train, never
    more threads than the largest node has; each run alone unless `grid.runs_per_group` says otherwise. GPU (when
    the cluster has one and runtime.device allows): `grid.groups_per_gpu` groups per device, one CPU thread each,
    every run of one shape fused into one group unless `grid.runs_per_group` caps it."""
    grid, runtime = params.grid, params.runtime
    fuse = grid.runs_per_group
    if gpus >= 1 and runtime.device != "cpu":
        per_gpu = AUTO_GROUPS_PER_GPU if grid.groups_per_gpu == "auto" else grid.groups_per_gpu
        return Packing("cuda", 1, 1, 1 / per_gpu, int(gpus) * per_gpu, 0 if fuse == "auto" else fuse)
    if runtime.device.startswith("cuda"):
        raise GridError(f"runtime.device is {runtime.device!r} but the machine has no GPU; use 'auto' or 'cpu'")
    if grid.threads_per_run != "auto":
        threads = grid.threads_per_run
        if threads > node_cpus:
            raise GridError(
                f"grid.threads_per_run is {threads} but the largest node has {node_cpus:g} CPUs: no run could "
                "start; lower it or set it to auto"
            )
    elif threads is None:
        threads = max(1, min(int(node_cpus), int(cpus) // max(1, runs)))
    return Packing("cpu", threads, threads, 0, max(1, int(cpus) // threads), 1 if fuse == "auto" else fuse)


def group_runs(params: Params, runs: list[PlannedRun], most: int) -> list[list[PlannedRun]]:
    """`runs` in groups that train as one network: runs of one shape (`fused.fusable`) that resume from the same
    epoch, at most `most` to a group (0: no limit), in the order of each group's first run."""
    groups: list[list[PlannedRun]] = []
    for run in runs:
        cfg = params.variants[run.variant]
        home = next(
            (
                g
                for g in groups
                if (most == 0 or len(g) < most)
                and g[0].done == run.done
                and fusable(params.variants[g[0].variant], cfg)
            ),
            None,
        )
        if home is None:
            groups.append(home := [])
        home.append(run)
    return groups


def group_name(group: list[PlannedRun]) -> str:
    return " + ".join(run.name for run in group)


def thread_choices(cpus: float, node_cpus: float, runs: int) -> list[int]:
    """The thread counts per run worth probing for `runs` runs: powers of two, every core, and the count that
    shares every core among the runs when they are fewer than the cores; of those that train the same number of
    runs at once, only the largest (fewer threads would leave cores idle)."""
    top = max(1, min(int(node_cpus), int(cpus)))
    candidates = {top, max(1, min(top, int(cpus) // max(1, runs)))}
    candidates.update(2**k for k in range(top.bit_length()) if 2**k <= top)
    by_runs_at_once = {}
    for threads in sorted(candidates):
        by_runs_at_once[min(int(cpus) // threads, max(1, runs))] = threads
    return sorted(by_runs_at_once.values())


def makespan(seconds: list[float], slots: int) -> float:
    """Wall time of runs lasting `seconds` on `slots` workers, the longest first, each to the worker free first
    (how the grid hands them out)."""
    ends = [0.0] * max(1, min(slots, len(seconds)))
    for length in sorted(seconds, reverse=True):
        ends[ends.index(min(ends))] += length
    return max(ends)


# ---- a short throughput probe -------------------------------------------------------------------------------


def _shape(variant: Variant) -> tuple:
    """What a run's speed depends on: its network and batch size (not its learning rate or schedule)."""
    return variant.blocks_per_stage, variant.batch_norm, variant.batch_size


def _probe_here(params: Params, variants: dict[str, int], device: str, threads: int, steps: int) -> dict:
    """{variant: images/s of one run} for each listed variant trained in a group of the given size, in this
    process with `threads` torch threads: the real trainer's epoch over `steps` batches of random pixels
    (vggdepth.throughput)."""
    from vggdepth.throughput import speed_of, synthetic_data

    device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
    runtime = params.runtime.model_copy(update={"device": device, "threads": threads})
    params = params.model_copy(update={"runtime": runtime})
    before = torch.get_num_threads()
    speeds = {}
    try:
        for name, k in variants.items():
            runs = [(name, seed) for seed in range(k)]
            speeds[name] = speed_of(params, runs, synthetic_data(params, name, steps)).speed / k
    finally:
        torch.set_num_threads(before)
    return speeds


def _probe_child() -> None:
    """A probe process of `probe_throughput`: its request as JSON in argv; says "ready" once torch is loaded, starts
    on a line on stdin (so that every copy times at once), prints its speeds as JSON."""
    request = json.loads(sys.argv[1])
    params = Params.model_validate(request["params"])
    print("ready", flush=True)
    sys.stdin.readline()
    speeds = _probe_here(params, request["variants"], request["device"], request["threads"], request["steps"])
    print(json.dumps(speeds))


def probe_throughput(
    params: Params,
    planned: list[PlannedRun],
    device: str,
    threads: int,
    copies: int = 1,
    steps: int = 2,
    group: int = 1,
) -> dict:
    """Training images per second of one run of each network and batch size among `planned` (random pixels:
    the speed depends on shapes, not content), trained in groups as `group_runs(..., group)` makes them, with
    `threads` torch threads, while `copies` groups train at once (separate processes, as the grid's workers are:
    what they share, memory bandwidth and caches, is measured too).
    {(blocks, batch_norm, batch_size): (the first variant of that shape, images/s of one run)}"""
    variants, sizes = {}, {}
    for g in group_runs(params, planned, group):
        key = _shape(params.variants[g[0].variant])
        variants.setdefault(key, g[0].variant)
        sizes[variants[key]] = max(sizes.get(variants[key], 1), len(g))
    if copies <= 1:
        speeds = _probe_here(params, sizes, device, threads, steps)
    else:
        request = json.dumps(
            {
                "params": params.model_dump(mode="json"),
                "variants": sizes,
                "device": device,
                "threads": threads,
                "steps": steps,
            }
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])
            ),
        }
        speeds = _probe_processes(request, env, copies, f"the throughput probe ({threads} thread(s), {copies} at once)")
    return {key: (name, speeds[name]) for key, name in variants.items()}


def _probe_processes(request: str, env: dict, copies: int, what: str, timeout_s: float = 600) -> dict:
    """Start `copies` probe processes, let them time together once all are ready, and average their speeds."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", "from vggdepth.grid.plan import _probe_child; _probe_child()", request],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(copies)
    ]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise GridError(f"{what} failed: {_tail(child)}")
        for child in children:  # every copy is loaded: they time at once
            child.stdin.write("go\n")
            child.stdin.flush()
        answers = []
        for child in children:
            try:
                out, err = child.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise GridError(f"{what} did not finish in {timeout_s:.0f} s") from None
            try:
                answers.append(json.loads(out.strip().splitlines()[-1]))
            except (ValueError, IndexError):  # communicate has read (and closed) its stderr: say its last line
                last = err.strip().splitlines()[-1] if err.strip() else f"exit status {child.returncode}"
                raise GridError(f"{what} failed: {last}") from None
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    return {name: sum(a[name] for a in answers) / len(answers) for name in answers[0]}


def _tail(child: subprocess.Popen) -> str:
    """The last line a failed probe process wrote to stderr, or its exit status."""
    child.wait()
    err = child.stderr.read().strip() if child.stderr else ""
    return err.splitlines()[-1] if err else f"exit status {child.returncode}"


def run_seconds(params: Params, startable: list[PlannedRun], speeds: dict, sizes: dict) -> dict[str, float]:
    """{run: seconds} of each run: its remaining images over its probed speed (validation counted at a third of a
    training image)."""
    seconds = {}
    for run in startable:
        _, speed = speeds[_shape(params.variants[run.variant])]
        seconds[run.name] = (run.epochs - run.done) * (sizes["train"] + sizes["val"] / 3) / speed
    return seconds


@dataclass
class Trial:
    """One packing the probe measured: its speeds and the wall time it predicts for the stale runs."""

    packing: Packing
    copies: int  # groups it trains at once, as many as were timed together
    speeds: dict
    seconds: dict[str, float]  # per run
    estimate: float


def measure(params: Params, startable: list[PlannedRun], packing: Packing, sizes: dict, *, together: bool) -> Trial:
    """Probe `packing` (as many copies at once as it would train when `together`, else one) and predict."""
    groups = group_runs(params, startable, packing.group)
    copies = min(packing.slots, len(groups))
    speeds = probe_throughput(
        params, startable, packing.device, packing.threads, copies if together else 1, group=packing.group
    )
    seconds = run_seconds(params, startable, speeds, sizes)
    lengths = [max(seconds[run.name] for run in g) for g in groups]  # a group's runs share every step
    return Trial(packing, copies, speeds, seconds, makespan(lengths, packing.slots))


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} hours"


def plan_lines(
    params: Params,
    planned: list[PlannedRun],
    packing: Packing,
    trials: list[Trial],
    where: str,
    probe_seconds: float = 0.0,
) -> list[str]:
    stale = [r for r in planned if r.stale]
    startable = [r for r in stale if not r.problem]
    how = packing.describe() if startable else "none of them can start"
    lines = [f"grid: {len(stale)} of {len(planned)} runs to train on {where}: {how}"]
    for run in planned:
        if run.problem:
            lines.append(f"  {run.name:<24} cannot start: {run.problem}")
        elif run.stale:
            start = f", resumes after epoch {run.done}" if run.done else ""
            lines.append(f"  {run.name:<24} {run.epochs - run.done} epochs{start}")
    groups = group_runs(params, startable, packing.group)
    if any(len(g) > 1 for g in groups):
        lines.append("  fused: " + "; ".join(group_name(g) for g in groups))
    for trial in trials:
        probed = ", ".join(f"{name} {speed:.0f}" for name, speed in trial.speeds.values())
        line = (
            f"  probe, {trial.packing.threads} thread(s) per run x {trial.copies} run(s) at once, img/s per run: "
            f"{probed}"
        )
        if len(trials) > 1:
            fastest = "  <- fastest" if trial.packing == packing else ""
            line += f"; all runs in about {duration(trial.estimate)}{fastest}"
        lines.append(line)
    if trials:
        chosen = next(t for t in trials if t.packing == packing)
        lines.append(f"  estimated wall time: about {duration(chosen.estimate)} (the probe took {probe_seconds:.0f} s)")
    return lines


def local_resources() -> tuple[float, float, float]:
    """(CPUs, GPUs, CPUs of the largest node) of this machine, as a local Ray instance would see them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus, torch.cuda.device_count(), cpus


def plan(params: Params, data: PreparedData, runs: Path, *, probe: bool = True) -> list[str]:
    """What the grid would do now, changing nothing: the stale runs, their groups and packing and (probed on this
    machine) about how long they take."""
    planned = plan_runs(params, runs, data.stats, arrange=False)
    if params.grid.backend == "processes":
        return packing_and_plan(params, data, planned, local_resources(), None, probe=probe, where=PROCESSES)[1]
    from vggdepth.grid.on_ray import cluster_resources, ray_address, start_ray

    address = ray_address(params)
    if address is None:
        resources = local_resources()
    else:
        ray = start_ray(address)
        try:
            resources = cluster_resources(ray)
        finally:
            ray.shutdown()
    return packing_and_plan(params, data, planned, resources, address, probe=probe)[1]


PROCESSES = "this machine (processes, no Ray)"


def packing_and_plan(
    params: Params,
    data: PreparedData,
    planned: list[PlannedRun],
    resources: tuple,
    address: str | None,
    *,
    probe: bool,
    where: str | None = None,
) -> tuple[Packing, list[str], dict[str, float]]:
    """The packing of the stale runs on `resources` (CPUs, GPUs, CPUs of the largest node), the plan's lines and
    each run's predicted seconds (empty without `probe`). On this machine's CPU with `threads_per_run: auto`, the
    probe measures every packing worth trying (`thread_choices`, as many groups at once as it would train) and the
    one with the shortest predicted wall time wins: one run per core is the most images per second while every
    core is busy, more threads per run win when the runs are fewer than the cores or end unevenly. Without a
    probe, or on a cluster (whose nodes this machine cannot time): one thread per run and one run per CPU, the CPUs
    shared out when the runs are fewer. On a GPU, the groups' fused step is timed."""
    where = where or _where(address)
    startable = [r for r in planned if r.stale and not r.problem]
    cpus, gpus, node_cpus = resources
    packing = choose_packing(params, cpus, gpus, node_cpus, len(startable))
    if not (probe and startable):
        return packing, plan_lines(params, planned, packing, [], where), {}
    started = time.monotonic()
    sizes = data.stats["sizes"]
    local_cpu = packing.device == "cpu" and address is None
    if local_cpu and params.grid.threads_per_run == "auto":
        trials = [
            measure(params, startable, option, sizes, together=True)
            for option in (
                choose_packing(params, cpus, gpus, node_cpus, len(startable), threads=threads)
                for threads in thread_choices(cpus, node_cpus, len(startable))
            )
        ]
        chosen = min(trials, key=lambda trial: trial.estimate)
    else:
        chosen = measure(params, startable, packing, sizes, together=local_cpu)
        trials = [chosen]
    lines = plan_lines(params, planned, chosen.packing, trials, where, time.monotonic() - started)
    return chosen.packing, lines, chosen.seconds


def _where(address: str | None) -> str:
    return "this machine (Ray on 127.0.0.1)" if address is None else f"the Ray cluster at {address}"
