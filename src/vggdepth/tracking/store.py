"""The tracking store: where it is, whether it can be used, its experiment, the parent run of a pipeline run and
the runs under it, and the names every metric is logged under. Every other tracking module goes through `Store`.

Store: `$MLFLOW_TRACKING_URI` when set (a team server), else SQLite at `<project>/mlruns/mlflow.db` with artefacts
in `<project>/mlruns/artifacts`, by absolute path. The project is `$DVC_ROOT` (DVC points it at the real repository
even when an experiment runs in a temporary copy), else the working directory.

Runs: one per (variant, seed), named `<variant>-s<seed>`, nested under a parent run that groups one pipeline run:
the DVC experiment when there is one, else the git commit and parameters of a `dvc repro`.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vggdepth.checkpoints import load_checkpoint
from vggdepth.config import Params, TrackingConfig
from vggdepth.errors import VggdepthError
from vggdepth.files import path_kind
from vggdepth.gradients import GradientRow
from vggdepth.runs import EpochRecord, RunFiles, RunInfo

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


class DeadlineError(TrackingError):
    """The tracking store gave no complete answer to a request within its deadline (`Store.deadline_s`)."""


class Late(Exception):
    """An `Attempt` that has not ended within its deadline (it goes on, abandoned)."""


class Attempt:
    """`fn(*args, **kwargs)` running in a daemon thread: waited for up to a deadline and abandoned past it. A request
    abandoned so is never stopped (no thread can be), but nothing waits on it: it ends when its socket does, or
    with the process. `done` tells whether it has ended; `result` gives its value or raises its exception."""

    def __init__(self, name: str, fn, *args, **kwargs):
        self.done = threading.Event()
        self.value, self.error = None, None
        threading.Thread(target=self._run, args=(fn, args, kwargs), name=name, daemon=True).start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as exc:  # handed to whoever waits
            self.error = exc
        finally:
            self.done.set()

    def result(self, timeout_s: float):
        """Its value, once it has ended within `timeout_s`; `Late` when it has not (it goes on, abandoned)."""
        if not self.done.wait(max(timeout_s, 0.0)):
            raise Late(f"no answer within {timeout_s:g} s")
        if self.error is not None:
            raise self.error
        return self.value


def within(timeout_s: float, name: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, given up after `timeout_s` in all (`Late`): a total deadline, where a socket's
    timeout bounds only each read (a server that sends one byte a second never trips it)."""
    return Attempt(name, fn, *args, **kwargs).result(timeout_s)


class RequestWatch:
    """Runs an operation of several MLflow requests (logging a model: serialising it, then a request per file and
    a few more) and tells when the HTTP request it has under way began (`since`, monotonic; None between
    requests), so that each request, not the whole, gets a deadline. It watches
    `mlflow.utils.rest_utils.http_request`, through which MLflow's REST store and its `mlflow-artifacts:`
    repository (a server proxying artefacts) send their requests, with a profile hook in the operation's own
    thread. Not every wait on the network is inside it: a request MLflow sends from a thread of its own (it
    downloads files in a pool), a streamed download's body read after `http_request` returned, a multipart upload
    or one straight to cloud storage. `Store.call` caps the whole operation for those."""

    def __init__(self):
        self.since: float | None = None

    def run(self, fn, *args, **kwargs):
        from mlflow.utils import rest_utils

        code, depth = rest_utils.http_request.__code__, 0

        def hook(frame, event, _arg) -> None:
            nonlocal depth
            if frame.f_code is code and event in ("call", "return"):
                depth += 1 if event == "call" else -1
                self.since = (self.since or time.monotonic()) if depth > 0 else None

        sys.setprofile(hook)  # this thread only
        try:
            return fn(*args, **kwargs)
        finally:
            sys.setprofile(None)


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else the embedded SQLite store under `<root>/mlruns/` (absolute)."""
    if os.environ.get(URI_ENV):
        return os.environ[URI_ENV]
    return f"sqlite:///{(root or project_root()).resolve() / 'mlruns' / 'mlflow.db'}"


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def is_remote(uri: str) -> bool:
    """Whether the store is another machine (a tracking server, a database server), where a request can wait on
    a server that does not answer: every request to it has a total deadline (`Store.call`). A local store (a
    SQLite file, a folder) has no server to wait on; whatever would make MLflow wait there (a file that is not a
    regular file, a folder it cannot write) is refused at once by `check_reachable`."""
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0].lower()
    return len(scheme) > 1 and scheme not in ("file", "sqlite")  # one letter: a Windows drive


# Stores MLflow can track to: a server, a database, or a local folder.
KNOWN_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def _get(url: str, timeout_s: float) -> tuple[int, str, bytes]:
    """(status, reason, body) of GET `url`, an HTTP error's too; the whole request within `timeout_s` (`Late`),
    not only each read."""

    def request() -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) checked by caller)
                return response.status, response.reason, response.read()
        except urllib.error.HTTPError as exc:
            try:
                body = exc.read()
            except (OSError, http.client.HTTPException):
                body = b""
            return exc.code, exc.reason, body

    return within(timeout_s, f"vggdepth-probe {url}", request)


def _server_problem(uri: str, timeout_s: float) -> str | None:
    """Why the tracking server at `uri` cannot be used, or None when it answers as an MLflow server. Each probe is
    one request with a total deadline of `timeout_s`."""
    base = uri.rstrip("/")
    query = urllib.parse.urlencode({"experiment_name": "Default"})
    # Any web server may answer /health; only an MLflow server answers its REST API, with JSON.
    for path in ("/health", f"/api/2.0/mlflow/experiments/get-by-name?{query}"):
        where = "/health" if path == "/health" else "its REST API"
        try:
            status, reason, body = _get(f"{base}{path}", timeout_s)
        except Late:
            return f"no complete answer from {where} within {timeout_s:g} s (tracking.request_timeout_s)"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            return str(getattr(exc, "reason", exc)) or type(exc).__name__
        if path == "/health":
            if status != 200:
                return f"HTTP {status} {reason} from /health"
            continue
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status == 200 and answer is not None:
            return None
        # MLflow answers an unknown experiment (404) or a request without credentials (401, 403) in JSON.
        if status in (401, 403, 404) and isinstance(answer, dict) and answer.get("error_code"):
            return None
        if status != 200:
            return f"HTTP {status} {reason} from its REST API: is it an MLflow server?"
        return "its REST API does not answer with JSON: is it an MLflow server?"
    return None


def _local_store_problem(uri: str) -> str | None:
    """Why the local store at `uri` (a SQLite file, or a folder store) cannot be used, as the end of a sentence
    about it, or None. Refused at once, nothing opened: a path that is not what MLflow expects there (a folder, a
    FIFO or a device where the database file goes, which MLflow would retry for minutes or wait on forever), a
    folder it cannot create or write."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        path = uri.split("://", 1)[1].removeprefix("/").split("?", 1)[0]
        if not path or path == ":memory:":  # `sqlite://`: in memory
            return None
        database = Path(path)
        folder = database.parent
        if path_kind(folder) not in (None, "a folder"):
            return f"cannot be used: {folder} is {path_kind(folder)}, not a folder"
        for file in [database] + [database.with_name(database.name + end) for end in ("-journal", "-wal", "-shm")]:
            if path_kind(file) not in (None, "a regular file"):
                return (
                    f"cannot be used: {file} is {path_kind(file)}, where SQLite keeps a regular file. Move it away, "
                    f"point {URI_ENV} at another store, or set tracking.enabled: false"
                )
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
            except OSError as exc:
                return f"cannot be created: {folder}: {exc.strerror or exc}"
        if database.exists() and not os.access(database, os.W_OK):
            return "is read-only: MLflow cannot record runs in it"
        if not os.access(folder, os.W_OK | os.X_OK):  # a new database, and SQLite's journal, are written there
            return f"is read-only: MLflow cannot record runs in it (SQLite cannot write in {folder})"
        return None
    if scheme in ("file", "") or len(scheme) == 1:  # a folder store (a one-letter scheme is a Windows drive)
        folder = Path(urllib.request.url2pathname(urllib.parse.urlsplit(uri).path) if scheme == "file" else uri)
        if path_kind(folder) not in (None, "a folder"):
            return f"cannot be used: {folder} is {path_kind(folder)}, where MLflow keeps a folder"
    return None


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail at once, naming the URI, when the store's scheme is unknown, a tracking server does not answer as an
    MLflow server (each probe within `timeout_s` in all), or a local store's files are not what MLflow expects."""
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
    if not is_remote(uri) and (problem := _local_store_problem(uri)):
        raise TrackingError(f"the tracking store at {uri} {problem}")


@contextmanager
def store_errors(uri: str, what: str) -> Iterator[None]:
    """Any failure of MLflow or its database while doing `what`, as one line naming the store."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"MLflow at {uri} failed to {what}: {short(exc)}") from None


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
    stage: str = ""  # the DVC stage of every run under it, when one stage trains them all (the depth sweep)
    description: str = ""  # of the parent run in the UI; PARENT_DESCRIPTION when empty

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

    now = now_ms()
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

    # An operation of many requests (`call(each_request=True)`: logging a model or a folder of files, registering
    # a model) ends within this many request deadlines in all, whatever it waits on: generous (600 s with the
    # default settings), since a model's upload on a slow link is progress, not a server that does not answer.
    OPERATION_DEADLINES = 20

    def __init__(self, cfg: TrackingConfig, uri: str | None = None, root: Path | None = None):
        # Fail fast on a lost server: MLflow's defaults retry for minutes before an error comes back.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.request_retries))
        self.cfg = cfg
        self.root = (root or project_root()).resolve()
        self.uri = uri or tracking_uri(self.root)
        self.remote = is_remote(self.uri)
        self.http = urllib.parse.urlsplit(self.uri).scheme.lower() in ("http", "https")
        check_reachable(self.uri, cfg.request_timeout_s)  # before importing MLflow: a store refused takes no time
        if is_embedded(self.uri) and path_kind(self.artifacts) not in (None, "a folder"):
            raise TrackingError(
                f"the tracking store at {self.uri} cannot be used: {self.artifacts} is {path_kind(self.artifacts)}, "
                "where MLflow keeps the runs' artefacts in a folder. Move it away, or set tracking.enabled: false"
            )
        import mlflow
        from mlflow import MlflowClient

        with store_errors(self.uri, f"open experiment {cfg.experiment!r}"):
            mlflow.set_tracking_uri(self.uri)
            # Not within a deadline: a database store is migrated to MLflow's schema here, which takes what it
            # takes (a tracking server was probed above, and nothing here asks it anything).
            self.client = BoundedClient(MlflowClient(self.uri), self)
            self.experiment_id = self._experiment()

    @property
    def artifacts(self) -> Path:
        """Where the embedded store keeps artefacts: beside its database, not in ./mlartifacts of wherever."""
        return self.root / "mlruns" / "artifacts"

    @property
    def deadline_s(self) -> float:
        """The longest one request to the store may take, retries included: `tracking.request_timeout_s` for each
        of 1 + `tracking.request_retries` attempts. Also how long a training run's end waits for its queued
        epochs (`MlflowCallback`)."""
        return float(self.cfg.request_timeout_s * (self.cfg.request_retries + 1))

    @property
    def operation_cap_s(self) -> float:
        """The longest an operation of many requests (`call(each_request=True)`) may take in all."""
        return self.OPERATION_DEADLINES * self.deadline_s

    def call(self, what: str, fn, *args, each_request: bool = False, **kwargs):
        """`fn(*args, **kwargs)` against the store, within a total deadline; past it the call is abandoned (its
        thread goes on, nothing waits for it) and a one-line `DeadlineError` names the URI. MLflow's own timeout
        bounds each read of a socket, not a request: a server that trickles an answer would hold the stage
        forever.

        A call of the client (a request, or the few of one call: `log_batch` sends its chunks, `get_metric_history`
        its pages) gets `deadline_s`. With `each_request`, an operation of many requests and local work between
        them (logging a model or a folder of files, registering a model) gets `operation_cap_s` in all; on an
        MLflow server (http(s)://) each request that `RequestWatch` sees also gets `deadline_s`, so a server that
        stops answering fails the operation within one deadline, not the cap. A database store (postgresql://,
        ...) has no such watch: the cap alone bounds it. A local store (`is_remote`) is called directly: no server
        there can keep it waiting."""
        if not self.remote:
            return fn(*args, **kwargs)
        name = f"vggdepth-mlflow {what}"
        if not each_request:
            try:
                return within(self.deadline_s, name, fn, *args, **kwargs)
            except Late:
                raise self._late(what, self.deadline_s, self.bound()) from None
        ends = time.monotonic() + self.operation_cap_s
        watch = RequestWatch() if self.http else None
        attempt = Attempt(name, watch.run, fn, *args, **kwargs) if watch else Attempt(name, fn, *args, **kwargs)
        while True:
            # Until the request under way is due; between requests, a deadline's time to look again; the cap.
            since = watch.since if watch else None
            due = ends if watch is None else (time.monotonic() if since is None else since) + self.deadline_s
            try:
                return attempt.result(min(due, ends) - time.monotonic())
            except Late:
                if time.monotonic() >= ends:
                    raise self._late(what, self.operation_cap_s, self.cap()) from None
                if since is not None and watch.since == since:  # the same request, past its deadline
                    raise self._late(f"one of the requests to {what}", self.deadline_s, self.bound()) from None

    def _late(self, what: str, seconds: float, bound: str) -> DeadlineError:
        return DeadlineError(
            f"MLflow at {self.uri} gave no complete answer to {what} within {seconds:g} s ({bound}); the server is "
            "stuck or overloaded"
        )

    def cap(self) -> str:
        """How `operation_cap_s` comes from the settings, for messages."""
        return f"{self.OPERATION_DEADLINES} x {self.deadline_s:g} s, the deadline of one request"

    def bound(self) -> str:
        """How `deadline_s` comes from the settings, for messages."""
        return (
            f"tracking.request_timeout_s: {self.cfg.request_timeout_s} s for each of 1 + tracking.request_retries: "
            f"{self.cfg.request_retries} attempts"
        )

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
            location = self.artifacts.as_uri() if is_embedded(self.uri) else None
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

    def find(self, filter_string: str):
        runs = self.client.search_runs(
            [self.experiment_id], filter_string, max_results=10, order_by=["attributes.start_time ASC"]
        )
        return runs[0] if runs else None

    def parent_run(self, context: PipelineContext) -> str:
        """The parent run of this pipeline run, created on first use."""
        with store_errors(self.uri, f"find or create the parent run {context.name!r}"):
            return self._parent_run(context)

    def _parent_run(self, context: PipelineContext) -> str:
        found = self.find(f"tags.`{PARENT_KEY_TAG}` = '{context.key}'")
        if found is not None:
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=context.name,
            tags={
                PARENT_KEY_TAG: context.key,
                KIND_TAG: "pipeline",
                DESCRIPTION_TAG: context.description or PARENT_DESCRIPTION.format(name=context.name),
                **context.tags,
            },
        )
        # Finished from the start (no process holds it open); `stage_done` moves its end with every stage.
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def stage_done(self, run_id: str) -> None:
        """A stage has finished writing into `run_id` (a training run, or the parent run itself): the parent run now
        ends no earlier than now, so it spans the stages that have finished so far. The one place a parent run is
        found from a run under it, and the one place its end moves."""
        try:
            run = self.client.get_run(run_id)
            parent = run.data.tags.get("mlflow.parentRunId") or run_id
            if parent != run_id:
                run = self.client.get_run(parent)
            if (run.info.end_time or 0) < (now := now_ms()):
                self.client.set_terminated(parent, "FINISHED", end_time=now)
        except Exception as exc:  # the span is a courtesy: never worth a stage
            log.warning("could not extend the parent run of %s: %s", run_id, short(exc))

    def training_run(self, context: PipelineContext, run: RunInfo, stage: str) -> tuple[str, bool]:
        """(run id, created) for this (variant, seed): the one in its checkpoint, an unfinished one of the same
        settings under this parent, or a new one."""
        with store_errors(self.uri, f"start the run of {run.variant}-s{run.seed}"):
            return self._training_run(context, run, stage)

    def _training_run(self, context: PipelineContext, run: RunInfo, stage: str) -> tuple[str, bool]:
        parent = self.parent_run(context)
        known = run.extra.get(RUN_ID_KEY)
        if known:
            try:
                return self.client.get_run(known).info.run_id, False
            except Exception:
                log.warning("MLflow run %s from the checkpoint is not in %s: starting a new one", known, self.uri)
        unfinished = self.find(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.`vggdepth.fingerprint` = '{run.fingerprint}' "
            "and attributes.status != 'FINISHED'"
        )
        if unfinished is not None:
            return unfinished.info.run_id, False
        created = self.client.create_run(
            self.experiment_id,
            run_name=f"{run.variant}-s{run.seed}",
            tags={
                **training_tags(parent, run.variant, run.seed),
                "data_md5": run.config["data"]["archive_md5"],
                "dvc_stage": stage,
                "vggdepth.fingerprint": run.fingerprint,
                **context.tags,
            },
        )
        return created.info.run_id, True

    def logged_epochs(self, run_id: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, EPOCH_METRICS["train_loss"])}


class BoundedClient:
    """An `MlflowClient` whose every method call ends within the store's deadline (`Store.call`), so no caller
    (this package's modules, `sync`) can wait on the store forever. Most calls are one request; some are a few,
    bounded together (`log_batch` sends chunks of 1000 metrics, `get_metric_history` and `search_runs` page).
    A call that moves files (`EACH_REQUEST`: an upload may look up the run first, send a large file in parts, or
    go straight to cloud storage) is an operation of many requests: each that `RequestWatch` sees within the
    deadline, the whole within `Store.operation_cap_s`. `unbounded` is the client itself."""

    EACH_REQUEST = frozenset({"log_artifact", "log_artifacts", "log_model_artifacts", "download_artifacts"})

    def __init__(self, client, store: Store):
        self.unbounded, self._store = client, store

    def __getattr__(self, name: str):
        attribute = getattr(self.unbounded, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def bounded(*args, **kwargs):
            return self._store.call(name, attribute, *args, each_request=name in self.EACH_REQUEST, **kwargs)

        return bounded


def training_tags(parent: str, variant: str, seed: int) -> dict[str, str]:
    """The tags every training run has: its parent, kind, variant and seed."""
    return {"mlflow.parentRunId": parent, KIND_TAG: "training", "variant": variant, "seed": str(seed)}


def pending_epochs(history: list[EpochRecord], gradients: list[GradientRow], logged: set[int]) -> list[tuple]:
    """(epoch, metrics) of every epoch in `history` that MLflow has not got yet."""
    by_epoch: dict[int, list[GradientRow]] = {}
    for row in gradients:
        by_epoch.setdefault(row.epoch, []).append(row)
    return [(r.epoch, epoch_metrics(r, by_epoch.get(r.epoch, []))) for r in history if r.epoch not in logged]


def config_params(config: dict):
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in flatten(config).items()]


def now_ms() -> int:
    """MLflow's metric timestamp: milliseconds since the epoch."""
    return int(time.time() * 1000)


def short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def open_store(params: Params) -> Store | None:
    """The tracking store of a stage, checked before any work; None when `tracking.enabled` is false."""
    return Store(params.tracking) if params.tracking.enabled else None


def run_id_of(files: RunFiles, state: dict | None = None) -> str:
    """The MLflow run named in a run's last checkpoint (`state`, when already loaded)."""
    run_id = (state or load_checkpoint(files.last)).get("extra", {}).get(RUN_ID_KEY)
    if not run_id:
        raise TrackingError(
            f"{files.last} names no MLflow run: it was trained with tracking.enabled: false. Set "
            "tracking.enabled: false for this stage too, or retrain the run with tracking on"
        )
    return run_id
