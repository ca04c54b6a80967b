"""What several test modules share: the environment of a stage, waiting for a file with inotify, comparing two
runs' outputs, and a benchmark script loaded as a module."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tests.conftest import ROOT, write_yaml
from vggdepth.checkpoints import load_checkpoint
from vggdepth.runs import RunFiles


def benchmark_script(name: str):
    """`benchmarks/<name>.py` as a module (the folder is not a package), for tests of what it computes."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_env(root: Path, **extra: str) -> dict:
    """The environment of a stage run in the project folder `root`: no tracking server, DVC or Ray cluster of the
    calling shell; the embedded MLflow store under root/mlruns."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "RAY_"))}
    return {**clean, "DVC_ROOT": str(root), **extra}


IN_CREATE, IN_MOVED_TO = 0x100, 0x80
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Watch:
    """inotify on one folder: wait for a file or folder whose name passes a test to appear in it."""

    def __init__(self, folder: Path, mask: int = IN_CREATE | IN_MOVED_TO):
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0 and _libc.inotify_add_watch(self.fd, str(folder).encode(), mask) >= 0

    def wait(self, wanted: Callable[[str], bool], timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                break
            data, offset = os.read(self.fd, 1 << 16), 0
            while offset < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                if wanted(name):
                    return name
        raise AssertionError("the awaited file never appeared")

    def close(self) -> None:
        os.close(self.fd)


def timeless_csv(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = rows[0].index("seconds") if "seconds" in rows[0] else -1
    return [[v for i, v in enumerate(r) if i != drop] for r in rows]


def timeless_json(path: Path, ignore: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("seconds", "images_per_second", *ignore)}


def same_run(a: RunFiles, b: RunFiles, ignore: tuple[str, ...] = ()) -> None:
    """The same metrics, gradient table, summary (timings and `ignore` aside) and weights, bit for bit."""
    assert timeless_csv(a.epochs_csv) == timeless_csv(b.epochs_csv)
    assert a.gradients_csv.read_text() == b.gradients_csv.read_text()
    assert timeless_json(a.train_json, ignore) == timeless_json(b.train_json, ignore)
    for checkpoint in ("best", "last"):
        left, right = load_checkpoint(getattr(a, checkpoint)), load_checkpoint(getattr(b, checkpoint))
        assert left["epoch"] == right["epoch"]
        for name, tensor in left["model"].items():
            assert torch.equal(tensor, right["model"][name]), (checkpoint, name)


def narrow(raw: dict, variants: dict) -> dict:
    """Raw params with only `variants` ({name: settings}), and what refers to variants kept valid: the figures and
    reference curves of those variants only, the last one final, VGG-38 the vanishing one of the guard."""
    raw["variants"] = variants
    report = raw["report"]
    report["final_variant"] = list(variants)[-1]
    report["figures"] = {k: f for k, f in report["figures"].items() if set(f["variants"]) <= set(variants)}
    report["reference"]["curves"] = {k: c for k, c in report["reference"]["curves"].items() if k in variants}
    report["guard"].update(vanishing="VGG-38", learning=[v for v in variants if v not in ("VGG-38", "NAN")])
    return raw


DVC = str(Path(sys.executable).parent / "dvc")


def dvc_env() -> dict:
    """The environment of a `dvc` command in a test repository: this Python's `dvc` and `python`, no DVC, MLflow
    or Ray settings of the calling shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "RAY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # stages call `python`: this one
    return env


def run_ok(*args: str, cwd: Path) -> str:
    """Run a command in `cwd` (`dvc_env`); its stdout, or a failed assertion with everything it printed."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dvc_env())
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def tiny_clone(
    folder: Path, archive_path: Path, archive_md5: str, *, epochs: int, tracking: bool, variants: tuple = ()
) -> Path:
    """A clone of this repository (with this checkout's pipeline, benchmarks and params, committed or not) whose
    params train on 200 real images for `epochs` epochs, one seed, on the CPU; tracked in its own mlruns/ or not;
    only `variants` when given."""
    repo = folder / "repo"
    run_ok("git", "clone", "--quiet", str(ROOT), str(repo), cwd=folder)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(url=str(archive_path), md5=archive_md5)
    params["prepare"]["subset"] = {"train": 2, "val": 1, "test": 1}
    params["train"]["epochs"] = epochs
    params["runtime"]["device"] = "cpu"
    params["seeds"] = [0]
    params["tracking"].update(enabled=tracking, system_metrics=False)
    # the depth sweep at its smallest: one plain VGG-08 on the same 200 images (tests/test_sweep.py sweeps more)
    params["sweep"].update(families=["plain"], blocks_per_stage=[0], epochs=1, subset={"train": 2, "val": 1})
    if variants:
        narrow(params, {v: params["variants"][v] for v in variants})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("dvc.yaml", "pipeline", "src", "benchmarks"):
        run_ok("cp", "-r", str(ROOT / name), str(repo), cwd=repo)
    run_ok("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", ".", cwd=repo)
    run_ok("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "tiny", cwd=repo)
    return repo


def cpu_trainer(params, data, train, out: Path, callbacks: list, variant: str = "VGG-08"):
    """A Trainer of `variant`, seed 0, on the CPU with progress every step: the tracking tests' run."""
    from vggdepth.engine import Trainer
    from vggdepth.runs import RunFiles

    return Trainer(
        model=params.model,
        train=train,
        runtime=params.runtime.model_copy(update={"device": "cpu", "progress_every": 1}),
        variant_name=variant,
        variant=params.variant(variant),
        seed=0,
        data=data,
        files=RunFiles(out),
        callbacks=callbacks,
    )


def run_guard(params, tmp_path: Path, sweep: Path | None = None, **changes: dict) -> subprocess.CompletedProcess:
    """`python -m vggdepth guard` on a summary like a reduced run's (entry-layer gradients as measured), with
    `changes` per variant; with `sweep`, on that depth sweep's record too."""
    summary = {
        "VGG-38": {"val_acc": 0.01, "val_loss": 4.61, "entry_grad_min": 1e-19, "entry_grad_max": 3e-18},
        "VGG-08": {"val_acc": 0.2, "val_loss": 4.2, "entry_grad_min": 4e-4, "entry_grad_max": 3e-3},
        "BN-VGG-38": {"val_acc": 0.2, "val_loss": 4.3, "entry_grad_min": 2e-5, "entry_grad_max": 1e-4},
    }
    for variant, values in changes.items():
        summary[variant.replace("_", "-")].update(values)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    params_file = write_yaml(tmp_path / "params.yaml", json.loads(params.model_dump_json()))
    extra = ["--sweep", str(sweep)] if sweep is not None else []
    return subprocess.run(
        [sys.executable, "-m", "vggdepth", "guard", "--summary", str(path), "--params", str(params_file), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
