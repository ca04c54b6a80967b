"""Experiment tracking: every MLflow call of the project lives here.

Store: `$MLFLOW_TRACKING_URI` when set (a team server), else SQLite at `<project>/mlruns/mlflow.db` with artefacts
in `<project>/mlruns/artifacts`, by absolute path. The project is `$DVC_ROOT` (DVC points it at the real repository
even when an experiment runs in a temporary copy), else the working directory.

Runs: one per (variant, seed), named `<variant>-s<seed>`, nested under a parent run that groups one pipeline run:
the DVC experiment when there is one, else the git commit and parameters of a `dvc repro`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggdepth.config import Params, TrackingConfig
from vggdepth.engine import Callback, EpochRecord, RunFiles, RunInfo, load_checkpoint, load_network
from vggdepth.errors import VggdepthError
from vggdepth.gradients import GradientRow

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"
PARENT_KEY_TAG = "vggdepth.pipeline"
KIND_TAG = "vggdepth.kind"
NODE_TAG = "node"  # where the run's newest epoch was trained (engine.this_node)
PRECISION_TAG = "precision"  # what the run computes in: bfloat16 or float32 (engine.training_precision)
RUN_ID_KEY = "mlflow_run_id"  # where a run's id is kept in its checkpoints, so a resumed run continues it
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"  # the UI's "Model training"
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description in the UI
EXPERIMENT_DESCRIPTION = (
    "CIFAR-100, VGG-style networks of Table 1: one parent run per pipeline run, with one run per (variant, seed) "
    "under it. Pick 'Model training' at the top left to open it on its runs."
)
TABLE1_ARTIFACT = "table1.json"  # Table 1 on the parent run, as an MLflow table
PARENT_DESCRIPTION = (
    "The pipeline run {name}: the parent of one training run per (variant, seed) of Table 1. It spans the "
    "pipeline's stages so far (its end time moves on as each train, evaluate or report stage finishes); the report "
    "stage logs Table 1 (table1.json as an MLflow table, table1.md, table1.csv, summary.json) and the figures here."
)
GRADIENT_METRICS = {
    "mean_abs": "grad_mean_abs",
    "last_mean_abs": "grad_last_mean_abs",
    "grad_l2": "grad_l2",
    "weight_l2": "weight_l2",
}
# The same on a log10 scale: MLflow charts on a linear axis, where 1e-18 (VGG-38's vanished gradient) and 1e-3 both
# sit on the floor; in log10 the vanishing gradient is visible without any chart setting.
LOG10_GRADIENT_METRICS = {"mean_abs": "log10_grad_mean_abs", "last_mean_abs": "log10_grad_last_mean_abs"}
LOG10_FLOOR = -46.0  # an exact zero: float32's smallest positive value is 1.4e-45
# The learning curves under `curves/`: the MLflow UI draws prefixed sections in alphabetical order and unprefixed
# metrics last, so `curves/` puts them above the hundreds of per-layer gradient charts (README "Tracking").
EPOCH_METRICS = {
    "train_loss": "curves/train_loss",
    "train_acc": "curves/train_acc",
    "val_loss": "curves/val_loss",
    "val_acc": "curves/val_acc",
    "lr": "curves/lr",
    "seconds": "curves/epoch_seconds",
}


class TrackingError(VggdepthError):
    """The tracking store cannot be used."""


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else the embedded SQLite store under `<root>/mlruns/` (absolute)."""
    if os.environ.get(URI_ENV):
        return os.environ[URI_ENV]
    return f"sqlite:///{(root or project_root()).resolve() / 'mlruns' / 'mlflow.db'}"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:///")


# Stores MLflow can track to: a server, a database, or a local folder.
KNOWN_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def _server_problem(uri: str, timeout_s: float) -> str | None:
    """Why the tracking server at `uri` cannot be used, or None when it answers as an MLflow server."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as response:  # noqa: S310
            if response.status != 200:
                return f"HTTP {response.status} from /health"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason} from /health"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    # Any web server may answer /health; only an MLflow server answers its REST API, with JSON.
    query = urllib.parse.urlencode({"experiment_name": "Default"})
    try:
        with urllib.request.urlopen(  # noqa: S310
            f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=timeout_s
        ) as response:
            json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:  # MLflow answers an unknown experiment (404) or a request without credentials (401, 403) in JSON
            if exc.code in (401, 403, 404) and json.loads(exc.read()).get("error_code"):
                return None
        except (ValueError, AttributeError, OSError):
            pass
        return f"HTTP {exc.code} {exc.reason} from its REST API: is it an MLflow server?"
    except ValueError:
        return "its REST API does not answer with JSON: is it an MLflow server?"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail at once, naming the URI, when the store's scheme is unknown or a tracking server does not answer as
    an MLflow server (within `timeout_s`)."""
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0]
    if scheme and scheme not in KNOWN_SCHEMES:  # no scheme: a local folder, which MLflow takes as a file store
        raise TrackingError(
            f"{URI_ENV}={uri}: unknown tracking store scheme {scheme!r}; use an MLflow server (http(s)://), a "
            f"database (sqlite:///, postgresql://, ...), or unset {URI_ENV} for the embedded store under mlruns/"
        )
    if scheme in ("http", "https"):
        problem = _server_problem(uri, timeout_s)
        if problem:
            raise TrackingError(
                f"the MLflow tracking server at {uri} cannot be used ({problem}). Start it, point {URI_ENV} at a "
                "running server, unset it to use the embedded store under mlruns/, or set tracking.enabled: false"
            )
    if _is_embedded(uri):
        database = Path(uri.removeprefix("sqlite:///"))
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the tracking store at {uri}: {exc.strerror or exc}") from None
        if database.exists() and not os.access(database, os.W_OK):
            raise TrackingError(f"the tracking store at {uri} is read-only: MLflow cannot record runs in it")


@contextmanager
def _store_errors(uri: str, what: str) -> Iterator[None]:
    """Any failure of MLflow or its database while doing `what`, as one line naming the store."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"MLflow at {uri} failed to {what}: {_short(exc)}") from None


def _git_state(cwd: Path) -> tuple[str, bool]:
    """(commit, dirty) of the checkout at `cwd`; ('unknown', False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, bool(status.strip())


@dataclass(frozen=True)
class PipelineContext:
    """What groups the runs of one pipeline run under one parent, and the provenance tags of every run."""

    key: str
    name: str
    tags: dict[str, str]

    @classmethod
    def detect(cls, params: Params, cwd: Path | None = None) -> PipelineContext:
        commit, dirty = _git_state(cwd or Path.cwd())
        params_hash = hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode()).hexdigest()[:8]
        experiment = os.environ.get("DVC_EXP_NAME", "")
        tags = {"git_commit": commit, "git_dirty": str(dirty).lower(), "params_hash": params_hash}
        if experiment:
            tags["dvc_experiment"] = experiment
            return cls(key=f"exp:{experiment}", name=experiment, tags=tags)
        short = commit[:7] + ("-dirty" if dirty else "")
        return cls(key=f"repro:{commit}:{dirty}:{params_hash}", name=f"repro {short} params {params_hash}", tags=tags)


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'train.epochs': '100', ...}, the form MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def epoch_metrics(record: EpochRecord, gradients: list[GradientRow]):
    """MLflow metrics of one epoch, all with step=epoch, so the UI charts any of them across runs."""
    from mlflow.entities import Metric

    now = _now_ms()
    metrics = [Metric(name, float(getattr(record, field)), now, record.epoch) for field, name in EPOCH_METRICS.items()]
    for row in gradients:
        metrics += [
            Metric(f"{prefix}/{row.layer}", float(getattr(row, field)), now, record.epoch)
            for field, prefix in GRADIENT_METRICS.items()
        ]
        metrics += [
            Metric(f"{prefix}/{row.layer}", log10_or_floor(getattr(row, field)), now, record.epoch)
            for field, prefix in LOG10_GRADIENT_METRICS.items()
        ]
    return metrics


def log10_or_floor(value: float) -> float:
    """log10 of a gradient statistic, for the UI's linear chart axes; an exact zero (an underflowed gradient) as
    LOG10_FLOOR, below any float32 value."""
    return math.log10(value) if value > 0 else LOG10_FLOOR


class Store:
    """The MLflow client of this process, its experiment and the parent run of this pipeline run."""

    def __init__(self, cfg: TrackingConfig, uri: str | None = None, root: Path | None = None):
        # Fail fast on a lost server: MLflow's defaults retry for minutes before an error comes back.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.request_retries))
        import mlflow
        from mlflow import MlflowClient

        self.cfg = cfg
        self.root = (root or project_root()).resolve()
        self.uri = uri or tracking_uri(self.root)
        check_reachable(self.uri, cfg.request_timeout_s)
        with _store_errors(self.uri, f"open experiment {cfg.experiment!r}"):
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment()

    def answers(self) -> bool:
        """Whether the store answers now (a server may have gone away since the stage started)."""
        try:
            self.client.get_experiment(self.experiment_id)
        except Exception:
            return False
        return True

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.cfg.experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment {self.cfg.experiment!r} (id {found.experiment_id}) is deleted in the MLflow store at "
                f"{self.uri}: restore it (`mlflow experiments restore --experiment-id {found.experiment_id}` with "
                f"{URI_ENV}={self.uri}), or set tracking.experiment to another name"
            )
        if found is None:
            # The embedded store keeps artefacts beside its database, not in ./mlartifacts of whatever directory.
            location = (self.root / "mlruns" / "artifacts").as_uri() if _is_embedded(self.uri) else None
            try:
                self.client.create_experiment(self.cfg.experiment, artifact_location=location)
            except Exception:  # created meanwhile by a concurrent stage, or a real failure
                if self.client.get_experiment_by_name(self.cfg.experiment) is None:
                    raise
            found = self.client.get_experiment_by_name(self.cfg.experiment)
        # A model-training experiment, described in the experiments list (what a user set by hand is kept).
        for tag, value in ((EXPERIMENT_KIND_TAG, EXPERIMENT_KIND), (DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION)):
            if tag not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, tag, value)
        return found.experiment_id

    def _find(self, filter_string: str):
        runs = self.client.search_runs(
            [self.experiment_id], filter_string, max_results=10, order_by=["attributes.start_time ASC"]
        )
        return runs[0] if runs else None

    def parent_run(self, context: PipelineContext) -> str:
        """The parent run of this pipeline run, created on first use."""
        with _store_errors(self.uri, f"find or create the parent run {context.name!r}"):
            return self._parent_run(context)

    def _parent_run(self, context: PipelineContext) -> str:
        found = self._find(f"tags.`{PARENT_KEY_TAG}` = '{context.key}'")
        if found is not None:
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=context.name,
            tags={
                PARENT_KEY_TAG: context.key,
                KIND_TAG: "pipeline",
                DESCRIPTION_TAG: PARENT_DESCRIPTION.format(name=context.name),
                **context.tags,
            },
        )
        # Finished from the start (no process holds it open); `extend_parent` moves its end with every stage.
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def extend_parent(self, parent: str) -> None:
        """The parent run now ends no earlier than now: it spans the stages that have finished so far."""
        try:
            if (self.client.get_run(parent).info.end_time or 0) < (now := _now_ms()):
                self.client.set_terminated(parent, "FINISHED", end_time=now)
        except Exception as exc:  # the span is a courtesy: never worth a stage
            log.warning("could not extend the parent run %s: %s", parent, _short(exc))

    def training_run(self, context: PipelineContext, run: RunInfo, stage: str) -> tuple[str, bool]:
        """(run id, created) for this (variant, seed): the one in its checkpoint, an unfinished one of the same
        settings under this parent, or a new one."""
        with _store_errors(self.uri, f"start the run of {run.variant}-s{run.seed}"):
            return self._training_run(context, run, stage)

    def _training_run(self, context: PipelineContext, run: RunInfo, stage: str) -> tuple[str, bool]:
        parent = self.parent_run(context)
        known = run.extra.get(RUN_ID_KEY)
        if known:
            try:
                return self.client.get_run(known).info.run_id, False
            except Exception:
                log.warning("MLflow run %s from the checkpoint is not in %s: starting a new one", known, self.uri)
        unfinished = self._find(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.`vggdepth.fingerprint` = '{run.fingerprint}' "
            "and attributes.status != 'FINISHED'"
        )
        if unfinished is not None:
            return unfinished.info.run_id, False
        created = self.client.create_run(
            self.experiment_id,
            run_name=f"{run.variant}-s{run.seed}",
            tags={
                **_training_tags(parent, run.variant, run.seed),
                "data_md5": run.config["data"]["archive_md5"],
                "dvc_stage": stage,
                "vggdepth.fingerprint": run.fingerprint,
                **context.tags,
            },
        )
        return created.info.run_id, True

    def logged_epochs(self, run_id: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, EPOCH_METRICS["train_loss"])}


def _training_tags(parent: str, variant: str, seed: int) -> dict[str, str]:
    """The tags every training run has: its parent, kind, variant and seed."""
    return {"mlflow.parentRunId": parent, KIND_TAG: "training", "variant": variant, "seed": str(seed)}


def _pending_epochs(history: list[EpochRecord], gradients: list[GradientRow], logged: set[int]) -> list[tuple]:
    """(epoch, metrics) of every epoch in `history` that MLflow has not got yet."""
    by_epoch: dict[int, list[GradientRow]] = {}
    for row in gradients:
        by_epoch.setdefault(row.epoch, []).append(row)
    return [(r.epoch, epoch_metrics(r, by_epoch.get(r.epoch, []))) for r in history if r.epoch not in logged]


def input_example(data_dir: Path) -> np.ndarray | None:
    """The model's input example: the first two test images of the prepared data, normalised as the network sees
    them (N x 3 x 32 x 32 float32); None, with a warning, when the prepared data is not there."""
    import torch

    from vggdepth.batches import DeviceDataset
    from vggdepth.data import load_prepared

    try:
        data = load_prepared(data_dir)
    except Exception as exc:
        log.warning("the model is logged without an input example: no prepared data at %s (%s)", data_dir, _short(exc))
        return None
    test = DeviceDataset(data.test, data.mean, data.std, torch.device("cpu"))
    return test.normalise(test.images[:2]).contiguous().numpy()


def log_run_artifacts(
    store: Store,
    run_id: str,
    files: RunFiles,
    gradients: list[GradientRow],
    title: str,
    *,
    model: bool = True,
    data_dir: Path | None = None,
) -> None:
    """Tables, checkpoints, the gradient-flow figure and the best checkpoint as an MLflow PyTorch model, named after
    the run (`BN-VGG-38-s0`), in the run's experiment, with real test images (`data_dir`) as input example."""
    import mlflow
    import torch

    client = store.client
    _log_tables(store, run_id, files, gradients, title)
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
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pydantic>=2", "pyyaml"],
            run_id=run_id,
            step=best["epoch"] - 1,  # the epoch whose weights these are
        )
        client.set_tag(run_id, "vggdepth.model_uri", info.model_uri)
        client.set_tag(run_id, "vggdepth.model_epoch", str(best["epoch"] - 1))


def _log_tables(store: Store, run_id: str, files: RunFiles, gradients: list[GradientRow], title: str) -> None:
    """A run's tables (epochs, gradients, summary) and its gradient-flow figure."""
    from vggdepth.figures import gradient_flow_figure, save_figure

    for path in (files.epochs_csv, files.gradients_csv, files.train_json):
        store.client.log_artifact(run_id, str(path))
    if gradients:
        with tempfile.TemporaryDirectory() as tmp:
            figure = gradient_flow_figure(gradients, f"{title}: gradient flow")
            store.client.log_artifact(run_id, str(save_figure(figure, Path(tmp) / "gradient_flow.png")))


def _finished(run: RunInfo) -> bool:
    """Whether this process trains nothing: the run was complete in its checkpoint."""
    return run.start_epoch >= run.config["train"]["epochs"]


def _title(run: RunInfo) -> str:
    return f"{run.variant} seed {run.seed}"


def complete_run_artifacts(
    store: Store,
    run_id: str,
    files: RunFiles,
    gradients: list[GradientRow],
    title: str,
    data_dir: Path | None = None,
):
    """Log the artefacts and the model only when the MLflow run lacks them; return whether anything was sent."""
    has_files = bool(store.client.list_artifacts(run_id))
    has_model = bool(store.client.get_run(run_id).data.tags.get("vggdepth.model_uri"))
    if has_files and (has_model or not store.cfg.log_model):
        return False
    log_run_artifacts(store, run_id, files, gradients, title, model=not has_model, data_dir=data_dir)
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
        self.run_id = self.parent = ""
        self.pending: list[tuple[int, list]] = []
        self.offline_since: int | None = None
        self.monitor = None

    # -- hooks --------------------------------------------------------------------------------------------------

    def on_run_start(self, run: RunInfo) -> None:
        self.run_id, created = self.store.training_run(self.context, run, self.stage)
        self.parent = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId", "")
        run.extra[RUN_ID_KEY] = self.run_id
        with _store_errors(self.store.uri, f"record the params and inputs of {run.variant}-s{run.seed}"):
            if created:
                self.client.log_batch(self.run_id, params=_params(run.config))
                self._log_inputs(run)
            # A resumed run: epochs restored from its checkpoint that MLflow has not seen (killed before logging them).
            self.pending = _pending_epochs(run.history, run.gradients, self.store.logged_epochs(self.run_id))
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
            log.error("could not record the node of MLflow run %s: %s", self.run_id, _short(exc))
        try:
            if _finished(run):  # nothing trained: the outputs were restored; send only what MLflow lacks
                complete_run_artifacts(self.store, self.run_id, run.files, run.gradients, _title(run), self.data_dir)
            else:
                log_run_artifacts(
                    self.store, self.run_id, run.files, run.gradients, _title(run), data_dir=self.data_dir
                )
            artefacts = True
        except Exception as exc:  # tracking must never cost the run its outputs
            artefacts = False
            log.error(
                "could not log the artefacts of %s to MLflow (%s); send them with `python -m vggdepth sync "
                "%s` once it is back",
                run.files.root,
                _short(exc),
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
            log.error("could not record the error in MLflow run %s: %s", self.run_id, _short(exc))
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
                        _short(exc),
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
            log.error("could not close MLflow run %s: %s", self.run_id, _short(exc))
            return
        if self.parent:
            self.store.extend_parent(self.parent)

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


def _params(config: dict):
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in flatten(config).items()]


def _now_ms() -> int:
    """MLflow's metric timestamp: milliseconds since the epoch."""
    return int(time.time() * 1000)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def open_store(params: Params) -> Store | None:
    """The tracking store of a stage, checked before any work; None when `tracking.enabled` is false."""
    return Store(params.tracking) if params.tracking.enabled else None


def training_callbacks(params: Params, variant: str, seed: int, data_dir: Path) -> list[Callback]:
    """What watches a training stage: an MLflow callback, or nothing when tracking is off. Fails at once,
    naming the URI, when the tracking store cannot be reached."""
    store = open_store(params)
    if store is None:
        return []
    stage = os.environ.get("DVC_STAGE", f"train@{variant}-{seed}")
    return [MlflowCallback(store, PipelineContext.detect(params), stage, data_dir)]


def _run_id_of(files: RunFiles, state: dict | None = None) -> str:
    """The MLflow run named in a run's last checkpoint (`state`, when already loaded)."""
    run_id = (state or load_checkpoint(files.last)).get("extra", {}).get(RUN_ID_KEY)
    if not run_id:
        raise TrackingError(
            f"{files.last} names no MLflow run: it was trained with tracking.enabled: false. Set "
            "tracking.enabled: false for this stage too, or retrain the run with tracking on"
        )
    return run_id


def _test_metrics(result: dict):
    from mlflow.entities import Metric

    now = _now_ms()
    # test_loss_best, test_acc_best, test_top5_best, test_ece_best, ...: every test metric of both checkpoints
    return [
        Metric(f"{name}_{kind}", float(value), now, 0)
        for kind in ("best", "final")
        for name, value in result[kind].items()
        if name.startswith("test_")
    ]


# vggdepth.metrics.TABLES, named here: importing the evaluation's code would make the training stages depend on it
EVALUATION_TABLES = ("predictions.npz", "per_class.csv", "superclass_confusion.csv")


def _send_evaluation(store: Store, run_id: str, files: RunFiles, result: dict, tables: Path | None) -> None:
    """The test metrics, `test.json` as an artefact (written here from `result`: the stage writes its own after),
    and the evaluation's tables from `tables` under `evaluation/`."""
    store.client.log_batch(run_id, metrics=_test_metrics(result))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / files.test_json.name
        copy.write_text(json.dumps(result, indent=2) + "\n")
        store.client.log_artifact(run_id, str(copy))
    for name in EVALUATION_TABLES if tables is not None else ():
        if (tables / name).exists():
            store.client.log_artifact(run_id, str(tables / name), "evaluation")


def log_evaluation(store: Store | None, files: RunFiles, result: dict, tables: Path | None = None) -> None:
    """Test metrics, `test.json` and the tables in `tables` (predictions, per-class, superclass confusion) of the
    evaluate stage, into the training run they belong to; called before the stage puts its outputs in place, so a
    stage that fails here leaves none. A server lost since the stage started costs the log, not the stage (the
    gap is reported, `sync` sends it later); a store that answers but refuses fails the stage, with its reason."""
    if store is None:
        return
    run_id = _run_id_of(files)
    try:
        _send_evaluation(store, run_id, files, result, tables)
        if parent := store.client.get_run(run_id).data.tags.get("mlflow.parentRunId"):
            store.extend_parent(parent)
    except Exception as exc:
        if store.answers():
            raise TrackingError(
                f"MLflow at {store.uri} refused the test metrics of {files.root} (run {run_id}): {_short(exc)}"
            ) from None
        log.error(
            "could not send the test metrics of %s: MLflow at %s does not answer (%s); the stage's outputs are "
            "complete, send them with `python -m vggdepth sync %s` once it is back",
            files.root,
            store.uri,
            _short(exc),
            files.root,
        )


def sync_run(params: Params, files: RunFiles) -> list[str]:
    """Send what a run's MLflow run lacks (epochs, artefacts, test metrics) from its outputs; say what was sent.
    A run folder with tables but no checkpoints (a GPU lease's, see `import_run`) is imported from its tables."""
    store = Store(params.tracking)
    if not files.last.exists() and files.train_json.exists():
        return import_run(store, params, files)
    state = load_checkpoint(files.last)
    run_id = _run_id_of(files, state)
    with _store_errors(store.uri, f"take what {files.root} has to send"):
        return _sync(store, files, state, run_id)


def _sync(store: Store, files: RunFiles, state: dict, run_id: str) -> list[str]:
    gradients = [GradientRow(**r) for r in state["gradients"]]
    history = [EpochRecord(**r) for r in state["history"]]
    sent = []
    for epoch, metrics in _pending_epochs(history, gradients, store.logged_epochs(run_id)):
        store.client.log_batch(run_id, metrics=metrics)
        sent.append(f"epoch {epoch}")
    title = f"{state['variant']} seed {state['seed']}"
    if files.train_json.exists() and complete_run_artifacts(store, run_id, files, gradients, title):
        sent.append("artefacts and model")
    if files.test_json.exists() and not store.client.get_metric_history(run_id, "test_acc_best"):
        log_evaluation(store, files, json.loads(files.test_json.read_text()), files.root)
        sent.append("test metrics")
    if store.client.get_run(run_id).info.status != "FINISHED" and files.train_json.exists():
        store.client.set_terminated(run_id, "FINISHED")
        sent.append("status FINISHED")
    return sent


# What trained a folder of runs brought home as tables, by the record beside its runs/ folder: a GPU lease
# (benchmarks/gpu_results.py) or a study on this machine's CPU (benchmarks/cpu_study.py).
RECORDS = {"lease.json": "GPU lease", "study.json": "CPU study"}


def import_run(store: Store, params: Params, files: RunFiles) -> list[str]:
    """A run trained without tracking and brought back as tables (results/<name>/runs/<run>/: a GPU lease's or a
    CPU study's) becomes a finished MLflow run from them: every epoch with its gradient statistics, the test
    metrics, the tables and the gradient-flow figure (no checkpoints or model: none come back). Its parent run
    stands for the lease or study, tagged with its device, torch version and commit. Importing again sends only
    what is missing."""
    from vggdepth.outputs import read_epochs, read_gradients

    folder = files.root.parent.parent
    found = [(folder / name, kind) for name, kind in RECORDS.items() if (folder / name).exists()]
    try:
        if not found:
            raise FileNotFoundError(f"no {' or '.join(RECORDS)} in {folder}")
        record_path, kind = found[0]
        record = json.loads(record_path.read_text())
        summary = json.loads(files.train_json.read_text())
        variant, seed, epochs = summary["variant"], int(summary["seed"]), int(summary["epochs"])
    except (OSError, ValueError, KeyError) as exc:
        raise TrackingError(
            f"{files.root} has no checkpoints, so it can only be imported as the run of a GPU lease or a CPU study, "
            f"with its train.json and the record beside its runs/ folder: {_short(exc)}"
        ) from None
    if "params" in record:  # what the runs trained with, whatever params.yaml says now
        params = Params.model_validate(record["params"])
    else:
        params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": epochs})})
    history = [EpochRecord(**row) for row in read_epochs(files.epochs_csv)]
    gradients = read_gradients(files.gradients_csv)
    source = f"{kind} {folder.name}"
    context = PipelineContext(
        key=f"lease:{folder.name}",
        name=source,
        tags={
            "git_commit": str(record.get("commit", "")),
            "device": str(record.get("device", "")),
            "torch": str(record.get("torch", "")),
            "lease_command": str(record.get("command", ""))[:5000],
        },
    )
    with _store_errors(store.uri, f"import {files.root}"):
        parent = store.parent_run(context)
        found = store._find(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.variant = '{variant}' and tags.seed = '{seed}'"
        )
        sent = []
        if found is None:
            config = {
                "model": params.model.model_dump(),
                "train": params.train.model_dump(),
                "variant": params.variant(variant, field="variant").model_dump(),
                "seed": seed,
            }
            run_id = store.client.create_run(
                store.experiment_id,
                run_name=f"{variant}-s{seed}",
                tags={
                    **_training_tags(parent, variant, seed),
                    NODE_TAG: str(summary.get("node", "")),
                    "device": str(summary.get("device", "")),
                    PRECISION_TAG: str(summary.get("precision", "")),
                    "vggdepth.source": source,
                    **context.tags,
                },
            ).info.run_id
            store.client.log_batch(run_id, params=_params(config))
            sent.append("run")
        else:
            run_id = found.info.run_id
        epochs_sent = _pending_epochs(history, gradients, store.logged_epochs(run_id))
        for _, metrics in epochs_sent:
            store.client.log_batch(run_id, metrics=metrics)
        if epochs_sent:
            sent.append(f"epochs {epochs_sent[0][0]}-{epochs_sent[-1][0]}")
        if not store.client.list_artifacts(run_id):
            _log_tables(store, run_id, files, gradients, f"{variant} seed {seed}")
            sent.append("tables")
        if files.test_json.exists() and not store.client.get_metric_history(run_id, "test_acc_best"):
            _send_evaluation(store, run_id, files, json.loads(files.test_json.read_text()), files.root)
            sent.append("test metrics")
        if store.client.get_run(run_id).info.status != "FINISHED":
            store.client.set_terminated(run_id, "FINISHED")
    return sent


def log_report(
    store: Store, params: Params, out: Path, runs: Path, context: PipelineContext | None = None
) -> tuple[str, str]:
    """Table 1, the summary and the figures into the pipeline's parent run; the final variant's best model into
    the registry under `report.registered_model`, with `report.alias`. Returns (model name, version).
    `out` may be the report's staging folder: the stage publishes before it puts the report in place."""
    with _store_errors(store.uri, "take the report"):
        return _log_report(store, params, out, runs, context)


def _log_report(store: Store, params: Params, out: Path, runs: Path, context: PipelineContext | None):
    import mlflow

    client = store.client
    parent = store.parent_run(context or PipelineContext.detect(params))
    for name in ("table1.md", "table1.csv", "summary.json"):
        client.log_artifact(parent, str(out / name))
    client.log_artifacts(parent, str(out / "figures"), "figures")
    # Table 1 as an MLflow table (the UI shows it as one, and mlflow.load_table reads it back): one row per variant,
    # not one metric per cell, which would fill the chart view with single-bar charts before the runs' curves.
    with (out / "table1.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {name: [row[name] for row in rows] for name in (rows[0] if rows else [])}
    mlflow.log_table(data=columns, artifact_file=TABLE1_ARTIFACT, run_id=parent)

    # The final variant's best run over the seeds, by its best validation accuracy.
    final = params.report.final_variant
    best_files = max(
        (RunFiles.of(runs, final, seed) for seed in params.seeds),
        key=lambda f: json.loads(f.train_json.read_text())["best_val_acc"],
    )
    run_id = _run_id_of(best_files)
    model_uri = client.get_run(run_id).data.tags.get("vggdepth.model_uri")
    if not model_uri:
        raise TrackingError(f"MLflow run {run_id} ({best_files.root}) has no logged model: set tracking.log_model")
    name, alias = params.report.registered_model, params.report.alias
    version = mlflow.register_model(model_uri, name, tags={"variant": final, "run": best_files.root.name})
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(parent, "vggdepth.registered_model", f"models:/{name}@{alias} (version {version.version})")
    store.extend_parent(parent)
    log.info(
        "registered %s of %s as models:/%s@%s (version %s)", model_uri, best_files.root, name, alias, version.version
    )
    return name, version.version
