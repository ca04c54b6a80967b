"""What a grid worker runs, wherever it lives (a Ray actor, or a process of its own): a group of runs trained in a
temporary folder, every epoch relayed to the `Recorder` on the driver's node, which writes the runs' folders and
sends MLflow their epochs; and the deadline a GPU lease sets."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from vggdepth.config import Params
from vggdepth.data import PreparedData
from vggdepth.engine import NonFiniteLossError, make_trainer
from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_path
from vggdepth.fused import FusedTrainer
from vggdepth.gradients import GradientRow
from vggdepth.grid.plan import GridError, Packing
from vggdepth.runs import LAST, PREVIOUS, TRAINING_FILES, Callback, EpochRecord, RunFiles, RunInfo

log = logging.getLogger(__name__)

LOCAL = "local"  # the node of a grid without Ray: this machine
WORKER_DIED = "its worker process died (killed, or out of memory); resumes from its last epoch when re-run"


class TimeUp(Exception):
    """A deadline would not hold one more epoch of this run."""


class Deadline(Callback):
    """Stops a run after an epoch when the next one, as long as the last, would end past `deadline` (epoch time)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None:
        if time.time() + record.seconds > self.deadline:
            raise TimeUp(f"{run.variant} seed {run.seed}: stopped after epoch {record.epoch}, the time is spent")


class Relay(Callback):
    """On the worker: sends each epoch's new files, and the run's events, to the recorder on the driver's node
    through `call(method, *args)`. Every call waits for the recorder, so the driver's folder holds an epoch before
    the next one starts."""

    def __init__(self, call, name: str, files: RunFiles, node_id: str):
        self.call, self.name, self.files, self.node_id = call, name, files, node_id
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

    def _send(self, method: str, *args):
        return self.call(method, self.name, self._changed(), *args)

    def on_run_start(self, run: RunInfo) -> None:
        run.extra.update(self._send("run_start", run, self.node_id))

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None:
        self._send("epoch_end", record, gradients)

    def on_run_end(self, run: RunInfo, summary: dict) -> None:
        self._send("run_end", summary)

    def on_run_error(self, run: RunInfo, error: BaseException) -> None:
        self._send("run_error", str(error) or type(error).__name__, isinstance(error, KeyboardInterrupt))


def reason(error: BaseException) -> str:
    """The one line a user needs from a run's failure: our own errors' first line, else the type and last line."""
    text = str(error).strip().splitlines()
    if isinstance(error, VggdepthError | TimeUp) and text:
        return text[0]
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip().rstrip(":")


def train_group(
    params: Params,
    group: list[tuple[str, int]],
    data: PreparedData,
    starts: dict[str, dict[str, bytes]],
    packing: Packing,
    call,
    node_id: str,
    deadline: float | None = None,
) -> list[tuple[str, dict | str | Diverged]]:
    """One group on a worker: each run's checkpoints (`starts`, by run name) into a temporary folder, then the
    runs trained as one group: fused when several, or one on CUDA with CUDA graphs (its step a graph); else the run
    alone (`throughput.training_loop`'s rule too). Every epoch is relayed through `call`. For each run, its
    summary or why it stopped, as `told` says it (marked when `deadline` stopped it or its loss diverged)."""
    runtime = params.runtime.model_copy(update={"threads": packing.threads, "device": packing.device})
    params = params.model_copy(update={"runtime": runtime})
    names = [f"{v}-s{s}" for v, s in group]
    with tempfile.TemporaryDirectory(prefix=f"vggdepth-{names[0]}-{os.getpid()}-") as tmp:
        trainers = []
        for (variant, seed), name in zip(group, names, strict=True):
            files = RunFiles(Path(tmp) / name)
            for relative, blob in starts.get(name, {}).items():
                (files.root / relative).parent.mkdir(parents=True, exist_ok=True)
                (files.root / relative).write_bytes(blob)
            watchers = [Relay(call, name, files, node_id)] + ([Deadline(deadline)] if deadline else [])
            trainers.append(make_trainer(params, variant, seed, data, files.root, watchers))
        fused = len(trainers) > 1 or (trainers[0].device.type == "cuda" and params.runtime.cuda_graphs)
        with warnings.catch_warnings():  # the object store's arrays are read-only; training never writes them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            if fused:
                group_trainer = FusedTrainer(trainers)
                try:
                    outcomes = group_trainer.fit()
                except Exception as error:  # a failure before or in the fused step: every run stopped with it
                    outcomes = [o if o is not None else error for o in group_trainer.outcome]
            else:
                try:
                    outcomes = [trainers[0].fit()]
                except Exception as error:
                    outcomes = [error]
    return [(name, told(outcome)) for name, outcome in zip(names, outcomes, strict=True)]


STOPPED = "stopped: "  # how an outcome line says a deadline stopped the run


@dataclass(frozen=True)
class Diverged:
    """The outcome of a run whose loss became NaN or infinite (it diverges again when re-run: a result of its
    settings): `what` happened in a few words (the sweep's reason), `why` the whole line (the settings to suspect)."""

    what: str
    why: str


def told(outcome: dict | BaseException) -> dict | str | Diverged:
    """A run's outcome as the driver takes it: its summary; `Diverged` when its loss diverged; else why it ended in
    one line, marked `STOPPED` when a deadline stopped it (it resumes when re-run)."""
    if isinstance(outcome, dict):
        return outcome
    if isinstance(outcome, NonFiniteLossError):
        return Diverged(outcome.what, reason(outcome))
    return (STOPPED if isinstance(outcome, TimeUp) else "") + reason(outcome)


class Recorder:
    """On the driver's node (a Ray actor, or in the driver itself without Ray): writes what the runs relay into
    `runs/`, sends it to MLflow (the one writer of the tracking store during a grid), and keeps the progress the
    driver shows."""

    def __init__(self, params: Params, runs: str, data_dir: str, uri: str | None, root: str, context, node_id: str):
        self.messages: list[str] = []  # warnings and errors, shown by the driver (a Ray actor's output is not)
        if node_id != LOCAL:  # in the driver's own process its logging shows them already
            handler = logging.Handler(logging.WARNING)
            handler.emit = lambda r: self.messages.append(f"{r.levelname} {r.name}: {r.getMessage()}")
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
                self.context.stage or f"train@{run.variant}-{run.seed}",
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

    def interrupted(self) -> list[str]:
        """The grid was stopped: close the MLflow runs still open as KILLED (each resumes when re-run)."""
        names = list(self.open)
        for name in names:
            self.lost(name, "the grid was interrupted", interrupted=True)
        return names

    def state(self) -> tuple[int, list[str]]:
        """Epochs trained in this grid, all runs together, and the warnings logged since the last call."""
        messages, self.messages = self.messages, []
        return sum(self.trained.values()), messages
