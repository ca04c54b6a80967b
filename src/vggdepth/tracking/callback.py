"""The training run in MLflow: a callback of the training loop (`MlflowCallback`) that opens the run, logs its
params, inputs and every epoch's metrics, and at the end its tables, checkpoints and model. Training never waits on
the store: epochs are queued and sent by a thread of their own, and the run's end waits for them at most one
request's deadline (`Store.deadline_s`); what is still queued then is said, and `sync` sends it later. Its
artefacts and model take a deadline a request, the model `Store.operation_cap_s` in all. Runs ending while others
still train (a fused group, a grid) end side by side, in threads of their own."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from vggdepth.checkpoints import load_checkpoint
from vggdepth.config import Params
from vggdepth.gradients import GradientRow
from vggdepth.runs import Callback, EpochRecord, RunFiles, RunInfo
from vggdepth.tracking.store import (
    NODE_TAG,
    PRECISION_TAG,
    RUN_ID_KEY,
    Attempt,
    DeadlineError,
    Late,
    PipelineContext,
    Store,
    config_params,
    epoch_metrics,
    open_store,
    pending_epochs,
    short,
    store_errors,
    within,
)

log = logging.getLogger(__name__)


def served_data(data_dir: Path) -> tuple[list[str], np.ndarray | None]:
    """The class names and two real test images (the input example) of the prepared data; with a warning, the
    classes by number and no example when the prepared data is not there."""
    from vggdepth.data import load_prepared
    from vggdepth.serving import input_example

    try:
        data = load_prepared(data_dir)
    except Exception as exc:
        log.warning(
            "the model is logged without class names or an input example: no prepared data at %s (%s)",
            data_dir,
            short(exc),
        )
        return [f"class {i}" for i in range(100)], None
    return list(data.classes), input_example(data.test.images)


def log_run_artifacts(
    store: Store, run_id: str, files: RunFiles, *, model: bool = True, data_dir: Path | None = None
) -> None:
    """Tables, checkpoints and the best checkpoint as an MLflow PyTorch model, named after the run
    (`BN-VGG-38-s0`), in the run's experiment, with real test images (`data_dir`) as input example. (Each run's
    gradient-flow figure comes with the report stage: tracking.report.)"""
    import mlflow
    import torch

    client = store.client
    log_tables(store, run_id, files)
    client.log_artifact(run_id, str(files.best), "checkpoints")
    client.log_artifact(run_id, str(files.last), "checkpoints")
    if store.cfg.log_model and model:
        from vggdepth.serving import INPUTS, signature

        best = load_checkpoint(files.best)
        classes, example = served_data(data_dir or store.root / "data" / "prepared")
        owner = client.get_run(run_id).info

        def log_model():
            # A logged model belongs to the active experiment, not to the run given by id: make it the run's.
            mlflow.set_experiment(experiment_id=owner.experiment_id)
            # Raw uint8 images in, probabilities by class name out (vggdepth.serving); the weights travel as the
            # checkpoint, loaded with weights_only, and the code as the vggdepth package.
            return mlflow.models.Model.log(  # mlflow.pyfunc.log_model, for a run given by id
                artifact_path=None,
                flavor=mlflow.pyfunc,
                name=owner.run_name,  # `<variant>-s<seed>`
                python_model=str(Path(__file__).parents[1] / "served_model.py"),  # code, not a pickle
                artifacts={"checkpoint": str(files.best), "inputs": str(inputs)},
                signature=signature(classes),
                input_example=example,
                code_paths=[str(Path(__file__).parents[1])],  # the vggdepth package
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "pydantic>=2"],
                run_id=run_id,
                step=best["epoch"] - 1,  # the epoch whose weights these are
            )

        with tempfile.TemporaryDirectory() as tmp:
            inputs = Path(tmp) / INPUTS
            inputs.write_text(json.dumps({"classes": classes, "mean": best["mean"], "std": best["std"]}))
            info = store.call("log the model", log_model, each_request=True)
        client.set_tag(run_id, "vggdepth.model_uri", info.model_uri)
        client.set_tag(run_id, "vggdepth.model_epoch", str(best["epoch"] - 1))


def log_tables(store: Store, run_id: str, files: RunFiles) -> None:
    """A run's tables: epochs, gradients, summary."""
    for path in files.outputs:
        store.client.log_artifact(run_id, str(path))


def _ended_by(error: BaseException) -> tuple[str, str]:
    """The MLflow status of a run that `error` stopped (a stop, SIGTERM or Ctrl-C: KILLED; else FAILED), and the
    error as its `vggdepth.error` tag says it."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", str(error)[:5000] or type(error).__name__


def _finished(run: RunInfo) -> bool:
    """Whether this process trains nothing: the run was complete in its checkpoint."""
    return run.start_epoch >= run.config["train"]["epochs"]


def complete_run_artifacts(store: Store, run_id: str, files: RunFiles, data_dir: Path | None = None) -> bool:
    """Log the artefacts and the model only when the MLflow run lacks them; return whether anything was sent."""
    has_files = bool(store.client.list_artifacts(run_id))
    has_model = bool(store.client.get_run(run_id).data.tags.get("vggdepth.model_uri"))
    if has_files and (has_model or not store.cfg.log_model):
        return False
    log_run_artifacts(store, run_id, files, model=not has_model, data_dir=data_dir)
    return True


class _Ends:
    """The trackers of this process whose run is open, and the ends of runs that go on in threads of their own.

    The training loop tells its callbacks one run after another: the runs of a fused group (vggdepth.fused), the
    runs a grid's recorder follows. A tracker's end waits on the store (its queued epochs, its artefacts, its
    status), so ending in the caller's thread would hold every run still training, and N runs ending together
    would wait N deadlines one after another. So a run that ends while others are open stops its queue at once
    and ends in a thread of its own, and the caller goes on; the last open run to end stops its queue, ends in
    the caller's thread and then waits for those threads. They all ran side by side, each within its own bound
    from when its queue stopped: the wait is one bound, not N. Nothing in an end waits without a bound, so the
    threads end by themselves; they are not daemons, so the process waits for them before it exits."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open: set[MlflowCallback] = set()
        self.under_way: list[threading.Thread] = []

    def opened(self, tracker: MlflowCallback) -> None:
        with self.lock:
            self.open.add(tracker)

    def end(self, tracker: MlflowCallback, name: str, work) -> None:
        """`work()`, the end of `tracker`'s run: in a thread of its own while other runs are open, else here, and
        then every end still under way waited for."""
        with self.lock:
            self.open.discard(tracker)
            if self.open:
                thread = threading.Thread(target=work, name=f"vggdepth-mlflow end {name}")
                thread.start()
                self.under_way = [t for t in self.under_way if t.is_alive()] + [thread]
                return
            others, self.under_way = self.under_way, []
        try:
            work()
        finally:
            for thread in others:
                thread.join()  # bounded: every wait of an end is


_ENDS = _Ends()


class MlflowCallback(Callback):
    """Sends a training run to MLflow. The run is opened before training (a store that cannot be used stops the
    stage there); then the training thread only queues: a thread of this callback sends each epoch, so a store
    that is slow, silent or gone never slows training. An epoch the store does not take stays queued and is sent
    with the next one once it answers again.

    At the run's end its queue stops, and the queued epochs are waited for at most one request's deadline from
    then (`Store.deadline_s`, from `tracking.request_timeout_s` and `tracking.request_retries`). Then, if they were
    all taken, its tables, checkpoints and model are sent (each request within the deadline, the model within
    `Store.operation_cap_s`: a large upload takes what it takes) and its status; whatever MLflow still lacks is
    said in one line: `python -m vggdepth sync` sends it from the run's outputs. Runs that end while others train
    (a fused group, a grid) end side by side without holding the training loop (`_Ends`)."""

    def __init__(
        self, store: Store, context: PipelineContext, stage: str, data_dir: Path, *, system_metrics: bool = True
    ):
        self.store, self.context, self.stage, self.data_dir = store, context, stage, data_dir
        # Sampled in this process: only meaningful where the run trains (the grid turns it off for other nodes).
        self.system_metrics = system_metrics and store.cfg.system_metrics
        self.client = store.client
        self.run_id = ""
        self.lock = threading.Lock()
        self.pending: list[tuple[int, list]] = []  # (epoch, metrics) not sent yet, oldest first; under `lock`
        self.wake = threading.Event()  # tells the sender that epochs were queued, or that it is to stop
        self.stopping = False  # under `lock`: the sender sends what is queued once more, then ends
        self.sender: threading.Thread | None = None
        self.problem = ""  # why the last epoch was not sent
        self.offline_since: int | None = None
        self.monitor = None
        self.monitor_stop: Attempt | None = None  # the system metrics' monitor being stopped

    # -- hooks --------------------------------------------------------------------------------------------------

    def on_run_start(self, run: RunInfo) -> None:
        self.run_id, created = self.store.training_run(self.context, run, self.stage)
        run.extra[RUN_ID_KEY] = self.run_id
        try:
            resumed = self._start(run, created)
        except BaseException as error:  # the run stops before its epochs: its MLflow run is not left running
            if not _finished(run):  # (a finished run's status stays what it was)
                status, message = _ended_by(error)
                closed, why = self._close(status, None, error=message)
                if not closed:
                    log.warning("MLflow run %s of %s could not be closed as %s: %s", self.run_id, run.name, status, why)
            raise
        self._enqueue(resumed)
        self.sender = threading.Thread(target=self._send_loop, name=f"vggdepth-mlflow {run.name}", daemon=True)
        self.sender.start()
        if self.monitor is not None:
            self.monitor.start()
        _ENDS.opened(self)
        log.info("tracking %s-s%d in MLflow run %s at %s", run.variant, run.seed, self.run_id, self.store.uri)

    def _start(self, run: RunInfo, created: bool) -> list[tuple[int, list]]:
        """A new run's params and inputs, the run's tags for this training, its system metrics' monitor; the
        epochs restored from the checkpoint that MLflow has not seen."""
        with store_errors(self.store.uri, f"record the params and inputs of {run.variant}-s{run.seed}"):
            if created:
                self.client.log_batch(self.run_id, params=config_params(run.config))
                self._log_inputs(run)
            # A resumed run: epochs restored from its checkpoint that MLflow has not seen (killed before logging them).
            resumed = pending_epochs(run.history, run.gradients, self.store.logged_epochs(self.run_id))
            if not _finished(run):
                self.client.set_tag(self.run_id, NODE_TAG, run.node)
                self.client.set_tag(self.run_id, PRECISION_TAG, run.precision)
            if self.system_metrics and not _finished(run):
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = self.store.call(
                    "resume the system metrics",
                    SystemMetricsMonitor,
                    self.run_id,
                    resume_logging=not created,
                    tracking_uri=self.store.uri,
                )
        return resumed

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None:
        self._enqueue([(record.epoch, epoch_metrics(record, gradients))])

    def on_run_end(self, run: RunInfo, summary: dict) -> None:
        deadline = self._stop()
        _ENDS.end(self, run.name, lambda: self._conclude(run, summary, deadline))

    def on_run_error(self, run: RunInfo, error: BaseException) -> None:
        deadline = self._stop()
        # Stopped before its MLflow run was opened, there is nothing to close or report (but other runs' ends wait).
        work = (lambda: self._abandon(run, error, deadline)) if self.run_id else (lambda: None)
        _ENDS.end(self, run.name, work)

    # -- ending -------------------------------------------------------------------------------------------------

    def _stop(self) -> float:
        """Stop the queue and the system metrics at once, without waiting; the end of the wait for them
        (monotonic): one deadline from now."""
        deadline = time.monotonic() + self.store.deadline_s
        if self.monitor is not None:  # its thread may itself be waiting on the store
            self.monitor_stop = Attempt("vggdepth-mlflow system metrics", self.monitor.finish)
            self.monitor = None
        with self.lock:
            self.stopping = True
        self.wake.set()
        return deadline

    def _conclude(self, run: RunInfo, summary: dict, deadline: float) -> None:
        """The end of a run that trained to its last epoch: its epochs by `deadline`; its artefacts and model if
        the store took them all; its status."""
        answers, reason = self._wait_sent(deadline)
        artefacts = False
        if answers:  # everything queued was taken: the store answers
            try:
                self.client.set_tag(self.run_id, NODE_TAG, summary["node"])
                if _finished(run):  # nothing trained: the outputs were restored; send only what MLflow lacks
                    complete_run_artifacts(self.store, self.run_id, run.files, self.data_dir)
                else:
                    log_run_artifacts(self.store, self.run_id, run.files, data_dir=self.data_dir)
                artefacts = True
            except DeadlineError as exc:  # it stopped answering: asking again would only wait again
                answers, reason = False, str(exc)
            except Exception as exc:  # tracking must never cost the run its outputs
                reason = f"MLflow at {self.store.uri} failed: {short(exc)}"
        # A finished run stays finished (`sync` sends what it lacks); one that lacks epochs or artefacts failed.
        status = "FINISHED" if artefacts or _finished(run) else "FAILED"
        # A store that did not answer in time gets what is left of the bound for the status, if anything.
        closed, why = self._close(status, None if answers else deadline)
        missing = [] if artefacts else ["its artefacts and model"]
        self._report(run, missing, closed, status, why or reason)

    def _abandon(self, run: RunInfo, error: BaseException, deadline: float) -> None:
        """The end of a run stopped before its last epoch: its status first (a stopped stage, SIGTERM or Ctrl-C,
        gets it within the bound, queued epochs or not), then its epochs, both by `deadline`."""
        status, message = _ended_by(error)
        closed, why = self._close(status, deadline, error=message)
        _, late = self._wait_sent(deadline)
        self._report(run, [], closed, status, why or late, finished=False)

    # -- sending ------------------------------------------------------------------------------------------------

    def _enqueue(self, epochs: list[tuple[int, list]]) -> None:
        """The training thread's part: add to what is to be sent, and wake the sender. Never blocks, never
        fails: the queue has no bound (an epoch's metrics are a few hundred numbers)."""
        if epochs:
            with self.lock:
                self.pending.extend(epochs)
            self.wake.set()

    def _send_loop(self) -> None:
        """The sender: whatever is queued, in order, each time it is woken, until the stop."""
        while True:
            self.wake.wait()
            self.wake.clear()
            with self.lock:
                stopping = self.stopping
            self._send_pending()
            if stopping:
                return

    def _send_pending(self) -> None:
        """Send the epochs not sent yet, oldest first, each within the store's deadline; stop at the first the
        store does not take: it is sent again with the next epoch, or at the end. A request past its deadline is
        abandoned, never waited for again (one that trickles forever would hold back every later epoch): its
        epoch is sent anew. That may deliver it twice, which is harmless: its metrics keep their timestamps, and
        MLflow keeps one row of identical ones."""
        while True:
            with self.lock:
                if not self.pending:
                    return
                epoch, metrics = self.pending[0]
            try:
                self.client.log_batch(self.run_id, metrics=metrics)  # in chunks of MLflow's limit per batch
            except DeadlineError:
                self._offline(epoch, f"no answer within {self.store.deadline_s:g} s ({self.store.bound()})")
                return
            except Exception as exc:
                self._offline(epoch, short(exc))
                return
            with self.lock:
                self.pending.pop(0)
            if self.offline_since is not None:
                log.warning(
                    "MLflow at %s answers again: sent the epochs queued since epoch %d",
                    self.store.uri,
                    self.offline_since,
                )
                self.offline_since = None

    def _offline(self, epoch: int, problem: str) -> None:
        self.problem = f"MLflow at {self.store.uri}: {problem}"
        if self.offline_since is None:
            self.offline_since = epoch
            log.error(
                "MLflow at %s stopped answering at epoch %d (%s): training goes on; epochs are queued and sent "
                "when it answers again",
                self.store.uri,
                epoch,
                problem,
            )

    def _wait_sent(self, deadline: float) -> tuple[bool, str]:
        """Wait until `deadline` (monotonic) at most for the sender to send what is queued and end, and for the
        system metrics to stop. (whether everything queued was sent, why not)."""
        if self.sender is not None:
            self.sender.join(max(deadline - time.monotonic(), 0.0))
        if self.monitor_stop is not None:
            try:
                self.monitor_stop.result(deadline - time.monotonic())
            except Late:  # its thread waits on the store: left to itself (system metrics are not sent later)
                pass
            except Exception as exc:
                log.warning("could not stop the system metrics of MLflow run %s: %s", self.run_id, short(exc))
        with self.lock:
            if self.sender is not None and self.sender.is_alive():
                return False, (
                    f"MLflow at {self.store.uri} took no more of them within {self.store.deadline_s:g} s "
                    f"({self.store.bound()})"
                )
            return not self.pending, self.problem

    def _close(self, status: str, deadline: float | None, error: str = "") -> tuple[bool, str]:
        """Mark the run `status` (with its `error` as a tag), within one request's deadline, or what is left until
        `deadline`; then the parent run spans it. (closed, why not)."""

        def close() -> None:
            if error:
                self.client.unbounded.set_tag(self.run_id, "vggdepth.error", error)
            self.client.unbounded.set_terminated(self.run_id, status)

        seconds = self.store.deadline_s if deadline is None else deadline - time.monotonic()
        if seconds <= 0:
            return False, ""
        try:
            within(seconds, f"vggdepth-mlflow close {self.run_id}", close)
        except Late:
            return False, f"MLflow at {self.store.uri} gave no answer within {seconds:.3g} s ({self.store.bound()})"
        except Exception as exc:
            return False, f"MLflow at {self.store.uri} failed: {short(exc)}"
        self.store.stage_done(self.run_id)  # a courtesy: each of its requests bounded, its failure only said
        return True, ""

    def _report(
        self, run: RunInfo, missing: list[str], closed: bool, status: str, reason: str, *, finished: bool = True
    ) -> None:
        """One line for whatever MLflow lacks of the run, and how it gets there."""
        with self.lock:
            epochs = [epoch for epoch, _ in self.pending]
        lacking = ([f"epochs {epochs}"] if epochs else []) + missing + ([] if closed else [f"its status {status}"])
        if not lacking:
            return
        sync = f"`python -m vggdepth sync {run.files.root}`"
        how = (
            f"The run's outputs are complete: {sync} sends them"
            if finished
            else f"Its last checkpoint keeps them: resuming the run, or {sync}, sends them"
        )
        log.error(
            "MLflow run %s is missing %s (%s). %s once MLflow answers",
            self.run_id,
            ", ".join(lacking),
            reason or f"{self.store.uri} did not answer",
            how,
        )

    def _log_inputs(self, run: RunInfo) -> None:
        """The data set of each split, with the archive's md5 as digest and the split as context."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        data = run.config["data"]
        with warnings.catch_warnings():  # "file" and "" both map to the local source: either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(self.data_dir.resolve().as_uri())
        inputs = []
        for split in ("train", "val", "test"):
            dataset = MetaDataset(source=source, name=f"cifar-100-{split}", digest=data["archive_md5"])
            tags = [InputTag("mlflow.data.context", split), InputTag("images", str(data["sizes"][split]))]
            inputs.append(DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags))
        self.client.log_inputs(self.run_id, datasets=inputs)


def training_callbacks(params: Params, variant: str, seed: int, data_dir: Path) -> list[Callback]:
    """What watches a training stage: an MLflow callback, or nothing when tracking is off. Fails at once,
    naming the URI, when the tracking store cannot be reached."""
    store = open_store(params)
    if store is None:
        return []
    stage = os.environ.get("DVC_STAGE", f"train@{variant}-{seed}")
    return [MlflowCallback(store, PipelineContext.detect(params), stage, data_dir)]
