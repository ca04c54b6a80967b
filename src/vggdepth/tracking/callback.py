"""The training run in MLflow: a callback of the training loop (`MlflowCallback`) that opens the run, logs its
params, inputs and every epoch's metrics, and at the end its tables, checkpoints and model. Training never waits on
the store: epochs are queued and sent by a thread of their own, and the run's end waits for them at most one
request's deadline (`Store.deadline_s`); what is still queued then is said, and `sync` sends it later."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from vggdepth.checkpoints import load_checkpoint, load_network
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
)

log = logging.getLogger(__name__)


def input_example(data_dir: Path) -> np.ndarray | None:
    """The model's input example: the first two test images of the prepared data, normalised as the network sees
    them (N x 3 x 32 x 32 float32); None, with a warning, when the prepared data is not there."""
    import torch

    from vggdepth.batches import DeviceDataset
    from vggdepth.data import load_prepared

    try:
        data = load_prepared(data_dir)
    except Exception as exc:
        log.warning("the model is logged without an input example: no prepared data at %s (%s)", data_dir, short(exc))
        return None
    test = DeviceDataset(data.test, data.mean, data.std, torch.device("cpu"))
    return test.normalise(test.images[:2]).contiguous().numpy()


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
        best = load_checkpoint(files.best)
        net = load_network(best, torch.device("cpu"))
        example = input_example(data_dir or store.root / "data" / "prepared")
        owner = client.get_run(run_id).info

        def log_model():
            # A logged model belongs to the active experiment, not to the run given by id: make it the run's.
            mlflow.set_experiment(experiment_id=owner.experiment_id)
            # Pickled, not torch.export: load_model gives back the nn.Module, and the code travels with it.
            return mlflow.pytorch.log_model(
                net,
                name=owner.run_name,  # `<variant>-s<seed>`
                input_example=example,
                serialization_format="pickle",
                code_paths=[str(Path(__file__).parents[1])],  # the vggdepth package
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pydantic>=2", "pyyaml"],
                run_id=run_id,
                step=best["epoch"] - 1,  # the epoch whose weights these are
            )

        info = store.call("log the model", log_model, each_request=True)
        client.set_tag(run_id, "vggdepth.model_uri", info.model_uri)
        client.set_tag(run_id, "vggdepth.model_epoch", str(best["epoch"] - 1))


def log_tables(store: Store, run_id: str, files: RunFiles) -> None:
    """A run's tables: epochs, gradients, summary."""
    for path in files.outputs:
        store.client.log_artifact(run_id, str(path))


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


_STOP = None  # the sender's last item: send what is queued, then end


class MlflowCallback(Callback):
    """Sends a training run to MLflow. The run is opened before training (a store that cannot be used stops the
    stage there); then the training thread only queues: a thread of this callback sends each epoch, so a store
    that is slow, silent or gone never slows training. An epoch the store does not take stays queued and is sent
    with the next one once it answers again. At the run's end the queue is waited for at most one request's
    deadline (`Store.deadline_s`, from `tracking.request_timeout_s` and `tracking.request_retries`), and whatever
    MLflow still lacks is said in one line: `python -m vggdepth sync` sends it from the run's outputs."""

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
        self.queue: queue.Queue | None = None  # wakes the sender: an epoch's number for each epoch queued, or _STOP
        self.stopped = False  # the sender's last item is queued
        self.sender: threading.Thread | None = None
        self.inflight: Attempt | None = None  # the request sending pending[0]; abandoned past its deadline
        self.problem = ""  # why the last epoch was not sent
        self.offline_since: int | None = None
        self.monitor = None

    # -- hooks --------------------------------------------------------------------------------------------------

    def on_run_start(self, run: RunInfo) -> None:
        self.run_id, created = self.store.training_run(self.context, run, self.stage)
        run.extra[RUN_ID_KEY] = self.run_id
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
        # At most one item an epoch (restored or trained) and the stop: putting never blocks, and never fails.
        self.queue = queue.Queue(maxsize=int(run.config["train"]["epochs"]) + 1)
        self._enqueue(resumed)
        self.sender = threading.Thread(target=self._send_loop, name=f"vggdepth-mlflow {run.name}", daemon=True)
        self.sender.start()
        if self.monitor is not None:
            self.monitor.start()
        log.info("tracking %s-s%d in MLflow run %s at %s", run.variant, run.seed, self.run_id, self.store.uri)

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None:
        self._enqueue([(record.epoch, epoch_metrics(record, gradients))])

    def on_run_end(self, run: RunInfo, summary: dict) -> None:
        deadline = time.monotonic() + self.store.deadline_s
        answers, reason = self._stop_sending(deadline)
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

    def on_run_error(self, run: RunInfo, error: BaseException) -> None:
        deadline = time.monotonic() + self.store.deadline_s
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self._stop_queue()  # the queue goes on draining beside the status
        message = str(error)[:5000] or type(error).__name__
        # The status first: a stopped stage (SIGTERM, Ctrl-C) gets it within the bound, queued epochs or not.
        closed, why = self._close(status, deadline, error=message)
        _, late = self._stop_sending(deadline)
        self._report(run, [], closed, status, why or late, finished=False)

    # -- sending ------------------------------------------------------------------------------------------------

    def _enqueue(self, epochs: list[tuple[int, list]]) -> None:
        """The training thread's part: add to what is to be sent, and wake the sender."""
        if epochs:
            with self.lock:
                self.pending.extend(epochs)
            self.queue.put_nowait(epochs[-1][0])

    def _send_loop(self) -> None:
        """The sender: whatever is queued, in order, each time an epoch comes, until the stop."""
        while True:
            item = self.queue.get()
            self._send_pending()
            if item is _STOP:
                return

    def _send_pending(self) -> None:
        """Send the epochs not sent yet, oldest first; stop at the first the store does not take (it is sent
        again with the next epoch, or at the end). A request past its deadline is never sent twice: while it may
        still arrive, its answer is awaited instead, so no epoch is logged twice."""
        while True:
            with self.lock:
                if not self.pending:
                    return
                epoch, metrics = self.pending[0]
            if self.inflight is None:
                self.inflight = Attempt(f"vggdepth-mlflow epoch {epoch}", self._log_epoch, metrics)
            try:
                self.inflight.result(self.store.deadline_s)
            except Late:
                self._offline(epoch, f"no answer within {self.store.deadline_s:g} s ({self.store.bound()})")
                return
            except Exception as exc:
                self.inflight = None
                self._offline(epoch, short(exc))
                return
            self.inflight = None
            with self.lock:
                self.pending.pop(0)
            if self.offline_since is not None:
                log.warning(
                    "MLflow at %s answers again: sent the epochs queued since epoch %d",
                    self.store.uri,
                    self.offline_since,
                )
                self.offline_since = None

    def _log_epoch(self, metrics: list) -> None:
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.unbounded.log_batch(self.run_id, metrics=metrics[start : start + 1000])

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

    def _stop_queue(self) -> None:
        if self.queue is not None and not self.stopped:
            self.queue.put_nowait(_STOP)
            self.stopped = True

    def _stop_sending(self, deadline: float) -> tuple[bool, str]:
        """Let the sender send what is queued and end, and stop sampling system metrics, waiting for both until
        `deadline` (monotonic). (whether everything queued was sent, why not)."""
        finishing = None
        if self.monitor is not None:  # its thread may itself be waiting on the store
            finishing = Attempt("vggdepth-mlflow system metrics", self.monitor.finish)
            self.monitor = None
        self._stop_queue()
        if self.sender is not None:
            self.sender.join(max(deadline - time.monotonic(), 0.0))
        if finishing is not None:
            try:
                finishing.result(deadline - time.monotonic())
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
            Attempt(f"vggdepth-mlflow close {self.run_id}", close).result(seconds)
        except Late:
            return False, f"MLflow at {self.store.uri} gave no answer within {seconds:.3g} s ({self.store.bound()})"
        except Exception as exc:
            return False, f"MLflow at {self.store.uri} failed: {short(exc)}"
        try:  # a courtesy, bounded like the rest
            Attempt("vggdepth-mlflow parent", self.store.stage_done, self.run_id).result(
                self.store.deadline_s if deadline is None else deadline - time.monotonic()
            )
        except Late:
            log.warning("could not extend the parent run of %s: %s gave no answer", self.run_id, self.store.uri)
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
