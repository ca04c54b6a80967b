"""The training run in MLflow: a callback of the training loop (`MlflowCallback`) that opens the run, logs its
params, inputs and every epoch's metrics, and at the end its tables, checkpoints and model. Training never waits on
a lost server: epochs are queued and sent when it answers again."""

from __future__ import annotations

import logging
import os
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
        # A logged model belongs to the active experiment, not to the run given by id: make it the run's.
        owner = client.get_run(run_id).info
        mlflow.set_experiment(experiment_id=owner.experiment_id)
        # Pickled, not torch.export: load_model gives back the nn.Module, and the code travels with it.
        info = mlflow.pytorch.log_model(
            net,
            name=owner.run_name,  # `<variant>-s<seed>`
            input_example=example,
            serialization_format="pickle",
            code_paths=[str(Path(__file__).parents[1])],  # the vggdepth package
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pydantic>=2", "pyyaml"],
            run_id=run_id,
            step=best["epoch"] - 1,  # the epoch whose weights these are
        )
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


class MlflowCallback(Callback):
    """Sends a training run to MLflow. If the server goes away mid-run, training goes on: epochs are queued,
    sent when it answers again, and whatever is still unsent at the end is reported by epoch."""

    def __init__(
        self, store: Store, context: PipelineContext, stage: str, data_dir: Path, *, system_metrics: bool = True
    ):
        self.store, self.context, self.stage, self.data_dir = store, context, stage, data_dir
        # Sampled in this process: only meaningful where the run trains (the grid turns it off for other nodes).
        self.system_metrics = system_metrics and store.cfg.system_metrics
        self.client = store.client
        self.run_id = ""
        self.pending: list[tuple[int, list]] = []
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
            self.pending = pending_epochs(run.history, run.gradients, self.store.logged_epochs(self.run_id))
            if not _finished(run):
                self.client.set_tag(self.run_id, NODE_TAG, run.node)
                self.client.set_tag(self.run_id, PRECISION_TAG, run.precision)
        self._flush()
        if self.system_metrics and not _finished(run):
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=not created, tracking_uri=self.store.uri)
            self.monitor.start()
        log.info("tracking %s-s%d in MLflow run %s at %s", run.variant, run.seed, self.run_id, self.store.uri)

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None:
        self.pending.append((record.epoch, epoch_metrics(record, gradients)))
        self._flush()

    def on_run_end(self, run: RunInfo, summary: dict) -> None:
        self._flush()
        try:
            self.client.set_tag(self.run_id, NODE_TAG, summary["node"])
        except Exception as exc:
            log.error("could not record the node of MLflow run %s: %s", self.run_id, short(exc))
        try:
            if _finished(run):  # nothing trained: the outputs were restored; send only what MLflow lacks
                complete_run_artifacts(self.store, self.run_id, run.files, self.data_dir)
            else:
                log_run_artifacts(self.store, self.run_id, run.files, data_dir=self.data_dir)
            artefacts = True
        except Exception as exc:  # tracking must never cost the run its outputs
            artefacts = False
            log.error(
                "could not log the artefacts of %s to MLflow (%s); send them with `python -m vggdepth sync "
                "%s` once it is back",
                run.files.root,
                short(exc),
                run.files.root,
            )
        if _finished(run) and not artefacts:  # a finished run stays finished: `sync` sends what it lacks
            self._close(run, "FINISHED")
            return
        self._close(run, "FINISHED" if artefacts and not self.pending else "FAILED")

    def on_run_error(self, run: RunInfo, error: BaseException) -> None:
        self._flush()
        try:
            self.client.set_tag(self.run_id, "vggdepth.error", str(error)[:5000] or type(error).__name__)
        except Exception as exc:
            log.error("could not record the error in MLflow run %s: %s", self.run_id, short(exc))
        self._close(run, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    # -- sending ------------------------------------------------------------------------------------------------

    def _flush(self) -> None:
        while self.pending:
            epoch, metrics = self.pending[0]
            try:
                for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
                    self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
            except Exception as exc:
                if self.offline_since is None:
                    self.offline_since = epoch
                    log.error(
                        "MLflow at %s stopped answering at epoch %d (%s): training goes on; epochs are queued "
                        "and sent when it answers again",
                        self.store.uri,
                        epoch,
                        short(exc),
                    )
                return
            self.pending.pop(0)
            if self.offline_since is not None:
                log.warning(
                    "MLflow at %s answers again: sent the epochs queued since epoch %d",
                    self.store.uri,
                    self.offline_since,
                )
                self.offline_since = None

    def _close(self, run: RunInfo, status: str) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        if self.pending:
            log.error(
                "MLflow run %s is missing epochs %s: %s was unreachable. The run's outputs are complete; "
                "send them with `python -m vggdepth sync %s` once it is back",
                self.run_id,
                [e for e, _ in self.pending],
                self.store.uri,
                run.files.root,
            )
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            log.error("could not close MLflow run %s: %s", self.run_id, short(exc))
            return
        self.store.stage_done(self.run_id)

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
