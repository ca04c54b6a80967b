"""Shared fixtures: the real CIFAR-100 archive, small archives in its layout, and a loopback HTTP server."""

from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from vggdepth.config import Params, load_params
from vggdepth.download import md5sum
from vggdepth.runs import Callback

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar-100-python.tar.gz"


@pytest.fixture(scope="session")
def archive_path() -> Path:
    """The real CIFAR-100 python archive: $VGGDEPTH_ARCHIVE, else ../shared/data/ beside the checkout."""
    path = Path(os.environ.get("VGGDEPTH_ARCHIVE", DEFAULT_ARCHIVE))
    if not path.is_file():
        pytest.fail(f"the real CIFAR-100 archive is needed at {path}; set VGGDEPTH_ARCHIVE to its path")
    return path


@pytest.fixture(scope="session")
def archive_md5(archive_path: Path) -> str:
    return md5sum(archive_path)


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture
def raw_params() -> dict:
    """params.yaml as plain data, for tests that change a value and write it elsewhere."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_cifar_archive(path: Path, *, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """A small archive in the official layout (random pixels), for tests that need bytes, not images."""
    rng = np.random.default_rng(seed)

    def batch(per_class: int) -> dict:
        labels = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        return {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}

    members = {
        "train": batch(train_per_class),
        "test": batch(test_per_class),
        "meta": {
            "fine_label_names": [f"class{i:02d}" for i in range(100)],
            "coarse_label_names": [f"super{i:02d}" for i in range(20)],
        },
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def tiny_archive(tmp_path: Path) -> Path:
    return make_cifar_archive(tmp_path / "tiny-cifar-100-python.tar.gz")


class _Handler(SimpleHTTPRequestHandler):
    """Serves files from its directory, plus `/status/<code>` and `/truncated/<file>` for failure cases."""

    def do_GET(self) -> None:
        if self.path.startswith("/status/"):
            self.send_error(int(self.path.rsplit("/", 1)[1]))
        elif self.path.startswith("/truncated/"):
            body = (Path(self.directory) / self.path.removeprefix("/truncated/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection closes early
        else:
            super().do_GET()

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def http_server(tmp_path: Path, archive_path: Path):
    """An HTTP server on 127.0.0.1 serving a folder with the real archive; yields (base_url, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / archive_path.name).symlink_to(archive_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def prepare_subset(archive: Path, out: Path, params: Params, *, train: int, val: int, test: int):
    """The real archive prepared with `train`/`val`/`test` images per class (all 100 classes)."""
    from vggdepth.data import load_prepared, prepare

    subset = params.prepare.subset.model_copy(update={"train": train, "val": val, "test": test})
    prepare(archive, out, params.prepare.model_copy(update={"subset": subset}))
    return load_prepared(out)


@pytest.fixture(scope="session")
def tiny_data_dir(archive_path, params, tmp_path_factory) -> Path:
    """The prepared-data folder of `tiny_data`."""
    folder = tmp_path_factory.mktemp("tiny")
    prepare_subset(archive_path, folder, params, train=2, val=1, test=1)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tiny_data_dir):
    """200 training, 100 validation and 100 test images of the real data set, 2/1/1 per class."""
    from vggdepth.data import load_prepared

    return load_prepared(tiny_data_dir)


@pytest.fixture(scope="session")
def small_data(archive_path, params, tmp_path_factory):
    """500 training images of the real data set, 5 per class, so the class prior is uniform."""
    return prepare_subset(archive_path, tmp_path_factory.mktemp("small"), params, train=5, val=1, test=1)


@pytest.fixture(scope="session")
def labels(archive_path):
    """The real archive's class and superclass names (what the labels stage writes)."""
    from vggdepth.labels import read_labels

    return read_labels(archive_path)


@pytest.fixture
def quick_train(params):
    """The shipped training protocol, shortened."""

    def make(epochs: int = 2, **changes):
        return params.train.model_copy(update={"epochs": epochs, **changes})

    return make


@pytest.fixture(scope="session")
def cpu_runtime(params):
    """On the CPU, so results are bit-for-bit repeatable; progress checked every step."""
    return params.runtime.model_copy(update={"device": "cpu", "progress_every": 1})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artefacts folder) that tests can stop and restart."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> MlflowServer:
        import subprocess
        import sys
        import time
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {self.process.returncode}: "
                    f"{(self.root / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server at {self.uri} not healthy after {timeout_s} s")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow tracking server for the test session, stopped at its end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


def run_stage(script: str, *args: str, env: dict | None = None):
    """Run a stage's entry point (`pipeline/<script>.py`) as DVC would, from the project root."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, f"pipeline/{script}.py", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )


class KillAfter(Callback):
    """A training callback standing in for a kill: raises once `epochs` epochs are complete (checkpoint written)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, run, record, gradients) -> None:
        if record.epoch + 1 == self.epochs:
            raise KeyboardInterrupt
