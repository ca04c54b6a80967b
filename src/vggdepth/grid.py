"""The grid: every (variant, seed) run of the study whose checkpoints are not finished, trained concurrently on Ray.

One driver (the `grid` stage) plans the runs, starts Ray (a local instance bound to 127.0.0.1, or an existing
cluster) and one `GridWorker` actor per slot of the packing; each worker trains runs one after another, in a
temporary folder of whatever node it lives on. The prepared data reaches it through Ray's object store, and after
every epoch its new checkpoints and tables travel back to a `Recorder` actor pinned to the driver's node, which
writes them into `runs/<variant>-s<seed>/` (each file through a temporary name) and sends the epoch to MLflow. So
worker nodes need neither the repository, the DVC cache nor the tracking store, and the driver's folder always
holds every run up to its last finished epoch: a killed driver, re-run, resumes each run from there.
`python -m vggdepth plan` shows what a grid would do, changing nothing.

The per-run `train@<variant>-<seed>` stages that DVC runs next find their runs finished and only restore the
outputs from the checkpoints, which is how DVC records them (and how a single run is still trained alone).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vggdepth.checkpoints import CheckpointError, arrange_checkpoints, epochs_in
from vggdepth.config import Params, Variant
from vggdepth.data import PreparedData
from vggdepth.engine import run_fingerprint, train_run
from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_path, write_json
from vggdepth.gradients import GradientRow
from vggdepth.runs import LAST, PREVIOUS, TRAINING_FILES, Callback, EpochRecord, RunFiles, RunInfo

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"
AUTO_RUNS_PER_GPU = 4
PROGRESS_EVERY_S = 60  # without a terminal: one progress line at most this often


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


def plan_runs(params: Params, runs: Path, data_stats: dict, *, arrange: bool = True) -> list[PlannedRun]:
    """Every (variant, seed), in params order, with the epochs its checkpoints hold under the current settings.
    `arrange`: set checkpoints of other settings aside and bring earlier ones of these settings back, as training
    would (engine.arrange_checkpoints), so the folders are ready for the runs to continue; else only look."""
    planned = []
    for variant, cfg in params.variants.items():
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
    """How many runs train at once and what each one gets."""

    device: str  # "cpu" or "cuda"
    threads: int  # torch threads of each run
    cpus: float  # Ray CPUs of each run
    gpus: float  # Ray GPUs of each run (a fraction: several runs share a device)
    slots: int  # runs at once

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.slots} runs at once, {round(1 / self.gpus)} per GPU, {self.threads} CPU thread each"
        if self.slots == 1:
            return f"1 run at a time on the CPU, {self.threads} torch thread(s)"
        return f"{self.slots} runs at once on the CPU, {self.threads} torch thread(s) each"


def choose_packing(
    params: Params, cpus: float, gpus: float, node_cpus: float, runs: int, threads: int | None = None
) -> Packing:
    """CPU: `grid.threads_per_run`; or, when auto, `threads` as the probe chose (`packing_and_plan`); or else
    one thread per run and one run per core, every core shared out when fewer runs than cores are to train, never
    more threads than the largest node has. GPU (when the cluster has one and runtime.device allows):
    `grid.runs_per_gpu` runs per device, one CPU thread each."""
    grid, runtime = params.grid, params.runtime
    if gpus >= 1 and runtime.device != "cpu":
        per_gpu = AUTO_RUNS_PER_GPU if grid.runs_per_gpu == "auto" else grid.runs_per_gpu
        return Packing("cuda", 1, 1, 1 / per_gpu, int(gpus) * per_gpu)
    if runtime.device.startswith("cuda"):
        raise GridError(f"runtime.device is {runtime.device!r} but the Ray cluster has no GPU; use 'auto' or 'cpu'")
    if grid.threads_per_run != "auto":
        threads = grid.threads_per_run
        if threads > node_cpus:
            raise GridError(
                f"grid.threads_per_run is {threads} but the largest Ray node has {node_cpus:g} CPUs: no run could "
                "start; lower it or set it to auto"
            )
    elif threads is None:
        threads = max(1, min(int(node_cpus), int(cpus) // max(1, runs)))
    return Packing("cpu", threads, threads, 0, max(1, int(cpus) // threads))


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


def _probe_here(params: Params, variants: list[str], device: str, threads: int, steps: int) -> dict:
    """{variant: images/s} of one run of each listed variant, in this process with `threads` torch threads: the
    real trainer's epoch over `steps` batches of random pixels (vggdepth.throughput)."""
    from vggdepth.throughput import speed_of, synthetic_data

    device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
    runtime = params.runtime.model_copy(update={"device": device, "threads": threads})
    params = params.model_copy(update={"runtime": runtime})
    before = torch.get_num_threads()
    try:
        return {name: speed_of(params, [(name, 0)], synthetic_data(params, name, steps)).speed for name in variants}
    finally:
        torch.set_num_threads(before)


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
    params: Params, planned: list[PlannedRun], device: str, threads: int, copies: int = 1, steps: int = 2
) -> dict:
    """Training images per second of one run of each network and batch size among `planned` (random pixels:
    the speed depends on shapes, not content), with `threads` torch threads, while `copies` runs train at once
    (separate processes, as the grid's workers are: what they share, memory bandwidth and caches, is measured
    too). {(blocks, batch_norm, batch_size): (the first variant of that shape, images/s of one run)}"""
    variants = {}
    for run in planned:
        variants.setdefault(_shape(params.variants[run.variant]), run.variant)
    names = list(variants.values())
    if copies <= 1:
        speeds = _probe_here(params, names, device, threads, steps)
    else:
        request = json.dumps(
            {
                "params": params.model_dump(mode="json"),
                "variants": names,
                "device": device,
                "threads": threads,
                "steps": steps,
            }
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
            ),
        }
        speeds = _probe_processes(request, env, copies, f"the throughput probe ({threads} thread(s), {copies} at once)")
    return {key: (name, speeds[name]) for key, name in variants.items()}


def _probe_processes(request: str, env: dict, copies: int, what: str, timeout_s: float = 600) -> dict:
    """Start `copies` probe processes, let them time together once all are ready, and average their speeds."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", "from vggdepth.grid import _probe_child; _probe_child()", request],
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
                out, _ = child.communicate(timeout=timeout_s)
                answers.append(json.loads(out.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                raise GridError(f"{what} did not finish in {timeout_s:.0f} s") from None
            except (ValueError, IndexError):
                raise GridError(f"{what} failed: {_tail(child)}") from None
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
    copies: int  # runs it trains at once, as many as were timed together
    speeds: dict
    seconds: dict[str, float]  # per run
    estimate: float


def measure(params: Params, startable: list[PlannedRun], packing: Packing, sizes: dict, *, together: bool) -> Trial:
    """Probe `packing` (as many copies at once as it would train when `together`, else one) and predict."""
    copies = min(packing.slots, len(startable))
    speeds = probe_throughput(params, startable, packing.device, packing.threads, copies if together else 1)
    seconds = run_seconds(params, startable, speeds, sizes)
    return Trial(packing, copies, speeds, seconds, makespan(list(seconds.values()), packing.slots))


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} hours"


def plan_lines(
    planned: list[PlannedRun], packing: Packing, trials: list[Trial], where: str, probe_seconds: float = 0.0
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


# ---- Ray ----------------------------------------------------------------------------------------------------


def ray_address(params: Params) -> str | None:
    """The cluster to use: $RAY_ADDRESS, else `grid.address`; None for a local instance."""
    address = os.environ.get(ADDRESS_ENV) or params.grid.address
    if address in ("local", ""):
        return None
    if address.startswith("ray://"):
        raise GridError(
            f"{address}: the grid needs the driver on a node of the cluster (its recorder writes runs/ on the "
            "driver's disk), which Ray Client (ray://) does not give. Join this machine to the cluster with `ray "
            "start --address=<head>:6379` and set RAY_ADDRESS to that host:port (or 'auto')"
        )
    return address


def _loopback_only() -> None:
    """Make a local Ray instance bind every process to 127.0.0.1 (Ray picks the primary address by default),
    and never report usage over the network. Read when Ray is imported: call before that."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # with it off, Ray's node address is the loopback one
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _is_loopback(address: str) -> bool:
    """Whether a cluster address is on this machine's loopback interface (a test or single-host cluster)."""
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_answers(address: str, timeout_s: float = 10) -> None:
    """Fail at once when nothing listens at a cluster address (Ray itself retries for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise GridError(f"Ray cluster address {address!r}: expected host:port (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise GridError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start it (`ray start --head`), or "
            f"unset {ADDRESS_ENV} and set grid.address: local to train on this machine"
        ) from None


def start_ray(address: str | None):
    """`ray.init` on a local instance (127.0.0.1 only) or the given cluster; returns the ray module."""
    if address is not None and address != "auto":
        _check_answers(address)
    if address is None or _is_loopback(address):
        _loopback_only()
    import ray

    if ray.is_initialized():
        return ray
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address is None:
            cpus, gpus, _ = local_resources()  # what the plan packed for, whatever Ray would count itself
            ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=int(cpus), num_gpus=int(gpus), **options)
        else:
            package = Path(__file__).resolve().parent
            ray.init(address=address, runtime_env={"py_modules": [str(package)]}, **options)
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = ""
        if "token" in text.lower() or "auth" in text.lower():
            hint = (
                "; the cluster uses token authentication: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its "
                "token, as written in ~/.ray/auth_token on its head node"
            )
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
        raise GridError(f"cannot start {where}: {text}{hint}") from None
    return ray


def cluster_resources(ray) -> tuple[float, float, float]:
    """(CPUs, GPUs, CPUs of the largest node) of the cluster's live nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    largest = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    return cpus, gpus, largest


def local_resources() -> tuple[float, float, float]:
    """(CPUs, GPUs, CPUs of the largest node) of this machine, as a local Ray instance would see them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus, torch.cuda.device_count(), cpus


def plan(params: Params, data: PreparedData, runs: Path, *, probe: bool = True) -> list[str]:
    """What the grid would do now, changing nothing: the stale runs, their packing and (probed on this machine)
    about how long they take."""
    planned = plan_runs(params, runs, data.stats, arrange=False)
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


def packing_and_plan(
    params: Params, data: PreparedData, planned: list[PlannedRun], resources: tuple, address: str | None, *, probe: bool
) -> tuple[Packing, list[str], dict[str, float]]:
    """The packing of the stale runs on `resources` (CPUs, GPUs, CPUs of the largest node), the plan's lines and
    each run's predicted seconds (empty without `probe`). On this machine's CPU with `threads_per_run: auto`, the
    probe measures every packing worth trying (`thread_choices`, as many runs at once as it would train) and the
    one with the shortest predicted wall time wins: one run per core is the most images per second while every
    core is busy, more threads per run win when the runs are fewer than the cores or end unevenly. Without a
    probe, or on a cluster (whose nodes this machine cannot time): one thread per run and one run per CPU, the CPUs
    shared out when the runs are fewer."""
    startable = [r for r in planned if r.stale and not r.problem]
    cpus, gpus, node_cpus = resources
    packing = choose_packing(params, cpus, gpus, node_cpus, len(startable))
    if not (probe and startable):
        return packing, plan_lines(planned, packing, [], _where(address)), {}
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
    lines = plan_lines(planned, chosen.packing, trials, _where(address), time.monotonic() - started)
    return chosen.packing, lines, chosen.seconds


def _where(address: str | None) -> str:
    return "this machine (Ray on 127.0.0.1)" if address is None else f"the Ray cluster at {address}"


# ---- the worker side ----------------------------------------------------------------------------------------


class Relay(Callback):
    """On the worker: sends each epoch's new files, and the run's events, to the recorder on the driver's node.
    Every call waits for the recorder, so the driver's folder holds an epoch before the next one starts."""

    def __init__(self, recorder, name: str, files: RunFiles, node_id: str):
        self.recorder, self.name, self.files, self.node_id = recorder, name, files, node_id
        self.sent: dict[str, tuple] = {}
        self._changed()  # the files it started from came from the driver's folder: nothing to send back

    def _changed(self) -> dict[str, bytes | None]:
        """The files changed since the last call, by content; None for a `previous.pt` that is the `last.pt`
        already sent, renamed (the trainer keeps its last checkpoint so): the recorder renames its copy too."""
        changed: dict[str, bytes | None] = {}
        for relative in TRAINING_FILES:
            path = self.files.root / relative
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if self.sent.get(relative) != signature:
                renamed = relative == PREVIOUS and signature == self.sent.get(LAST)  # LAST comes after it
                changed[relative] = None if renamed else path.read_bytes()
                self.sent[relative] = signature
        return changed

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.recorder, method).remote(self.name, self._changed(), *args))

    def on_run_start(self, run: RunInfo) -> None:
        run.extra.update(self._call("run_start", run, self.node_id))

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None:
        self._call("epoch_end", record, gradients)

    def on_run_end(self, run: RunInfo, summary: dict) -> None:
        self._call("run_end", summary)

    def on_run_error(self, run: RunInfo, error: BaseException) -> None:
        self._call("run_error", str(error) or type(error).__name__, isinstance(error, KeyboardInterrupt))


class GridWorker:
    """One slot of the grid (a Ray actor holding the packing's CPUs, or GPU share, for the whole grid): trains
    the runs the driver gives it, one after another. Long-lived on purpose: Ray lends a task's CPUs to the next
    task while the task waits on `ray.get`, and a task per run starts a process per run (importing torch) while
    others train; both put more runs than cores on the machine (measured: 3 on 2 cores, each 40% slower)."""

    def train(
        self, params: Params, variant: str, seed: int, data: PreparedData, start: dict[str, bytes], recorder, packing
    ) -> dict:
        """One run: the checkpoints it resumes from (`start`) and the data arrive as arguments; it trains in a
        temporary folder and relays every epoch to the recorder. Returns its summary."""
        import ray

        name = f"{variant}-s{seed}"
        runtime = params.runtime.model_copy(update={"threads": packing.threads, "device": packing.device})
        with tempfile.TemporaryDirectory(prefix=f"vggdepth-{name}-{os.getpid()}-") as tmp:
            files = RunFiles(Path(tmp) / name)
            for relative, blob in start.items():
                path = files.root / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)
            relay = Relay(recorder, name, files, ray.get_runtime_context().get_node_id())
            with warnings.catch_warnings():  # the object store's arrays are read-only; training never writes them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                trainer = train_run(
                    params.model_copy(update={"runtime": runtime}), variant, seed, data, files.root, [relay]
                )
            return trainer.summary()


# ---- the driver's node --------------------------------------------------------------------------------------


class Recorder:
    """On the driver's node (a Ray actor): writes what the runs relay into `runs/`, sends it to MLflow (the one
    writer of the tracking store during a grid), and keeps the progress the driver shows."""

    def __init__(self, params: Params, runs: str, data_dir: str, uri: str | None, root: str, context, node_id: str):
        self.messages: list[str] = []  # warnings and errors, shown by the driver (worker output is not)
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")
        logging.getLogger("vggdepth").addHandler(handler)
        self.runs, self.data_dir, self.node_id = Path(runs), Path(data_dir), node_id
        self.context = context
        self.store = None
        if uri is not None:
            from vggdepth.tracking.store import Store

            self.store = Store(params.tracking, uri=uri, root=Path(root))
        self.open: dict[str, tuple[RunInfo, Callback | None]] = {}
        self.trained: dict[str, int] = {}  # epochs each run trained in this grid

    def _write(self, name: str, changed: dict[str, bytes | None]) -> None:
        root = self.runs / name
        for relative in TRAINING_FILES:
            if relative not in changed:
                continue
            if changed[relative] is None:  # the last checkpoint became the previous one (Relay._changed)
                os.replace(root / LAST, root / relative)
                continue
            with atomic_path(root / relative) as tmp:
                tmp.write_bytes(changed[relative])

    def run_start(self, name: str, changed: dict[str, bytes], run: RunInfo, node_id: str) -> dict:
        self._write(name, changed)
        run.files = RunFiles(self.runs / name)
        callback = None
        if self.store is not None:
            from vggdepth.tracking.callback import MlflowCallback

            callback = MlflowCallback(
                self.store,
                self.context,
                f"train@{run.variant}-{run.seed}",
                self.data_dir,
                system_metrics=node_id == self.node_id,  # it samples this machine: right only for runs on it
            )
            callback.on_run_start(run)
        self.open[name] = (run, callback)
        self.trained[name] = 0
        return run.extra

    def epoch_end(self, name: str, changed: dict[str, bytes], record: EpochRecord, gradients: list) -> None:
        self._write(name, changed)
        run, callback = self.open[name]
        run.history.append(record)
        run.gradients.extend(gradients)
        self.trained[name] += 1
        if callback is not None:
            callback.on_epoch_end(run, record, gradients)

    def run_end(self, name: str, changed: dict[str, bytes], summary: dict) -> None:
        self._write(name, changed)
        run, callback = self.open.pop(name)
        if callback is not None:
            callback.on_run_end(run, summary)

    def run_error(self, name: str, changed: dict[str, bytes], message: str, interrupted: bool) -> None:
        self._write(name, changed)
        self.lost(name, message, interrupted)

    def lost(self, name: str, message: str, interrupted: bool = False) -> None:
        """A run that ended without finishing (an error, or its worker died): close its MLflow run."""
        run, callback = self.open.pop(name, (None, None))
        if callback is not None:
            error = KeyboardInterrupt() if interrupted else GridError(message)
            callback.on_run_error(run, error)

    def state(self) -> tuple[int, list[str]]:
        """Epochs trained in this grid, all runs together, and the warnings logged since the last call."""
        messages, self.messages = self.messages, []
        return sum(self.trained.values()), messages


# ---- the driver ---------------------------------------------------------------------------------------------


@dataclass
class GridResult:
    trained: dict[str, dict] = field(default_factory=dict)  # run name -> summary
    failed: dict[str, str] = field(default_factory=dict)  # run name -> why
    seconds: float = 0.0


def _reason(exc: BaseException) -> str:
    """The one line a user needs from a failed Ray task: the run's own error, or how its worker was lost."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        text = str(cause).strip().splitlines()
        if isinstance(cause, VggdepthError) and text:
            return text[0]
        return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return "its worker process died (killed, or out of memory); resumes from its last epoch when re-run"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


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
    params: Params, data: PreparedData, data_dir: Path, runs: Path, *, probe: bool = True
) -> tuple[GridResult, list[PlannedRun], Packing]:
    """Train every stale run of the grid concurrently; returns what trained, what failed and the plan."""
    runs = runs.resolve()
    planned = plan_runs(params, runs, data.stats)
    stale = [r for r in planned if r.stale]
    result = GridResult()
    address = ray_address(params)
    if not stale:
        say = "grid: every run is trained to train.epochs; nothing to do"
        print(say, file=sys.stderr, flush=True)
        return result, planned, Packing("cpu", 0, 0, 0, 0)

    store = context = None
    if params.tracking.enabled:  # before Ray: an unusable store stops the grid at once; experiment and parent
        from vggdepth.tracking.store import PipelineContext, open_store  # run exist before concurrent writers start

        store = open_store(params)
        context = PipelineContext.detect(params)
        store.parent_run(context)

    if address is None:  # this machine: probed before Ray's processes start, so they do not slow the probe
        packing, lines, seconds = packing_and_plan(params, data, planned, local_resources(), address, probe=probe)
    ray = start_ray(address)
    try:
        if address is not None:
            packing, lines, seconds = packing_and_plan(
                params, data, planned, cluster_resources(ray), address, probe=probe
            )
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        longest_first = sorted(stale, key=lambda run: -seconds.get(run.name, 0.0))  # the last to start is short
        result = _launch(ray, params, data, data_dir, runs, longest_first, packing, store, context)
    finally:
        ray.shutdown()
    return result, planned, packing


def _launch(ray, params, data, data_dir, runs, stale, packing, store, context) -> GridResult:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = time.monotonic()
    node_id = ray.get_runtime_context().get_node_id()
    recorder = (
        ray.remote(Recorder)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        .remote(
            params,
            str(runs),
            str(data_dir.resolve()),
            store.uri if store is not None else None,
            str(store.root) if store is not None else "",
            context,
            node_id,
        )
    )
    try:  # the recorder opens the tracking store in its own process: its failure is the grid's, said once
        ray.get(recorder.state.remote())
    except ray.exceptions.RayActorError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise GridError(f"the grid's recorder could not start on this node: {lines[-1] if lines else exc}") from None
    worker_class = ray.remote(GridWorker).options(
        num_cpus=packing.cpus, num_gpus=packing.gpus, max_restarts=0, max_task_retries=0
    )
    data_ref = ray.put(data)
    result = GridResult()
    queue = []
    for run in stale:
        if run.problem:
            result.failed[run.name] = run.problem
        else:
            queue.append(run)
    progress = _Progress(queue, len(data.train))
    for name, why in result.failed.items():
        progress.say(f"grid: {name} FAILED: {why}")

    def start(worker, run: PlannedRun):
        checkpoints = {
            rel: (run.files.root / rel).read_bytes()
            for rel in TRAINING_FILES
            if rel.startswith("checkpoints/") and (run.files.root / rel).exists()
        }
        return worker.train.remote(params, run.variant, run.seed, data_ref, checkpoints, recorder, packing)

    pending = {}  # one run per worker at a time; a worker takes the next run when its run ends
    for _ in range(min(packing.slots, len(queue))):
        worker = worker_class.remote()
        run = queue.pop(0)
        pending[start(worker, run)] = (worker, run)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in done:
                worker, run = pending.pop(ref)
                try:
                    summary = ray.get(ref)
                except Exception as exc:
                    result.failed[run.name] = _reason(exc)
                    ray.get(recorder.lost.remote(run.name, result.failed[run.name]))
                    progress.say(f"grid: {run.name} FAILED: {result.failed[run.name]}")
                    if isinstance(exc, ray.exceptions.RayActorError):  # its process died: the next run gets a new one
                        worker = worker_class.remote()
                else:
                    result.trained[run.name] = summary
                    progress.say(
                        f"grid: {run.name} done: val acc {summary['val_acc']:.4f} (best "
                        f"{summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}), "
                        f"{summary['images_per_second']:.0f} img/s on {summary['node']}"
                    )
                if queue:
                    following = queue.pop(0)
                    pending[start(worker, following)] = (worker, following)
            epochs, messages = ray.get(recorder.state.remote())
            for message in messages:
                progress.say(message)
            progress.update(epochs, len(result.trained) + len(result.failed))
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
