"""The grid without Ray, on this machine: a fresh process per group (a crash or a CUDA error stays in it), the
recorder in the driver, answering each process over a local connection (127.0.0.1, with a random key)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import torch

from vggdepth.config import Params
from vggdepth.grid.plan import GridError, Packing, PlannedRun
from vggdepth.grid.workers import LOCAL, WORKER_DIED, Recorder, reason, train_group

log = logging.getLogger(__name__)


def process_group(request: dict, address: tuple, authkey: bytes, results) -> None:
    """A group in a process of its own (`ProcessPool`): the prepared data from disk, the recorder over a local
    connection; its outcomes (or why it failed) onto `results`. It ends with the driver: the driver's SIGTERM
    (`ProcessPool.close`), or the driver gone (killed: this process's parent ended), interrupts it as Ctrl-C would
    (vggdepth.signals): its runs' MLflow runs closed as KILLED while the recorder answers, its temporary folder
    removed, its runs resuming from their last epoch when re-run."""
    from multiprocessing.connection import Client

    from vggdepth import signals
    from vggdepth.data import load_prepared

    with signals.handled(watch=True):
        try:
            params = Params.model_validate_json(request["params"])
            connection = Client(address, authkey=authkey)

            def call(method: str, *args):
                connection.send((method, args))
                ok, answer = connection.recv()
                if not ok:
                    raise GridError(f"the grid's recorder refused {method}: {answer}")
                return answer

            data = load_prepared(request["data_dir"])
            packing = Packing(**request["packing"])
            outcomes = train_group(
                params, request["group"], data, request["starts"], packing, call, LOCAL, request["deadline"]
            )
            _send(results, outcomes)
        except KeyboardInterrupt as error:  # a signal, or the driver gone: one line for the driver, if it is there
            why = f"interrupted ({signals.signal_name(error)}); resumes from its last epoch when re-run"
            _send(results, why)
            sys.exit(signals.exit_status(error))
        except Exception as error:  # the driver learns why, in one line, and says it
            _send(results, reason(error))
            sys.exit(1)


def _send(results, outcome) -> None:
    with contextlib.suppress(OSError):  # the driver is gone: nobody to tell
        results.send(outcome)


class ProcessPool:
    """The groups without Ray, on this machine: a fresh process per group (a crash or a CUDA error stays in it),
    the recorder in the driver, answering each process over a local connection (127.0.0.1, with a key)."""

    def __init__(self, params, data_dir, recorder_args, packing, deadline):
        import multiprocessing
        import secrets
        import threading
        from multiprocessing.connection import Listener

        self.params, self.data_dir, self.packing, self.deadline = params, data_dir, packing, deadline
        self.recorder = Recorder(*recorder_args, LOCAL)
        self.lock = threading.Lock()
        self.authkey = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=self.authkey)
        self.context = multiprocessing.get_context("spawn")
        self.pending: dict = {}  # process -> (group, receiving end)
        self.slot_of: dict = {}  # process -> slot (its GPU, when several)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                connection = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection) -> None:
        while True:
            try:
                method, args = connection.recv()
            except (EOFError, OSError):
                return
            try:
                with self.lock:
                    answer = (True, getattr(self.recorder, method)(*args))
            except Exception as exc:
                answer = (False, reason(exc))
            connection.send(answer)

    def submit(self, group: list[PlannedRun], starts: dict) -> None:
        slots = set(range(self.packing.slots)) - set(self.slot_of.values())
        slot = min(slots) if slots else 0
        device = self.packing.device
        if device == "cuda" and torch.cuda.device_count() > 1:
            device = f"cuda:{slot % torch.cuda.device_count()}"
        request = {
            "params": self.params.model_dump_json(),
            "group": [(r.variant, r.seed) for r in group],
            "data_dir": str(self.data_dir),
            "starts": starts,
            "packing": {**self.packing.__dict__, "device": device},
            "deadline": self.deadline,
        }
        receiving, sending = self.context.Pipe(duplex=False)
        env = {"OMP_NUM_THREADS": str(self.packing.threads)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            process = self.context.Process(
                target=process_group, args=(request, self.listener.address, self.authkey, sending), daemon=True
            )
            process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        sending.close()
        self.pending[process] = (group, receiving)
        self.slot_of[process] = slot

    def wait(self, timeout: float) -> list[tuple[list[PlannedRun], list[tuple[str, dict | str]] | str]]:
        from multiprocessing.connection import wait

        ready = wait([p.sentinel for p in self.pending], timeout)
        ended = []
        for process in [p for p in self.pending if p.sentinel in ready]:
            group, receiving = self.pending.pop(process)
            self.slot_of.pop(process)
            try:
                outcome = receiving.recv() if receiving.poll() else WORKER_DIED
            except (EOFError, OSError):
                outcome = WORKER_DIED
            process.join()
            ended.append((group, outcome))
        return ended

    def record(self, method: str, *args):
        with self.lock:
            return getattr(self.recorder, method)(*args)

    def close(self, grace_s: float = 20.0) -> None:
        """Stop the groups still training (the grid was interrupted, or failed): SIGTERM, which each process takes
        as an interruption (its runs tell the recorder, still answering here, and their MLflow runs close as
        KILLED), SIGKILL for one still alive after `grace_s`; then the runs the recorder still has open (a process
        that could not tell it) are closed as KILLED too."""
        for process in self.pending:
            process.terminate()
        deadline = time.monotonic() + grace_s
        for process in self.pending:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self.pending.clear()
        self.slot_of.clear()
        with self.lock:
            self.recorder.interrupted()
        self.listener.close()
