"""Nothing waits forever, and tracking never slows training: servers on 127.0.0.1 that answer one byte every two
seconds or go silent mid-run, a tracking store whose database is a folder or a FIFO, a download source that is not
a regular file, artefact transfers that trickle. Every request has a total deadline (data.timeout_s;
tracking.request_timeout_s for each of 1 + tracking.request_retries attempts), an operation of many requests a cap
(Store.operation_cap_s), and a training run only queues what it sends to MLflow: fused runs included, whose ends
never hold the runs still training, nor wait one after another."""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, KillAfter, write_yaml
from tests.helpers import cpu_trainer, project_env
from vggdepth import download
from vggdepth.download import DownloadError, fetch_archive
from vggdepth.fused import train_fused
from vggdepth.runs import Callback
from vggdepth.tracking.callback import MlflowCallback
from vggdepth.tracking.report import log_table1
from vggdepth.tracking.store import DeadlineError, PipelineContext, Store, TrackingError

TRICKLE_S = 2.0  # one byte every two seconds: never silent long enough for a socket's timeout
VARIANT = "VGG-08"
SLACK_S = 1.5  # what a loaded 2-core machine adds to a bound before it is seen to hold
STAGE_TIMEOUT_S = 120  # a stage that outlives it fails its test (subprocess.TimeoutExpired), not the whole suite


def run_stage(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A stage's entry point run as DVC would, from the project root (tests.conftest.run_stage), within
    STAGE_TIMEOUT_S: a stage that waits forever is the failure these tests are about."""
    return subprocess.run(
        [sys.executable, f"pipeline/{script}.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=STAGE_TIMEOUT_S,
    )


class Trickler:
    """A server on 127.0.0.1 that sends `head` at once and then an endless answer, one byte every TRICKLE_S."""

    def __init__(self, head: bytes = b""):
        self.head = head
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.connections: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)  # a closed socket does not wake accept(): look at `stopping` now and then
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.connections.append(connection)
            thread = threading.Thread(target=self._answer, args=(connection,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _answer(self, connection: socket.socket) -> None:
        # After a head, a body that never ends; without one, an answer that never gets past its status line.
        rest = b" " * 100 if self.head else b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        try:
            connection.recv(65536)  # the request
            connection.sendall(self.head)
            for i in range(len(rest)):
                if self.stopping.wait(TRICKLE_S):
                    return
                connection.sendall(rest[i : i + 1])
        except OSError:
            return

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for connection in self.connections:
            connection.close()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def trickler():
    server = Trickler()
    yield server
    server.close()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of a real MLflow server, which can fail as servers do: once `swallow`
    says yes to a request, its connection is a black hole (the server never sees the request, the client never
    hears back: a server gone silent); with `trickle`, answers come one byte every TRICKLE_S; once `trickle_after`
    says yes to a request, the answers on its connection do (with `head_first`, all but the status line and
    headers: a body that trickles after the client has its answer's headers)."""

    def __init__(self, upstream: str):
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.swallow: Callable[[bytes], bool] | None = None
        self.trickle = False
        self.trickle_after: Callable[[bytes], bool] | None = None
        self.head_first = False
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def silence(self) -> None:
        self.swallow = lambda request: True

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        self.listener.settimeout(0.2)  # a closed socket does not wake accept(): look at `stopping` now and then
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.sockets += [client, server]
            dead, slow = threading.Event(), threading.Event()
            self._spawn(self._requests, client, server, dead, slow)
            self._spawn(self._answers, server, client, slow)

    def _recv(self, sock: socket.socket) -> bytes:
        sock.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                return sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return b""

    def _requests(self, client: socket.socket, server: socket.socket, dead: threading.Event, slow) -> None:
        while data := self._recv(client):
            if dead.is_set() or (self.swallow is not None and self.swallow(data)):
                dead.set()  # read and dropped from now on
                continue
            if self.trickle_after is not None and self.trickle_after(data):
                slow.set()  # before the server can answer
            try:
                server.sendall(data)
            except OSError:
                return

    def _answers(self, server: socket.socket, client: socket.socket, slow: threading.Event) -> None:
        headed = False
        while data := self._recv(server):
            try:
                if not (self.trickle or slow.is_set()):
                    client.sendall(data)
                    continue
                if self.head_first and not headed and (end := data.find(b"\r\n\r\n")) >= 0:
                    client.sendall(data[: end + 4])
                    data, headed = data[end + 4 :], True
                for i in range(len(data)):
                    if self.stopping.wait(TRICKLE_S):
                        return
                    client.sendall(data[i : i + 1])
            except OSError:
                return

    def close(self) -> None:
        self.stopping.set()
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def proxy(mlflow_server):
    front = Proxy(mlflow_server.uri)
    yield front
    front.close()


def _finishes(seconds: float, fn: Callable, *args, **kwargs):
    """fn's exception (or None), asserting that it returned within `seconds`: a test that waits forever is one
    that hides the very failure it is about. Returns (exception, elapsed seconds)."""
    outcome: dict = {}

    def call() -> None:
        try:
            fn(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return outcome.get("error"), elapsed


# ---- download -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [False, True], ids=["headers-trickle", "body-trickles"])
def test_download_from_a_trickling_server_ends_at_data_timeout(head, tmp_path):
    server = Trickler(head=b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" if head else b"")
    dest = tmp_path / "out" / "archive.tar.gz"
    try:
        error, elapsed = _finishes(3 + 10, fetch_archive, f"{server.url}/a.tar.gz", "0" * 32, dest, timeout_s=3)
    finally:
        server.close()

    assert isinstance(error, DownloadError)
    assert f"download from {server.url}/a.tar.gz did not complete within data.timeout_s = 3 s" in str(error)
    assert "\n" not in str(error)
    assert elapsed < 3 + SLACK_S
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_stage_with_a_trickling_server_fails_in_one_line(trickler, raw_params, tmp_path):
    raw_params["data"].update(url=f"{trickler.url}/cifar-100-python.tar.gz", timeout_s=3.0)
    params_file = write_yaml(tmp_path / "params.yaml", raw_params)
    dest = tmp_path / "raw" / "archive.tar.gz"

    result = run_stage("download", "--out", str(dest), "--params", str(params_file))

    assert result.returncode == 1
    assert result.stderr.startswith(f"error: download from {trickler.url}/cifar-100-python.tar.gz did not complete")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not dest.exists()


def test_download_from_a_silent_server_ends_at_the_read_timeout_long_before_data_timeout(monkeypatch, tmp_path):
    monkeypatch.setattr(download, "READ_TIMEOUT_S", 1.0)  # 60 s in use: a minute of silence is said at once
    server = Trickler(head=b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")  # then 2 s between bytes
    dest = tmp_path / "out" / "archive.tar.gz"
    try:
        error, elapsed = _finishes(10, fetch_archive, f"{server.url}/a.tar.gz", "0" * 32, dest, timeout_s=30)
    finally:
        server.close()

    assert isinstance(error, DownloadError)
    assert str(error) == f"download from {server.url}/a.tar.gz stalled: no data for 1 s; try again"
    assert elapsed < 1 + SLACK_S
    assert list(dest.parent.iterdir()) == []


def test_the_download_deadline_defaults_to_params_yaml(params):
    assert inspect.signature(fetch_archive).parameters["timeout_s"].default == params.data.timeout_s


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "archive.tar.gz")
    return tmp_path / "archive.tar.gz"


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "archive.tar.gz").mkdir()
    return tmp_path / "archive.tar.gz"


@pytest.mark.parametrize(
    ("make", "kind"),
    [(_fifo, "a FIFO"), (_folder, "a folder"), (lambda _: Path("/dev/zero"), "a character device")],
    ids=["fifo", "folder", "device"],
)
@pytest.mark.parametrize("form", ["path", "file_url"])
def test_download_refuses_a_local_source_that_is_not_a_regular_file(make, kind, form, tmp_path):
    source = make(tmp_path)
    url = str(source) if form == "path" else source.as_uri()
    dest = tmp_path / "out" / "archive.tar.gz"

    error, elapsed = _finishes(10, fetch_archive, url, "0" * 32, dest)

    assert isinstance(error, DownloadError)
    assert str(error) == (
        f"{source} (from data.url={url}) is {kind}, not a regular file: point data.url at the archive"
    )
    assert elapsed < 1
    assert list(dest.parent.iterdir()) == []


# ---- a tracking store that cannot be used, refused at once ------------------------------------------------------


def test_a_trickling_tracking_server_is_refused_within_its_timeout(trickler, params):
    cfg = params.tracking.model_copy(update={"request_timeout_s": 3, "request_retries": 0})

    error, elapsed = _finishes(3 * 2 + 10, Store, cfg, uri=trickler.url)

    assert isinstance(error, TrackingError)
    assert str(error).startswith(
        f"the MLflow tracking server at {trickler.url} cannot be used (no complete answer from /health within 3 s"
    )
    assert elapsed < 3 + SLACK_S


def test_train_stage_with_a_trickling_tracking_server_fails_in_one_line(trickler, raw_params, tmp_path):
    raw_params["tracking"]["request_timeout_s"] = 3
    params_file = write_yaml(tmp_path / "params.yaml", raw_params)
    out = tmp_path / "run"
    args = ["--variant", VARIANT, "--seed", "0", "--out", str(out), "--params", str(params_file)]
    env = project_env(tmp_path, MLFLOW_TRACKING_URI=trickler.url)

    started = time.monotonic()
    result = run_stage("train", *args, "--data", str(tmp_path / "no-data"), env=env)

    assert result.returncode == 1
    assert result.stderr.startswith(f"error: the MLflow tracking server at {trickler.url} cannot be used (no compl")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert time.monotonic() - started < 60  # it started Python and torch; it was killed at 150 s before
    assert not out.exists()


@pytest.mark.parametrize("kind", ["a folder", "a FIFO"])
def test_a_database_that_is_not_a_regular_file_is_refused_at_once(kind, params, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    database = tmp_path / "mlruns" / "mlflow.db"
    database.parent.mkdir()
    database.mkdir() if kind == "a folder" else os.mkfifo(database)

    error, elapsed = _finishes(10, Store, params.tracking, root=tmp_path)

    assert isinstance(error, TrackingError)
    assert str(error).startswith(
        f"the tracking store at sqlite:///{database} cannot be used: {database} is {kind}, where SQLite keeps a "
        "regular file"
    )
    assert elapsed < 1


def test_an_artefacts_folder_that_is_a_file_is_refused_at_once(params, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "artifacts").write_text("not a folder")

    error, elapsed = _finishes(10, Store, params.tracking, root=tmp_path)

    assert isinstance(error, TrackingError)
    assert f"cannot be used: {tmp_path / 'mlruns' / 'artifacts'} is a regular file, where MLflow keeps" in str(error)
    assert elapsed < 1


def test_train_stage_with_a_database_folder_fails_in_one_line_at_once(raw_params, tmp_path):
    (tmp_path / "mlruns" / "mlflow.db").mkdir(parents=True)
    params_file = write_yaml(tmp_path / "params.yaml", raw_params)
    out = tmp_path / "run"
    args = ["--variant", VARIANT, "--seed", "0", "--out", str(out), "--params", str(params_file)]

    result = run_stage("train", *args, "--data", str(tmp_path / "no-data"), env=project_env(tmp_path))

    assert result.returncode == 1
    assert result.stderr == (
        f"error: the tracking store at sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'} cannot be used: "
        f"{tmp_path / 'mlruns' / 'mlflow.db'} is a folder, where SQLite keeps a regular file. Move it away, point "
        "MLFLOW_TRACKING_URI at another store, or set tracking.enabled: false\n"
    )
    assert not out.exists()


# ---- a server lost mid-run: training does not wait --------------------------------------------------------------


class Clock(Callback):
    """When each hook of the training loop reached it (monotonic)."""

    def __init__(self):
        self.start, self.epochs, self.end = 0.0, [], 0.0

    def on_run_start(self, run) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, run, record, gradients) -> None:
        self.epochs.append(time.monotonic())

    def on_run_end(self, run, summary) -> None:
        self.end = time.monotonic()

    def on_run_error(self, run, error) -> None:
        self.end = time.monotonic()


class At(Callback):
    """Does `action` at the end of epoch `epoch` (before the callbacks after it in line)."""

    def __init__(self, epoch: int, action: Callable[[], None]):
        self.epoch, self.action = epoch, action

    def on_epoch_end(self, run, record, gradients) -> None:
        if record.epoch == self.epoch:
            self.action()


def _fit(params, data, quick_train, out: Path, callbacks: list[Callback], epochs: int = 3) -> float:
    """Train VGG-08 on the tiny data; the seconds from the run's start (after every callback's own start, the
    tracker's opening of its MLflow run included) to the end of `fit`."""
    clock = Clock()
    trainer = cpu_trainer(params, data, quick_train(epochs=epochs), out, [*callbacks, clock], VARIANT)
    try:
        trainer.fit()
    finally:
        elapsed = time.monotonic() - clock.start
    return elapsed


def _tracker(params, store: Store, out: Path) -> MlflowCallback:
    detected = PipelineContext.detect(params, cwd=ROOT)
    context = PipelineContext(key=f"test:{out}", name=f"test {out.parent.name}", tags=detected.tags)
    return MlflowCallback(store, context, f"train@{VARIANT}-0", Path("data/prepared"))


@pytest.fixture
def tracking_cfg(params):
    """A bound of 3 s a request (no retries); system metrics on, so their thread is stopped within it too."""
    return params.tracking.model_copy(update={"request_timeout_s": 3, "request_retries": 0, "system_metrics": True})


# The trickling server is slow only to keep the default suite short: MLflow's own timeout never trips on it.
@pytest.mark.parametrize("failure", ["silent", pytest.param("trickle", marks=pytest.mark.slow)])
def test_a_server_lost_mid_run_costs_training_nothing(
    failure, proxy, tracking_cfg, params, tiny_data, quick_train, tmp_path, caplog
):
    store = Store(tracking_cfg, uri=proxy.url)
    bound = store.deadline_s
    out = tmp_path / "run"
    before, after = Clock(), Clock()
    tracker = _tracker(params, store, out)

    def lose() -> None:
        if failure == "silent":
            proxy.silence()
        else:
            proxy.trickle = True

    with caplog.at_level(logging.INFO, logger="vggdepth.tracking"):
        # The server fails at the end of epoch 0, before the tracker hears of it.
        tracked_s = _fit(params, tiny_data, quick_train, out, [At(0, lose), before, tracker, after])

    # The tracker's hooks only queue: no epoch's end waits on the server (it was 30 s an epoch with a server gone
    # silent, and forever with one that trickles), the run's end at most one bound. Measured around the tracker's
    # own hooks, so how fast this machine trains does not enter.
    waits = [a - b for a, b in zip(after.epochs, before.epochs, strict=True)]
    ended = after.end - before.end
    print(f"{failure}: trained in {tracked_s:.1f} s; epochs waited {max(waits):.3f} s, the run's end {ended:.1f} s")
    assert max(waits) < 0.5, waits
    assert ended < bound + SLACK_S
    # One line says what MLflow lacks and how it gets there.
    run_id = tracker.run_id
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"MLflow run {run_id} is missing")]
    assert len(lines) == 1
    assert lines[0].startswith(f"MLflow run {run_id} is missing epochs [0, 1, 2], its artefacts and model, its status")
    assert f"`python -m vggdepth sync {out}` sends them" in lines[0]
    if failure == "trickle":  # any other request ends within its bound too, where MLflow's own timeout never trips
        answers: list[bool] = []
        _, elapsed = _finishes(bound + 10, lambda: answers.append(store.answers()))
        assert answers == [False] and elapsed < bound + SLACK_S


def test_a_stopped_run_is_marked_killed_within_the_bound_while_its_epochs_are_stuck(
    proxy, mlflow_server, tracking_cfg, params, tiny_data, quick_train, tmp_path, caplog
):
    store = Store(tracking_cfg.model_copy(update={"system_metrics": False}), uri=proxy.url)
    out = tmp_path / "run"
    before, after = Clock(), Clock()
    tracker = _tracker(params, store, out)

    def stick_metrics() -> None:  # metrics go nowhere from now on; everything else is answered
        proxy.swallow = lambda request: b"/runs/log-batch" in request

    with caplog.at_level(logging.INFO, logger="vggdepth.tracking"), pytest.raises(KeyboardInterrupt):
        # SIGTERM becomes a KeyboardInterrupt in a stage: here, after epoch 1, with epochs 0 and 1 stuck.
        _fit(params, tiny_data, quick_train, out, [At(0, stick_metrics), before, tracker, after, KillAfter(2)])

    assert after.end - before.end < store.deadline_s + SLACK_S
    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)  # straight to the server, not through the proxy
    assert run.info.status == "KILLED"
    assert run.data.tags["vggdepth.error"] == "KeyboardInterrupt"
    assert f"MLflow run {tracker.run_id} is missing epochs [0, 1] (" in caplog.text


def test_a_stopped_run_holds_no_fused_run_and_fused_runs_end_side_by_side(
    proxy, tracking_cfg, params, tiny_data, tmp_path, caplog
):
    """Three runs trained fused, the server gone silent after epoch 0: one run stopped then (as a diverged run
    is) learns it on the training thread without holding the others, and the two that finish end together, one
    bound for both, not one after another."""
    store = Store(tracking_cfg.model_copy(update={"system_metrics": False}), uri=proxy.url)
    bound = store.deadline_s
    p = params.model_copy(
        update={
            "train": params.train.model_copy(update={"epochs": 3}),
            "runtime": params.runtime.model_copy(update={"device": "cpu", "progress_every": 1}),
        }
    )

    class Diverges(Callback):
        def on_epoch_end(self, run, record, gradients) -> None:
            raise RuntimeError(f"{run.name} diverged at epoch {record.epoch}")

    trackers, before, after = {}, {}, {}

    def callbacks(variant: str, seed: int) -> list[Callback]:
        trackers[seed], before[seed], after[seed] = _tracker(params, store, tmp_path / "group"), Clock(), Clock()
        first = {0: [At(0, proxy.silence)], 1: [], 2: [Diverges()]}[seed]
        return [*first, before[seed], trackers[seed], after[seed]]

    with caplog.at_level(logging.INFO, logger="vggdepth.tracking"):
        group = train_fused(p, [(VARIANT, 0), (VARIANT, 1), (VARIANT, 2)], tiny_data, tmp_path / "runs", callbacks)

    assert [isinstance(o, dict) for o in group.outcome] == [True, True, False]
    stopped = after[2].end - before[2].end  # the tracker's on_run_error, on the training thread
    ended = after[1].end - before[0].end  # both trackers' on_run_end, one after the other
    print(f"the stopped run's error took {stopped:.3f} s; the two runs' ends {ended:.1f} s (bound {bound:g} s)")
    assert stopped < 0.5
    assert ended < bound + SLACK_S  # 2 bounds, one a run, before
    for seed, tracker in trackers.items():
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"MLflow run {tracker.run_id} ")]
        assert len(lines) == 1 and " is missing " in lines[0], (seed, lines)


def test_an_epoch_whose_request_was_lost_is_sent_again_once_the_server_answers(
    proxy, mlflow_server, tracking_cfg, params, tiny_data, quick_train, tmp_path, caplog
):
    """The request with epoch 0 never gets an answer (the server recovers once it is past its deadline): it is
    abandoned and the epoch sent again, with the later ones. (Every later epoch waited behind it, forever.)"""
    store = Store(tracking_cfg.model_copy(update={"system_metrics": False, "log_model": False}), uri=proxy.url)
    out = tmp_path / "run"
    tracker = _tracker(params, store, out)

    def lose_metrics() -> None:
        proxy.swallow = lambda request: b"/runs/log-batch" in request

    def recover() -> None:  # training waits here, as a slower one would, until the tracker gives up on epoch 0
        given_up = time.monotonic() + store.deadline_s + 10
        while tracker.offline_since is None and time.monotonic() < given_up:
            time.sleep(0.05)
        assert tracker.offline_since == 0
        proxy.swallow = None

    with caplog.at_level(logging.INFO, logger="vggdepth.tracking"):
        _fit(params, tiny_data, quick_train, out, [At(0, lose_metrics), At(1, recover), tracker])

    client = MlflowClient(mlflow_server.uri)  # straight to the server, not through the proxy
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "curves/train_loss")) == [0, 1, 2]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert "answers again: sent the epochs queued since epoch 0" in caplog.text
    assert f"MLflow run {tracker.run_id} is missing" not in caplog.text


def _artefact_transfer(request: bytes) -> bool:
    """A file going to or coming from the server's artefact store (not a listing: `artifacts?path=`)."""
    return request.startswith(
        (b"GET /api/2.0/mlflow-artifacts/artifacts/", b"PUT /api/2.0/mlflow-artifacts/artifacts/")
    )


@pytest.fixture
def artefact_store(proxy, params, tmp_path):
    """A store through the proxy, 2 s a request and a cap of 2 of those for an operation of many; a run with a
    file in it; from now on, every artefact file the proxy carries trickles its body."""
    cfg = params.tracking.model_copy(update={"request_timeout_s": 2, "request_retries": 0, "system_metrics": False})
    store = Store(cfg, uri=proxy.url)
    store.OPERATION_DEADLINES = 2
    run_id = store.client.create_run(store.experiment_id).info.run_id
    (tmp_path / "file.txt").write_text("a file\n" * 1000)
    store.client.log_artifact(run_id, str(tmp_path / "file.txt"))  # MLflow keeps the run's artefact store: the proxy
    proxy.trickle_after, proxy.head_first = _artefact_transfer, True
    return store, run_id


def test_an_artefact_transfer_that_trickles_ends_in_one_line_within_its_bound(artefact_store, proxy, tmp_path):
    store, run_id = artefact_store
    cap = store.operation_cap_s

    # A download's body is read after MLflow's request function returned (and in a thread of MLflow's own): no
    # request deadline sees it, the cap ends it.
    error, elapsed = _finishes(cap + 10, store.client.download_artifacts, run_id, "file.txt", str(tmp_path / "in"))
    assert isinstance(error, DeadlineError), error
    assert str(error) == (
        f"MLflow at {proxy.url} gave no complete answer to download_artifacts within {cap:g} s (2 x 2 s, the deadline "
        "of one request); the server is stuck or overloaded"
    )
    assert cap - 0.1 < elapsed < cap + SLACK_S

    # An upload's answer is read inside it: one request's deadline ends it.
    proxy.head_first = False  # its answer has no body: the status line trickles
    error, elapsed = _finishes(cap + 10, store.client.log_artifact, run_id, str(tmp_path / "file.txt"), "again")
    assert isinstance(error, DeadlineError), error
    assert str(error).startswith(
        f"MLflow at {proxy.url} gave no complete answer to one of the requests to log_artifact within 2 s ("
    )
    assert "\n" not in str(error)
    assert elapsed < store.deadline_s + SLACK_S


def test_table1_is_written_over_not_appended_to_and_never_downloaded(artefact_store, proxy, mlflow_server, tmp_path):
    """The report run twice on one parent: Table 1 once, not twice (mlflow.log_table downloads the table already
    there, here a download that trickles forever, and appends to it)."""
    store, parent = artefact_store
    proxy.trickle_after = lambda request: request.startswith(b"GET /api/2.0/mlflow-artifacts/artifacts/")
    table1 = tmp_path / "table1.csv"
    table1.write_text("variant,test_acc\nVGG-08,0.5\nVGG-38,0.25\n")

    for _ in range(2):
        error, elapsed = _finishes(store.operation_cap_s + 10, log_table1, store, parent, table1)
        assert error is None and elapsed < store.deadline_s, (error, elapsed)

    client = MlflowClient(mlflow_server.uri)
    table = client.load_table(store.experiment_id, "table1.json", run_ids=[parent])
    assert table.astype(str).to_dict("records") == [
        {"variant": "VGG-08", "test_acc": "0.5"},
        {"variant": "VGG-38", "test_acc": "0.25"},
    ]
    logged = json.loads(client.get_run(parent).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": "table1.json", "type": "table"}]
