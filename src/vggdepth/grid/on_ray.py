"""The grid on Ray: a local instance bound to 127.0.0.1, or a cluster this machine is a node of; a long-lived
`GridWorker` actor per slot, the recorder an actor on the driver's node."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vggdepth import signals
from vggdepth.config import Params
from vggdepth.grid.plan import GridError, PlannedRun, local_resources
from vggdepth.grid.workers import WORKER_DIED, Recorder, reason, train_group

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"

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
            package = Path(__file__).resolve().parents[1]  # the vggdepth package
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
    signals.reinstall()  # ray.init made SIGTERM a bare sys.exit: an interruption again (vggdepth.signals)
    return ray


def cluster_resources(ray) -> tuple[float, float, float]:
    """(CPUs, GPUs, CPUs of the largest node) of the cluster's live nodes."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    largest = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    return cpus, gpus, largest


class GridWorker:
    """One slot of the grid (a Ray actor holding the packing's CPUs, or GPU share, for the whole grid): trains
    the groups the driver gives it, one after another. Long-lived on purpose: Ray lends a task's CPUs to the next
    task while the task waits on `ray.get`, and a task per run starts a process per run (importing torch) while
    others train; both put more runs than cores on the machine (measured: 3 on 2 cores, each 40% slower)."""

    def train(self, params, group, data, starts, recorder, packing, deadline=None) -> list[tuple[str, dict | str]]:
        import ray

        def call(method: str, *args):
            return ray.get(getattr(recorder, method).remote(*args))

        node_id = ray.get_runtime_context().get_node_id()
        return train_group(params, group, data, starts, packing, call, node_id, deadline)


class RayPool:
    """The groups on Ray: a long-lived `GridWorker` actor per slot, the recorder an actor on the driver's node."""

    def __init__(self, ray, params, data, recorder_args, packing, deadline):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.params, self.packing, self.deadline = ray, params, packing, deadline
        node_id = ray.get_runtime_context().get_node_id()
        self.recorder = (
            ray.remote(Recorder)
            .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            .remote(*recorder_args, node_id)
        )
        try:  # the recorder opens the tracking store in its own process: its failure is the grid's, said once
            ray.get(self.recorder.state.remote())
        except ray.exceptions.RayActorError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise GridError(
                f"the grid's recorder could not start on this node: {lines[-1] if lines else exc}"
            ) from None
        self.worker_class = ray.remote(GridWorker).options(
            num_cpus=packing.cpus, num_gpus=packing.gpus, max_restarts=0, max_task_retries=0
        )
        self.data_ref = ray.put(data)
        self.pending: dict = {}  # task -> (worker, group)
        self.idle: list = []

    def submit(self, group: list[PlannedRun], starts: dict) -> None:
        worker = self.idle.pop() if self.idle else self.worker_class.remote()
        runs = [(r.variant, r.seed) for r in group]
        task = worker.train.remote(self.params, runs, self.data_ref, starts, self.recorder, self.packing, self.deadline)
        self.pending[task] = (worker, group)

    def wait(self, timeout: float) -> list[tuple[list[PlannedRun], list[tuple[str, dict | str]] | str]]:
        done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        ended = []
        for task in done:
            worker, group = self.pending.pop(task)
            try:
                ended.append((group, self.ray.get(task)))
                self.idle.append(worker)
            except self.ray.exceptions.RayActorError:  # its process died: the next group gets a new one
                ended.append((group, WORKER_DIED))
            except Exception as exc:
                ended.append((group, ray_reason(self.ray, exc)))
                self.idle.append(worker)
        return ended

    def record(self, method: str, *args):
        return self.ray.get(getattr(self.recorder, method).remote(*args))

    def close(self) -> None:
        """Stop the workers of the groups still training (the grid was interrupted, or failed; each of their runs
        resumes from its last epoch when re-run), and have the recorder close the MLflow runs they left open as
        KILLED. Idle workers end with the driver's Ray job."""
        for worker, _ in self.pending.values():
            self.ray.kill(worker, no_restart=True)
        self.pending.clear()
        try:
            self.ray.get(self.recorder.interrupted.remote(), timeout=60)
        except Exception as exc:  # the recorder died with the rest: the runs stay RUNNING until re-run
            log.warning("could not close the grid's unfinished MLflow runs: %s", exc)


def ray_reason(ray, exc: BaseException) -> str:
    """A failed task's one line: the error under Ray's wrappers. A worker's call to the recorder that failed (a
    full disk on the driver's node) reaches the driver wrapped twice, and Ray's type name is no help to a user."""
    while isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) not in (None, exc):
        exc = exc.cause
    if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return WORKER_DIED
    return reason(exc)
