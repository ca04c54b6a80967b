"""Bad inputs, table-driven: params, archives, prepared data, checkpoints, tracking stores, report inputs and
output locations. Each case runs a real stage (or command) as a process and must end with exit status 1, a single
`error:` line naming the culprit, no traceback, and nothing half-written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT, free_port, make_cifar_archive, prepare_subset
from vggdepth.engine import train_run
from vggdepth.evaluation import evaluate_run
from vggdepth.files import write_json
from vggdepth.runs import RunFiles

SEED = 0


@contextlib.contextmanager
def read_only_folder(path: Path, populate: Callable[[Path], None]) -> Iterator[Path]:
    """A folder nobody can write, root included: a read-only tmpfs when running as root (root ignores file
    modes), else a folder without write permission. `populate` fills it first."""
    path.mkdir(parents=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], check=True)
        try:
            populate(path)
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        populate(path)
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield path
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


def _file_size_limit(limit: int) -> Callable[[], None]:
    """A child process whose files cannot grow past `limit` bytes: writes fail as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@dataclass
class Workspace:
    """One case's folder: a params file, a copy of the prepared data and of the runs, and how to run a command."""

    root: Path
    raw: dict
    prepared: Path
    runs: Path
    archive: Path
    labels: Path
    env: dict = field(default_factory=dict)
    preexec: Callable[[], None] | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def write_params(self, raw: dict | None = None, text: str | None = None) -> Path:
        self.params.write_text(text if text is not None else yaml.safe_dump(raw or self.raw, sort_keys=False))
        return self.params

    def set(self, dotted: str, value) -> Workspace:
        """Change one value of params.yaml (`variants.VGG-08.lr`); `...` deletes it."""
        *parents, last = dotted.split(".")
        node = self.raw
        for part in parents:
            node = node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value
        self.write_params()
        return self

    def data(self) -> Path:
        """A fresh copy of the prepared data, to damage."""
        copy = self.root / "prepared"
        shutil.copytree(self.prepared, copy)
        return copy

    def run_folder(self, variant: str = "VGG-08") -> RunFiles:
        """A fresh copy of a finished run, to damage."""
        copy = self.root / "runs" / f"{variant}-s{SEED}"
        shutil.copytree(self.runs / copy.name, copy)
        return RunFiles(copy)

    def all_runs(self) -> Path:
        copy = self.root / "runs"
        shutil.copytree(self.runs, copy)
        return copy

    def stage(self, name: str, *args: str) -> list[str]:
        return [sys.executable, str(ROOT / "pipeline" / f"{name}.py"), *args, "--params", str(self.params)]

    def train(self, data: Path | None = None, out: Path | None = None, variant: str = "VGG-08") -> list[str]:
        return self.stage(
            "train",
            "--variant",
            variant,
            "--seed",
            str(SEED),
            "--out",
            str(out or self.root / "out"),
            "--data",
            str(data or self.prepared),
        )

    def evaluate(self, run: RunFiles, data: Path | None = None, labels: Path | None = None) -> list[str]:
        data, labels = str(data or self.prepared), str(labels or self.labels)
        return self.stage("evaluate", "--run", str(run.root), "--data", data, "--labels", labels)

    def report(self, runs: Path) -> list[str]:
        return self.stage("report", "--runs", str(runs), "--out", str(self.root / "report"))

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vggdepth", *args, "--params", str(self.params)]

    def tracking(self, uri: str) -> Workspace:
        self.set("tracking.enabled", True)
        self.env["MLFLOW_TRACKING_URI"] = uri
        return self


@dataclass(frozen=True)
class Case:
    """A command built in a workspace, the text its error line must contain, and outputs that must not exist."""

    make: Callable[[Workspace], list[str]]
    culprit: Callable[[Workspace], str] | str
    absent: tuple[str, ...] = ()  # paths relative to the workspace


CASES: dict[str, Case] = {}
REPORT_ABSENT = ("report",)


def case(name: str, culprit, absent: tuple[str, ...] = ("out/train.json",)):
    def register(make):
        CASES[name] = Case(make, culprit, absent)
        return make

    return register


# ---- params: rejected before any work, naming the field ------------------------------------------------------

PARAMS_CASES = {
    "batch-size-zero": ("variants.VGG-08.batch_size", 0, "variants.VGG-08.batch_size: input should be greater than 0"),
    "negative-lr": ("variants.VGG-08.lr", -1e-3, "variants.VGG-08.lr: input should be greater than 0"),
    "lr-as-string": ("variants.VGG-08.lr", "1e-3", "variants.VGG-08.lr: input should be a valid number"),
    "missing-field": ("train.epochs", ..., "train.epochs: field required"),
    "unknown-schedule": ("variants.VGG-08.schedule", "step", "variants.VGG-08.schedule: input should be 'cosine'"),
    "num-classes-not-cifar100": ("model.num_classes", 10, "model.num_classes: CIFAR-100 has 100 fine classes"),
    "too-many-stages": ("model.stages", 6, "model.stages: 6 stages would pool 32-pixel images below one pixel"),
    "empty-seeds": ("seeds", [], "seeds: list should have at least 1 item"),
    "duplicate-seeds": ("seeds", [0, 0], "seeds: each seed must appear once"),
    "seed-too-large-for-numpy": ("seeds", [2**32], "seeds.0: input should be less than 4294967296"),
    "lr-floor-above-lr": ("train.lr_min", 0.5, "train.lr_min: the floor 0.5 must be below every variant's lr"),
    "unknown-final-variant": ("report.final_variant", "VGG-99", "report.final_variant: unknown variant 'VGG-99'"),
    "device-name": ("runtime.device", "gpu", "runtime.device: string should match pattern"),
    "bad-md5": ("data.md5", "xyz", "data.md5: string should match pattern"),
    "guard-thresholds-crossed": ("report.guard.vanishing_below", 1.0, "report.guard: vanishing_below (1.0)"),
    "guard-unknown-variant": ("report.guard.learning", ["VGG-99"], "report.guard.learning: unknown variant"),
    "betas-out-of-range": ("train.betas", [0.9, 1.5], "train.betas.1: input should be less than 1"),
    "grid-threads-zero": ("grid.threads_per_run", 0, "grid.threads_per_run: a positive whole number or 'auto' (got 0)"),
    "grid-groups-per-gpu-word": (
        "grid.groups_per_gpu",
        "many",
        "grid.groups_per_gpu: a positive whole number or 'auto'",
    ),
    "grid-runs-per-group-zero": ("grid.runs_per_group", 0, "grid.runs_per_group: a positive whole number or 'auto'"),
    "grid-backend-unknown": ("grid.backend", "slurm", "grid.backend"),
    "top-k-above-classes": ("evaluate.top_k", 101, "evaluate.top_k: 101 is more than the 100 classes"),
    "calibration-one-bin": ("evaluate.calibration_bins", 1, "evaluate.calibration_bins: input should be greater than"),
    # every number is bounded and finite: values that once validated and then crashed or misled a stage
    "crop-padding-beyond-the-image": (
        "train.augment.crop_padding",
        100000,
        "train.augment.crop_padding: input should be less than or equal to 32 (got 100000)",
    ),
    "download-timeout-infinite": ("data.timeout_s", float("inf"), "data.timeout_s: input should be a finite number"),
    "request-timeout-overflows": (
        "tracking.request_timeout_s",
        10**10,
        "tracking.request_timeout_s: input should be less than or equal to 3600",
    ),
    "negative-slope-infinite": ("model.negative_slope", float("inf"), "model.negative_slope: input should be a finite"),
    "weight-decay-infinite": (
        "train.weight_decay",
        float("inf"),
        "train.weight_decay: input should be a finite number",
    ),
    "long-value-quoted-in-part": ("data.url", "http://x/" + "a" * 100_000, "a... (100011 characters))"),
    "per-class-figure-of-three": (
        "report.figures.fig7-per-class-final-vs-vgg08.variants",
        ["VGG-08", "VGG-38", "BN-VGG-38"],
        "a per_class figure draws 2 variant(s), got 3",
    ),
}
for _name, (_key, _value, _message) in PARAMS_CASES.items():
    case(f"params-{_name}", _message)(lambda ws, k=_key, v=_value: ws.set(k, v) and ws.train())


@case("params-unknown-key", "train.epoch: unknown key; did you mean 'epochs'?")
def _(ws):
    ws.raw["train"]["epoch"] = 3
    ws.write_params()
    return ws.train()


@case("params-variant-name-dvc-cannot-use", "variants.VGG.08.[key]: string should match pattern")
def _(ws):
    ws.raw["variants"]["VGG.08"] = ws.raw["variants"]["VGG-08"]
    ws.write_params()
    return ws.train()


@case("params-not-yaml", "not valid YAML")
def _(ws):
    ws.write_params(text="train: [unclosed\n")
    return ws.train()


@case("params-missing-file", "no such file")
def _(ws):
    ws.params.unlink()
    return ws.train()


@case("params-unknown-variant-option", "--variant: unknown variant 'VGG-99'")
def _(ws):
    return ws.train(variant="VGG-99")


@case("params-cuda-without-a-gpu", "runtime.device is 'cuda")
def _(ws):
    if torch.cuda.is_available():
        return ws.set("runtime.device", "cuda:9").train()
    return ws.set("runtime.device", "cuda").train()


GRID_ABSENT = ("runs-out/grid.json",)


def _grid(ws: Workspace) -> list[str]:
    out = ws.root / "runs-out"
    return ws.stage("grid", "--runs", str(out), "--out", str(out / "grid.json"), "--data", str(ws.prepared))


@case("grid-ray-client-address", "Ray Client (ray://) does not give", absent=GRID_ABSENT)
def _(ws):
    return _grid(ws.set("grid.address", "ray://127.0.0.1:10001"))


@case("grid-no-cluster-at-address", "no Ray cluster answers at 127.0.0.1:", absent=GRID_ABSENT)
def _(ws):
    ws.env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"
    return _grid(ws)


@case(
    "grid-more-threads-than-a-node-has",
    "grid.threads_per_run is 512 but the largest node has",
    absent=GRID_ABSENT,
)
def _(ws):
    return _grid(ws.set("grid.threads_per_run", 512))


# ---- archives ----------------------------------------------------------------------------------------------


def _download(ws: Workspace, url: str, md5: str | None = None) -> list[str]:
    ws.set("data.url", url)
    ws.set("data.md5", md5 or ws.raw["data"]["md5"])
    return ws.stage("download", "--out", str(ws.root / "raw" / "archive.tar.gz"))


SWEEP_ABSENT = ("sweep-out/report", "sweep-out/runs")


def _sweep(ws: Workspace) -> list[str]:
    return ws.stage("sweep", "--out", str(ws.root / "sweep-out"), "--data", str(ws.prepared))


@case(
    "sweep-more-images-than-prepared",
    "sweep.subset.train: 50 images per class asked, but the prepared train split has",
    absent=SWEEP_ABSENT,
)
def _(ws):
    return _sweep(ws)


@case("sweep-family-twice", "sweep.families: each value must appear once", absent=SWEEP_ABSENT)
def _(ws):
    return _sweep(ws.set("sweep.families", ["plain", "plain"]))


@case(
    "sweep-unknown-family",
    "sweep.families.0: input should be 'plain', 'bn', 'residual' or 'bn-residual'",
    absent=SWEEP_ABSENT,
)
def _(ws):
    return _sweep(ws.set("sweep.families", ["wide"]))


@case(
    "sweep-network-named-like-a-variant", "variants: plain-008 is also the name of a sweep network", absent=SWEEP_ABSENT
)
def _(ws):
    return _sweep(ws.set("variants.plain-008", ws.raw["variants"]["VGG-08"]))


def _sweep_guard(ws: Workspace, content: str) -> list[str]:
    summary = ws.root / "summary.json"
    row = {"val_acc": 0.5, "val_loss": 4.6, "entry_grad_min": 1e-3, "entry_grad_max": 1e-3}
    summary.write_text(json.dumps({v: row for v in ("VGG-08", "VGG-38", "BN-VGG-38")}))
    (ws.root / "sweep.json").write_text(content)
    return ws.cli("guard", "--summary", str(summary), "--sweep", str(ws.root / "sweep.json"))


@case("guard-sweep-record-empty", "sweep.json: rows: list should have at least 1 item", ())
def _(ws):
    return _sweep_guard(ws, json.dumps({"rows": []}))


@case("guard-sweep-record-inf-gradient", "sweep.json: rows.0.entry_grad: input should be a finite number", ())
def _(ws):
    row = {"family": "plain", "layers": 8, "entry_grad": 1e999, "val_acc": 0.1, "val_loss": 4.0, "learns": True}
    return _sweep_guard(ws, json.dumps({"rows": [row]}).replace("Infinity", "1e999"))


@case("archive-wrong-md5", "md5 mismatch", absent=("raw/archive.tar.gz",))
def _(ws):
    return _download(ws, str(ws.archive), "0" * 32)


@case("archive-missing-file", "archive not found", absent=("raw/archive.tar.gz",))
def _(ws):
    return _download(ws, str(ws.root / "nowhere.tar.gz"))


@case("archive-unsupported-scheme", "unsupported data.url scheme 'ftp'", absent=("raw/archive.tar.gz",))
def _(ws):
    return _download(ws, "ftp://127.0.0.1/cifar-100-python.tar.gz")


@case("archive-unreachable-host", "cannot reach 127.0.0.1", absent=("raw/archive.tar.gz",))
def _(ws):
    return _download(ws, f"http://127.0.0.1:{free_port()}/cifar-100-python.tar.gz")


def _prepare(ws: Workspace, archive: Path) -> list[str]:
    return ws.stage("prepare", "--archive", str(archive), "--out", str(ws.root / "prepared-out"))


@case("archive-not-gzip", "as the CIFAR-100 python archive", absent=("prepared-out",))
def _(ws):
    bogus = ws.root / "bogus.tar.gz"
    bogus.write_bytes(b"plain text, not a tar.gz")
    return _prepare(ws, bogus)


@case("archive-without-meta", "has no cifar-100-python/meta", absent=("prepared-out",))
def _(ws):
    import tarfile

    partial = ws.root / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(ws.root / "params.yaml", arcname="cifar-100-python/readme")
    return _prepare(ws, partial)


# ---- prepared data -------------------------------------------------------------------------------------------


@case("prepared-stats-missing", "stats.json is missing")
def _(ws):
    data = ws.data()
    (data / "stats.json").unlink()
    return ws.train(data=data)


@case("prepared-stats-without-keys", "stats.json: archive_md5: field required (and 1 more)")
def _(ws):
    data = ws.data()
    stats = json.loads((data / "stats.json").read_text())
    del stats["archive_md5"], stats["mean"]
    (data / "stats.json").write_text(json.dumps(stats))
    return ws.train(data=data)


@case("prepared-stats-not-json", "stats.json: not JSON")
def _(ws):
    data = ws.data()
    (data / "stats.json").write_text("{ half")
    return ws.train(data=data)


@case("prepared-npz-garbage", "train.npz is damaged")
def _(ws):
    data = ws.data()
    (data / "train.npz").write_bytes(b"PK\x03\x04 garbage")
    return ws.train(data=data)


@case("prepared-npz-truncated", "val.npz is damaged")
def _(ws):
    data = ws.data()
    (data / "val.npz").write_bytes((data / "val.npz").read_bytes()[:2000])
    return ws.train(data=data)


def _rewrite_split(data: Path, name: str, **arrays) -> None:
    with np.load(data / f"{name}.npz") as old:
        current = {k: old[k] for k in old.files}
    current.update(arrays)
    np.savez(data / f"{name}.npz", **current)


@case("prepared-labels-out-of-range", "train.npz has labels outside 0..99")
def _(ws):
    data = ws.data()
    _rewrite_split(data, "train", labels=np.full(200, 150, dtype=np.uint8))
    return ws.train(data=data)


@case("prepared-images-wrong-shape", "test.npz has images uint8 (100, 3, 16, 16)")
def _(ws):
    data = ws.data()
    _rewrite_split(data, "test", images=np.zeros((100, 3, 16, 16), dtype=np.uint8))
    return ws.evaluate(ws.run_folder(), data=data)


@case("prepared-labels-as-strings", "train.npz has labels <U3 and indices int32, expected whole numbers")
def _(ws):
    data = ws.data()
    with np.load(data / "train.npz") as old:
        labels = old["labels"].astype(str)
    _rewrite_split(data, "train", labels=labels)
    return ws.train(data=data)


@case("prepared-a-101st-class", "stats.json: classes: list should have at most 100 items")
def _(ws):
    data = ws.data()
    stats = json.loads((data / "stats.json").read_text())
    (data / "stats.json").write_text(json.dumps({**stats, "classes": [*stats["classes"], "dragon"]}))
    with np.load(data / "train.npz") as old:
        labels = old["labels"].copy()
    labels[0] = 100
    _rewrite_split(data, "train", labels=labels)
    return ws.train(data=data)


@case("prepared-npz-is-a-fifo", "train.npz is a FIFO, not a regular file")
def _(ws):
    data = ws.data()
    (data / "train.npz").unlink()
    os.mkfifo(data / "train.npz")  # opened, it would block the stage forever
    return ws.train(data=data)


@case("prepared-stats-is-a-folder", "stats.json is a folder, not a regular file")
def _(ws):
    data = ws.data()
    (data / "stats.json").unlink()
    (data / "stats.json").mkdir()
    return ws.train(data=data)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def _finished_run_at_out(ws: Workspace) -> RunFiles:
    run = ws.run_folder()
    os.replace(run.root, ws.root / "out")
    return RunFiles(ws.root / "out")


@case("checkpoint-garbage-last", lambda ws: f"checkpoint {ws.root / 'out/checkpoints/last.pt'} is damaged", absent=())
def _(ws):
    run = _finished_run_at_out(ws)
    run.train_json.unlink()
    run.last.write_bytes(b"garbage")
    return ws.train()


@case(
    "checkpoint-truncated-best-under-evaluate", "best.pt is damaged or truncated", absent=("runs/VGG-08-s0/test.json",)
)
def _(ws):
    run = ws.run_folder()
    run.test_json.unlink()
    run.best.write_bytes(run.best.read_bytes()[:3000])
    return ws.evaluate(run)


@case("checkpoint-tampered", "which a checkpoint never needs", absent=("runs/VGG-08-s0/test.json",))
def _(ws):
    run = ws.run_folder()
    run.test_json.unlink()
    state = torch.load(run.last, weights_only=True)
    state["extra"] = {"payload": _Payload(ws.root / "pwned")}
    torch.save(state, run.last)
    return ws.evaluate(run)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@case("checkpoint-best-as-last", "cannot resume a run: it has no optimizer", absent=())
def _(ws):
    run = _finished_run_at_out(ws)
    run.train_json.unlink()
    shutil.copy(run.best, run.last)  # a hand-made "repair"
    return ws.train()


@case("checkpoint-not-ours", "is not a vggdepth checkpoint", absent=("runs/VGG-08-s0/test.json",))
def _(ws):
    run = ws.run_folder()
    run.test_json.unlink()
    torch.save({"weights": torch.zeros(3)}, run.best)
    return ws.evaluate(run)


EVALUATE_ABSENT = tuple(f"runs/VGG-08-s0/{name}" for name in ("test.json", "predictions.npz", "per_class.csv"))


def _evaluate_again(ws: Workspace) -> RunFiles:
    """A copy of a finished run without its evaluation."""
    run = ws.run_folder()
    for name in EVALUATE_ABSENT:
        (ws.root / name).unlink()
    return run


@case("labels-missing", "labels.json is missing; run `dvc repro labels`", absent=EVALUATE_ABSENT)
def _(ws):
    return ws.evaluate(_evaluate_again(ws), labels=ws.root / "labels.json")


@case("labels-of-another-archive", "is of the archive with md5 00000000", absent=EVALUATE_ABSENT)
def _(ws):
    data = json.loads(ws.labels.read_text())
    (ws.root / "labels.json").write_text(json.dumps({**data, "archive_md5": "0" * 32}))
    return ws.evaluate(_evaluate_again(ws), labels=ws.root / "labels.json")


@case("labels-class-names-differ", "does not name the prepared data's classes", absent=EVALUATE_ABSENT)
def _(ws):
    data = json.loads(ws.labels.read_text())
    (ws.root / "labels.json").write_text(json.dumps({**data, "classes": [*data["classes"][:-1], "dragon"]}))
    return ws.evaluate(_evaluate_again(ws), labels=ws.root / "labels.json")


@case("labels-archive-without-superclasses", "names 100 classes and 0 superclasses", absent=("labels.json",))
def _(ws):
    archive = make_cifar_archive(ws.root / "no-superclasses.tar.gz")
    with tarfile.open(archive) as tar:
        members = {m.name: pickle.loads(tar.extractfile(m).read()) for m in tar.getmembers()}  # noqa: S301
    members["cifar-100-python/meta"]["coarse_label_names"] = []
    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return [sys.executable, str(ROOT / "pipeline" / "labels.py"), "--archive", str(archive), "--out", "labels.json"]


@case("checkpoint-of-other-classes", "is a network of 10 classes, the test set has 100", absent=EVALUATE_ABSENT)
def _(ws):
    run = _evaluate_again(ws)
    state = torch.load(run.best, weights_only=True)
    state["model_config"]["num_classes"] = 10
    torch.save(state, run.best)
    return ws.evaluate(run)


@case("checkpoint-missing-for-evaluate", "does not exist: train the run first", absent=("runs/VGG-08-s0/test.json",))
def _(ws):
    run = ws.run_folder()
    run.test_json.unlink()
    shutil.rmtree(run.checkpoints)
    return ws.evaluate(run)


@case("checkpoint-longer-than-epochs", "holds this run trained for 2 epochs, more than train.epochs=1", absent=())
def _(ws):
    from vggdepth.config import load_params
    from vggdepth.data import load_prepared

    ws.set("train.epochs", 2)
    train_run(load_params(ws.params), "VGG-08", SEED, load_prepared(ws.prepared), ws.root / "out")
    (ws.root / "out" / "train.json").unlink()
    ws.set("train.epochs", 1)  # a smaller number in a file must not cost the longer run
    return ws.train()


# ---- tracking stores -----------------------------------------------------------------------------------------


@case("tracking-unknown-scheme", "unknown tracking store scheme 'ftp'", absent=("out",))
def _(ws):
    return ws.tracking("ftp://127.0.0.1/mlflow").train()


@case("tracking-unreachable-server", "cannot be used", absent=("out",))
def _(ws):
    return ws.tracking(f"http://127.0.0.1:{free_port()}").train()


@case("tracking-not-an-mlflow-server", "cannot be used (HTTP 404", absent=("out",))
def _(ws):
    return ws.tracking(ws.env["NOT_MLFLOW_URL"]).train()


def _store(root: Path) -> str:
    """An embedded MLflow store with the project's experiment, made in `root`."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    subprocess.run(
        [sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({uri!r}).create_experiment('vggdepth')"],
        check=True,
        capture_output=True,
        cwd=root,
    )
    return uri


@case("tracking-read-only-store", "is read-only", absent=("out",))
def _(ws):
    uris = []
    ws.stack.enter_context(read_only_folder(ws.root / "ro-store", lambda p: uris.append(_store(p))))
    return ws.tracking(uris[0]).train()


@case("tracking-deleted-experiment", "experiment 'vggdepth' (id 1) is deleted", absent=("out",))
def _(ws):
    uri = _store(ws.root)
    subprocess.run(
        [sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({uri!r}).delete_experiment('1')"],
        check=True,
        capture_output=True,
    )
    return ws.tracking(uri).train()


@case("tracking-run-trained-without-tracking", "names no MLflow run", absent=("runs/VGG-08-s0/test.json",))
def _(ws):
    run = ws.run_folder()
    run.test_json.unlink()
    return ws.tracking(_store(ws.root)).evaluate(run)


@case("tracking-store-refuses-the-test-metrics", "refused the test metrics", absent=("runs/VGG-08-s0/test.json",))
def _(ws):
    run = ws.run_folder()
    run.test_json.unlink()
    state = torch.load(run.last, weights_only=True)  # a run id this store has never seen (another store's)
    state["extra"] = {"mlflow_run_id": "0123456789abcdef0123456789abcdef"}
    torch.save(state, run.last)
    return ws.tracking(_store(ws.root)).evaluate(run)


@case("tracking-report-of-untracked-runs", "names no MLflow run", absent=REPORT_ABSENT)
def _(ws):
    return ws.tracking(_store(ws.root)).report(ws.all_runs())


# ---- report and guard inputs ---------------------------------------------------------------------------------


def _damaged_report(ws: Workspace, damage: Callable[[Path], None]) -> list[str]:
    runs = ws.all_runs()
    damage(runs)
    return ws.report(runs)


@case("report-epochs-not-numbers", "epochs.csv, line 2: not a number", absent=REPORT_ABSENT)
def _(ws):
    def damage(runs):
        path = runs / "VGG-38-s0" / "epochs.csv"
        header, row = path.read_text().splitlines()[:2]
        path.write_text(f"{header}\n{row.replace(',', ',x', 1)}\n")

    return _damaged_report(ws, damage)


@case("report-epochs-missing-column", "epochs.csv lacks the column(s) val_acc", absent=REPORT_ABSENT)
def _(ws):
    def damage(runs):
        path = runs / "BN-VGG-38-s0" / "epochs.csv"
        path.write_text(path.read_text().replace("val_acc", "val_accuracy"))

    return _damaged_report(ws, damage)


@case("report-epochs-empty", "epochs.csv has no rows", absent=REPORT_ABSENT)
def _(ws):
    def damage(runs):
        path = runs / "VGG-08-s0" / "epochs.csv"
        path.write_text(path.read_text().splitlines()[0] + "\n")

    return _damaged_report(ws, damage)


@case("report-test-json-damaged", "test.json: not JSON", absent=REPORT_ABSENT)
def _(ws):
    return _damaged_report(ws, lambda runs: (runs / "VGG-08-s0" / "test.json").write_text('{"best": '))


@case("report-predictions-wrong-length", "predictions.npz holds 50 images, the test set 100", absent=REPORT_ABSENT)
def _(ws):
    def damage(runs):
        path = runs / "HIGHLR-BN-38-s0" / "predictions.npz"
        with np.load(path) as f:
            arrays = {name: f[name] if f[name].ndim == 0 else f[name][:50] for name in f.files}
        np.savez_compressed(path, **arrays)

    return _damaged_report(ws, damage)


@case("report-predictions-damaged", "predictions.npz is damaged", absent=REPORT_ABSENT)
def _(ws):
    return _damaged_report(ws, lambda runs: (runs / "BN-VGG-38-s0" / "predictions.npz").write_bytes(b"PK\x03\x04"))


@case("report-per-class-missing", "per_class.csv is missing", absent=REPORT_ABSENT)
def _(ws):
    return _damaged_report(ws, lambda runs: (runs / "VGG-08-s0" / "per_class.csv").unlink())


@case("report-test-json-without-keys", "test.json: best.epoch: field required", absent=REPORT_ABSENT)
def _(ws):
    return _damaged_report(ws, lambda runs: (runs / "MBS50-BN-38-s0" / "test.json").write_text('{"best": {}}'))


@case("report-train-json-missing", "train.json. Run `dvc repro`", absent=REPORT_ABSENT)
def _(ws):
    return _damaged_report(ws, lambda runs: (runs / "VGG-38-s0" / "train.json").unlink())


@case("report-gradients-damaged", "gradients.csv, line 2: not a number", absent=REPORT_ABSENT)
def _(ws):
    def damage(runs):
        path = runs / "VGG-38-s0" / "gradients.csv"
        lines = path.read_text().splitlines()
        lines[1] = lines[1].rsplit(",", 1)[0] + ",oops"
        path.write_text("\n".join(lines) + "\n")

    return _damaged_report(ws, damage)


@case("report-stale-epochs", "epochs.csv has 1 epochs", absent=REPORT_ABSENT)
def _(ws):
    def damage(runs):
        path = runs / "VGG-08-s0" / "train.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "epochs": 5}))

    return _damaged_report(ws, damage)


@case("report-reference-table-missing", "paper-table1.csv is missing", absent=REPORT_ABSENT)
def _(ws):
    (ws.root / "reference" / "paper-table1.csv").unlink()
    return ws.report(ws.all_runs())


@case("guard-summary-missing", "summary.json is missing; run the pipeline", absent=())
def _(ws):
    return ws.cli("guard", "--summary", str(ws.root / "summary.json"))


@case("guard-summary-without-gradients", "summary.json: VGG-08.entry_grad_min: field required", absent=())
def _(ws):
    path = ws.root / "summary.json"
    row = {"val_acc": 0.1, "val_loss": 4.6}
    path.write_text(json.dumps({v: row for v in ws.raw["variants"]}))
    return ws.cli("guard", "--summary", str(path))


@case(
    "report-train-json-a-word", "train.json: parameters: input should be a valid integer (found 'many')", REPORT_ABSENT
)
def _(ws):
    def damage(runs):
        path = runs / "VGG-38-s0" / "train.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "parameters": "many"}))

    return _damaged_report(ws, damage)


@case("report-train-json-a-list", "train.json: the whole file: a JSON object is expected", REPORT_ABSENT)
def _(ws):
    return _damaged_report(ws, lambda runs: (runs / "VGG-08-s0" / "train.json").write_text("[1]"))


@case("report-test-json-top-k-a-word", "test.json: best: test_top5: a finite number is expected", REPORT_ABSENT)
def _(ws):
    def damage(runs):
        path = runs / "BN-VGG-38-s0" / "test.json"
        test = json.loads(path.read_text())
        path.write_text(json.dumps({**test, "best": {**test["best"], "test_top5": "x"}}))

    return _damaged_report(ws, damage)


def _guard(ws: Workspace, content: str | None) -> list[str]:
    path = ws.root / "summary.json"
    if content is None:
        os.mkfifo(path)  # opened, it would block the guard forever
    else:
        path.write_text(content)
    return ws.cli("guard", "--summary", str(path))


@case("guard-summary-a-list", "summary.json: the whole file: a JSON object is expected (found [])", ())
def _(ws):
    return _guard(ws, "[]")


@case("guard-summary-null", "summary.json: the whole file: a JSON object is expected (found None)", ())
def _(ws):
    return _guard(ws, "null")


@case("guard-summary-number-a-string", "summary.json: VGG-08.val_acc: input should be a valid number (found '0.5')", ())
def _(ws):
    row = {"val_acc": "0.5", "val_loss": 4.6, "test_acc": 0.1, "epochs": 1, "entry_grad_min": 1, "entry_grad_max": 1}
    return _guard(ws, json.dumps({"VGG-08": row}))


@case("guard-summary-variant-absent", "has no row of VGG-38, BN-VGG-38", ())
def _(ws):
    row = {"val_acc": 0.5, "val_loss": 4.6, "test_acc": 0.1, "epochs": 1, "entry_grad_min": 1, "entry_grad_max": 1}
    return _guard(ws, json.dumps({"VGG-08": row}))


@case("guard-summary-a-fifo", "summary.json is a FIFO, not a regular file", ())
def _(ws):
    return _guard(ws, None)


# ---- records of runs trained elsewhere (sync imports a lease's or a study's runs from their tables) ------------


def _lease_run(ws: Workspace, record: object) -> RunFiles:
    """VGG-08's tables as a GPU lease brings them home (no checkpoints), with `record` as its lease.json."""
    lease = ws.root / "results" / "lease"
    run = RunFiles(lease / "runs" / f"VGG-08-s{SEED}")
    shutil.copytree(ws.runs / run.root.name, run.root, ignore=shutil.ignore_patterns("checkpoints"))
    (lease / "lease.json").write_text(json.dumps(record))
    return run


def _lease_record(ws: Workspace, **changes) -> dict:
    record = {"device": "NVIDIA H200", "torch": "2.14.1", "commit": "0" * 40, "finished_at": "2026-12-01T00:00:00Z"}
    return {**record, "params": ws.raw, "runs": [], **changes}


@case("sync-lease-train-json-a-list", "train.json: the whole file: a JSON object is expected", ())
def _(ws):
    run = _lease_run(ws, _lease_record(ws))
    run.train_json.write_text("[1]")
    return ws.cli("sync", str(run.root))


@case("sync-lease-record-a-list", "lease.json: the whole file: a JSON object is expected (found [])", ())
def _(ws):
    return ws.cli("sync", str(_lease_run(ws, []).root))


@case("sync-lease-record-invalid-params", "lease.json: invalid parameters:", ())
def _(ws):
    raw = json.loads(json.dumps(ws.raw))
    raw["train"]["epochs"] = -1
    return ws.cli("sync", str(_lease_run(ws, _lease_record(ws, params=raw)).root))


@case("sync-lease-train-json-of-another-run", "is the summary of VGG-38 seed 0, not of its folder's run", ())
def _(ws):
    run = _lease_run(ws, _lease_record(ws))
    shutil.copy(ws.runs / f"VGG-38-s{SEED}" / "train.json", run.train_json)
    return ws.cli("sync", str(run.root))


# ---- output locations: unwritable, full --------------------------------------------------------------------


@case("output-unwritable-train", "cannot write to", absent=())
def _(ws):
    folder = ws.stack.enter_context(read_only_folder(ws.root / "ro", lambda p: None))
    return ws.train(out=folder / "run")


@case("output-unwritable-prepare", "cannot write to", absent=())
def _(ws):
    folder = ws.stack.enter_context(read_only_folder(ws.root / "ro", lambda p: None))
    return ws.stage("prepare", "--archive", str(ws.archive), "--out", str(folder / "prepared"))


@case("output-unwritable-evaluate", "cannot write to", absent=())
def _(ws):
    def populate(folder):
        shutil.copytree(ws.runs / f"VGG-08-s{SEED}", folder / "run")
        (folder / "run" / "test.json").unlink()

    folder = ws.stack.enter_context(read_only_folder(ws.root / "ro", populate))
    return ws.evaluate(RunFiles(folder / "run"))


@case("output-full-disk-download", "cannot write", absent=("raw/archive.tar.gz",))
def _(ws):
    ws.preexec = _file_size_limit(1 << 20)
    return _download(ws, str(ws.archive), ws.env["ARCHIVE_MD5"])


@case("output-full-disk-prepare", "cannot write the prepared data to", absent=("prepared-out",))
def _(ws):
    ws.preexec = _file_size_limit(100_000)  # 200 training images alone are 614 kB
    return _prepare(ws, ws.archive)


@case("output-full-disk-train", "best.pt", absent=("out/train.json", "out/checkpoints/best.pt"))
def _(ws):
    ws.preexec = _file_size_limit(100_000)  # VGG-08's weights alone are 240 kB
    return ws.train()


@case("output-full-disk-report", "cannot write", absent=REPORT_ABSENT)
def _(ws):
    runs = ws.all_runs()
    ws.preexec = _file_size_limit(20_000)  # the tables fit, the figures do not
    return ws.report(runs)


# ---- a run is what its folder says it is ----------------------------------------------------------------------


@case(
    "identity-other-runs-checkpoints-under-evaluate",
    "is a checkpoint of VGG-38 seed 0, not of VGG-08 seed 0 (its folder)",
    absent=EVALUATE_ABSENT,
)
def _(ws):
    run = _evaluate_again(ws)
    other = RunFiles(ws.runs / f"VGG-38-s{SEED}")
    for name in ("best.pt", "last.pt", "previous.pt"):
        if (other.checkpoints / name).exists():
            shutil.copy(other.checkpoints / name, run.checkpoints / name)  # VGG-38's weights, in VGG-08's folder
    return ws.evaluate(run)


@case(
    "identity-checkpoint-of-other-settings-under-evaluate",
    "was trained with other settings, data or training code than params.yaml",
    absent=EVALUATE_ABSENT,
)
def _(ws):
    run = _evaluate_again(ws)
    ws.set("variants.VGG-08.lr", 2e-3)  # params.yaml now describes another run than the checkpoints hold
    return ws.evaluate(run)


@case(
    "identity-other-runs-tables-under-report",
    "is the summary of VGG-38 seed 0, not of VGG-08 seed 0 (its folder)",
    absent=REPORT_ABSENT,
)
def _(ws):
    def damage(runs):
        for name in ("train.json", "epochs.csv", "gradients.csv", "test.json"):
            shutil.copy(runs / f"VGG-38-s{SEED}" / name, runs / f"VGG-08-s{SEED}" / name)

    return _damaged_report(ws, damage)


@case("identity-other-runs-checkpoint-under-sync", "is a checkpoint of VGG-38 seed 0, not of VGG-08 seed 0", absent=())
def _(ws):
    run = ws.run_folder()
    shutil.copy(ws.runs / f"VGG-38-s{SEED}" / "checkpoints" / "last.pt", run.last)
    ws.set("tracking.enabled", True)
    return ws.cli("sync", str(run.root))


def _train_with_stat(ws: Workspace, key: str, channel: int, value: float) -> list[str]:
    """Train on a copy of the prepared data whose stats.json has `value` as `key`'s `channel`."""
    data = ws.data()
    stats = json.loads((data / "stats.json").read_text())
    stats[key][channel] = value
    (data / "stats.json").write_text(json.dumps(stats))  # json writes Infinity and NaN, which json reads back
    return ws.train(data=data)


@case("identity-stats-infinite-std", "stats.json: std.1: input should be a finite number")
def _(ws):
    return _train_with_stat(ws, "std", 1, float("inf"))


@case("identity-stats-nan-mean", "stats.json: mean.0: input should be a finite number")
def _(ws):
    return _train_with_stat(ws, "mean", 0, float("nan"))


def test_other_normalisation_statistics_make_another_run(params, tiny_data):
    """The statistics the images are normalised with are part of what identifies a run: a run trained with
    others is not restored under these (it is set aside, and these train)."""
    from vggdepth.engine import run_fingerprint

    p = params
    variant = p.variants["VGG-08"]
    other = {**tiny_data.stats, "std": [s * 1.5 for s in tiny_data.stats["std"]]}
    assert run_fingerprint(p.model, p.train, variant, 0, tiny_data.stats) != run_fingerprint(
        p.model, p.train, variant, 0, other
    )


# ---- the harness -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixtures(archive_path, archive_md5, params, labels, tmp_path_factory, http_server_module):
    """Prepared data (200/100/100 real images) and a finished run of every variant (1 epoch, no tracking)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    prepared = root / "prepared"
    data = prepare_subset(archive_path, prepared, params, train=2, val=1, test=1)
    quick = params.model_copy(
        update={
            "seeds": [SEED],
            "train": params.train.model_copy(update={"epochs": 1}),
            "runtime": params.runtime.model_copy(update={"device": "cpu"}),
            "tracking": params.tracking.model_copy(update={"enabled": False}),
        }
    )
    for variant in quick.variants:
        files = RunFiles.of(root / "runs", variant, SEED)
        train_run(quick, variant, SEED, data, files.root)
        evaluate_run(files, data, labels, quick.train, quick.runtime, quick.evaluate).write(files, labels)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(url=str(archive_path), md5=archive_md5)
    raw["prepare"]["subset"] = {"train": 2, "val": 1, "test": 1}
    raw["train"]["epochs"] = 1
    raw["runtime"]["device"] = "cpu"
    raw["seeds"] = [SEED]
    raw["tracking"]["enabled"] = False
    write_json(root / "labels.json", labels.to_json())
    return {
        "raw": raw,
        "prepared": prepared,
        "runs": root / "runs",
        "archive": archive_path,
        "md5": archive_md5,
        "labels": root / "labels.json",
    }


@pytest.fixture(scope="module")
def http_server_module(archive_path, tmp_path_factory):
    """A plain web server on 127.0.0.1 (not MLflow): serves a folder, 404 on anything else."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    folder = tmp_path_factory.mktemp("served")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _leftovers(root: Path) -> list[str]:
    """Temporary files and staging folders of our writers (`.<name>.<random>[.part]`) anywhere under `root`."""
    found = []
    for path in root.rglob(".*"):
        if path.name.endswith(".part") or (path.is_dir() and path.name.count(".") >= 2):
            found.append(str(path.relative_to(root)))
    return found


def test_every_json_the_stages_write_passes_its_own_schema(fixtures):
    """The schemas the readers hold every file to are the writers' own shape: what real stages wrote (a run of each
    variant, the prepared data, the labels) and what the CPU study committed (its record, its report's summary)
    read back whole."""
    from vggdepth import schemas

    for run in sorted(fixtures["runs"].iterdir()):
        train = schemas.read_record(run / "train.json", schemas.TrainRecord)
        assert (train.variant, train.seed, train.epochs) == (run.name.rsplit("-s", 1)[0], SEED, 1)
        test = schemas.read_record(run / "test.json", schemas.TestRecord)
        assert test.best.model_extra["test_top5"] >= test.best.test_acc
    stats = schemas.read_record(fixtures["prepared"] / "stats.json", schemas.StatsRecord)
    assert len(stats.classes) == 100 and stats.sizes == {"train": 200, "val": 100, "test": 100}
    labels = schemas.read_record(fixtures["labels"], schemas.LabelsRecord)
    assert labels.classes == stats.classes and len(labels.superclasses) == 20
    studies = [(p, schemas.read_record(p, schemas.StudyRecord)) for p in (ROOT / "results").glob("*-cpu-*/study.json")]
    reported = 0
    for study, record in studies:  # a study just begun has no runs collected yet, nor a report
        finished = {name.rsplit("-s", 1)[0] for name, run in record.runs.items() if run.state == "finished"}
        if finished:
            summary = schemas.read_record(study.parent / "report" / "summary.json", schemas.SummaryRecord)
            assert finished <= set(summary.root), study
            reported += 1
    assert reported  # VGG-08's study at least


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_clear_error_and_leaves_nothing_half_written(
    name, fixtures, http_server_module, tmp_path
):
    spec = CASES[name]
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copytree(ROOT / "reference", root / "reference")
    ws = Workspace(
        root,
        json.loads(json.dumps(fixtures["raw"])),
        fixtures["prepared"],
        fixtures["runs"],
        fixtures["archive"],
        fixtures["labels"],
        env={"NOT_MLFLOW_URL": http_server_module, "ARCHIVE_MD5": fixtures["md5"]},
    )
    ws.write_params()
    with ws.stack:
        command = spec.make(ws)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "RAY_"))}
        env.update({k: v for k, v in ws.env.items() if k.startswith(("MLFLOW_", "RAY_"))})
        result = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=600, preexec_fn=ws.preexec
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        print(f"{name}: {errors}")
        culprit = spec.culprit(ws) if callable(spec.culprit) else spec.culprit
        detail = f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
        assert result.returncode == 1, detail
        assert "Traceback" not in result.stderr, detail
        assert len(errors) == 1, detail
        message = result.stderr[result.stderr.index("error:") :]
        assert culprit in message, detail
        assert len(message) < 3000, f"{name}: the message quotes too much ({len(message)} characters)"
        assert _leftovers(root) == [], detail
        for path in spec.absent:
            assert not (root / path).exists(), f"{name}: {path} was written\n{detail}"
    assert not (root / "pwned").exists()


# ---- clean-up touches only what the project itself made -------------------------------------------------------


def test_clean_up_removes_its_writers_leftovers_by_exact_name_and_nothing_else(tmp_path):
    """What a killed writer of `prepared` leaves (a staging folder, a temporary file, the retired output) is removed;
    a user's own folders and files beside it, however alike in name, and a link named exactly like a leftover, stay."""
    import tempfile

    from vggdepth.files import clean_leftovers, staging_dir, temporary_prefix

    dest = tmp_path / "prepared"
    dest.mkdir()
    staging = staging_dir(dest)
    (staging / "train.npz").write_bytes(b"half")
    fd, part = tempfile.mkstemp(prefix=temporary_prefix(dest), suffix=".part", dir=tmp_path)
    os.close(fd)
    retired = tmp_path / ".prepared.vggdepth-old"
    retired.mkdir()
    ours = sorted([staging, Path(part), retired])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("mine\n")
    theirs = {
        ".prepared.backup-before-upgrade": "dir",  # the report's example: a user's backup
        ".prepared.old": "dir",
        ".prepared.notes.part": "file",
        ".prepared.vggdepth-tmp-mine": "dir",  # the writers' prefix, not their 8 random characters
        ".prepared.vggdepth-tmp-abcdefghi.part": "file",
        ".prepared.vggdepth-tmp-abcd1234": "link",  # a writer's very name, but a link: never followed or removed
        ".other.vggdepth-tmp-abcd1234": "dir",  # another output's: not this writer's to clean
    }
    for name, kind in theirs.items():
        path = tmp_path / name
        if kind == "dir":
            path.mkdir()
            (path / "keep.txt").write_text("mine\n")
        elif kind == "file":
            path.write_text("mine\n")
        else:
            path.symlink_to(elsewhere, target_is_directory=True)

    assert sorted(clean_leftovers(dest)) == ours
    assert not any(p.exists() for p in ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, "elsewhere", "prepared"])
    assert (elsewhere / "precious.txt").read_text() == "mine\n"
    assert all((tmp_path / n / "keep.txt").exists() for n, kind in theirs.items() if kind == "dir")
    assert clean_leftovers(dest) == []
