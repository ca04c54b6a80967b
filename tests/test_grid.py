"""The grid on real Ray: runs trained concurrently equal runs trained alone, bit for bit; every run is tracked
once; a failed run does not stop the others; a killed driver resumes; a two-node cluster on 127.0.0.1 runs it."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT, prepare_subset
from tests.helpers import narrow, project_env, same_run
from vggdepth.checkpoints import load_checkpoint, save_checkpoint
from vggdepth.runs import RunFiles

pytestmark = pytest.mark.slow

VARIANTS = ("VGG-08", "VGG-38", "BN-VGG-38")
NOT_COMPARED = ("node",)  # where a run trained: a Ray node in the grid, this host when alone


@pytest.fixture(scope="module")
def project(archive_path, archive_md5, params, tmp_path_factory) -> Path:
    """Three variants, one seed, 200/100/100 real images, 2 epochs, one thread per run; tracked in root/mlruns."""
    root = tmp_path_factory.mktemp("grid") / "p"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(url=str(archive_path), md5=archive_md5)
    raw["prepare"]["subset"] = {"train": 2, "val": 1, "test": 1}
    raw["train"]["epochs"] = 2
    raw["runtime"].update(device="cpu")
    raw["grid"].update(threads_per_run=1)
    raw["seeds"] = [0]
    raw["tracking"].update(enabled=True, system_metrics=False, log_model=False)
    root.mkdir(parents=True)
    write_params(root, narrow(raw, {v: raw["variants"][v] for v in VARIANTS}))
    prepare_subset(archive_path, root / "data" / "prepared", params, train=2, val=1, test=1)
    return root


def write_params(root: Path, raw: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def read_params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def copy(project: Path, dest: Path) -> Path:
    shutil.copytree(project, dest, ignore=shutil.ignore_patterns("runs", "mlruns"))
    return dest


def grid_command(root: Path) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline" / "grid.py"), "--params", str(root / "params.yaml")]


def run_grid(root: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(grid_command(root), cwd=root, env=project_env(root, **extra), capture_output=True, text=True)


def tracked(uri: str, experiment: str = "vggdepth") -> dict[str, dict]:
    """Every training run in the store by name: status, parent, epochs of train_loss and of one gradient metric."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment)
    found: dict[str, dict] = {}
    for run in client.search_runs([experiment.experiment_id]):
        if run.data.tags.get("vggdepth.kind") != "training":
            continue
        assert run.info.run_name not in found, f"{run.info.run_name} is in MLflow twice"
        found[run.info.run_name] = {
            "status": run.info.status,
            "parent": run.data.tags.get("mlflow.parentRunId"),
            "node": run.data.tags.get("node", ""),
            "steps": [m.step for m in client.get_metric_history(run.info.run_id, "curves/train_loss")],
            "grad_steps": [m.step for m in client.get_metric_history(run.info.run_id, "grad_mean_abs/entry.conv")],
            "interval": (run.info.start_time, run.info.end_time),
        }
    return found


def embedded(root: Path) -> str:
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def train_stage(root: Path, variant: str) -> None:
    """The train stage of (variant, seed 0), as DVC runs it."""
    command = [sys.executable, str(ROOT / "pipeline" / "train.py"), "--variant", variant, "--seed", "0"]
    command += ["--out", f"runs/{variant}-s0", "--params", str(root / "params.yaml")]
    result = subprocess.run(command, cwd=root, env=project_env(root), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def grid_run(project, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = copy(project, tmp_path_factory.mktemp("grid-run") / "p")
    result = run_grid(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


@pytest.fixture(scope="module")
def alone(project, tmp_path_factory) -> Path:
    """Each run trained by itself, one after another, by the train stage with one thread, untracked."""
    root = copy(project, tmp_path_factory.mktemp("alone") / "p")
    raw = read_params(root)
    raw["runtime"]["threads"] = 1
    raw["tracking"]["enabled"] = False
    write_params(root, raw)
    for variant in VARIANTS:
        train_stage(root, variant)
    return root


def test_runs_trained_concurrently_equal_runs_trained_alone(grid_run, alone):
    root, result = grid_run
    assert "grid: 3 of 3 runs to train on this machine" in result.stderr
    assert "estimated wall time: about" in result.stderr
    for variant in VARIANTS:
        assert f"grid: {variant}-s0 done: val acc" in result.stderr
        same_run(RunFiles.of(root / "runs", variant, 0), RunFiles.of(alone / "runs", variant, 0), NOT_COMPARED)
    record = json.loads((root / "runs" / "grid.json").read_text())
    assert record["packing"] == "2 runs at once on the CPU, 1 torch thread(s) each"
    assert {name: r["trained_epochs"] for name, r in record["runs"].items()} == {f"{v}-s0": 2 for v in VARIANTS}
    for variant in VARIANTS:
        summary = json.loads(RunFiles.of(root / "runs", variant, 0).train_json.read_text())
        assert summary["node"] == record["runs"][f"{variant}-s0"]["node"]
        assert "(ray node " in summary["node"]


def test_every_run_is_tracked_once_under_one_parent_with_every_epoch(grid_run):
    root, _ = grid_run
    runs = tracked(embedded(root))
    assert set(runs) == {f"{v}-s0" for v in VARIANTS}
    assert len({r["parent"] for r in runs.values()}) == 1
    for name, run in runs.items():
        assert run["status"] == "FINISHED", name
        assert run["steps"] == [0, 1] and run["grad_steps"] == [0, 1], name
        assert "(ray node " in run["node"], name
    # Trained at the same time: on two cores, two of the three runs overlapped.
    intervals = sorted(r["interval"] for r in runs.values())
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(intervals))


def test_train_stages_after_the_grid_restore_and_a_second_grid_does_nothing(grid_run, tmp_path):
    root, _ = grid_run
    before = {v: (RunFiles.of(root / "runs", v, 0).last.read_bytes()) for v in VARIANTS}
    snapshot = copy(root, tmp_path / "snapshot")
    shutil.copytree(root / "runs", snapshot / "runs")
    for variant in VARIANTS:  # what DVC runs next: the train stage, on a run the grid finished
        files = RunFiles.of(root / "runs", variant, 0)
        for output in files.outputs:
            output.unlink()  # DVC removes a stage's outputs before running it
        train_stage(root, variant)
        same_run(files, RunFiles.of(snapshot / "runs", variant, 0))
        assert files.last.read_bytes() == before[variant]
    runs = tracked(embedded(root))
    assert len(runs) == 3 and all(r["status"] == "FINISHED" and r["steps"] == [0, 1] for r in runs.values())

    again = run_grid(root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every run is trained to train.epochs; nothing to do" in again.stderr


def _worker_of(run: str, kind: bytes = b"ray::") -> int:
    """The pid of the worker training `run` (its temporary folder is named after its group's first run and its
    pid): a Ray worker, or with `kind=b"multiprocessing"` a process of the grid without Ray."""
    import tempfile

    for folder in sorted(Path(tempfile.gettempdir()).glob(f"vggdepth-{run}-*-*"), key=os.path.getmtime)[::-1]:
        pid = int(folder.name.removeprefix(f"vggdepth-{run}-").split("-")[0])
        try:
            if kind in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no worker is training {run}")


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"the grid ended before {path} appeared: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _kill_a_worker(root: Path, once: Path, run: str, kind: bytes = b"ray::") -> tuple[subprocess.Popen, str]:
    """Start the grid stage in `root`; once `once` exists, SIGKILL the worker training `run` (`_worker_of`); the
    stage's process, ended, and its stderr."""
    process = subprocess.Popen(
        grid_command(root),
        cwd=root,
        env=project_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(once, process)
        os.kill(_worker_of(run, kind), signal.SIGKILL)
        return process, process.communicate(timeout=600)[1]
    finally:
        process.kill()


def test_failed_runs_do_not_stop_the_others_and_are_named(project, grid_run, tmp_path):
    """An exception inside training (a checkpoint of CUDA random states, on a CPU) and a worker killed with
    SIGKILL (VGG-38): VGG-08 still finishes; the stage exits 1 naming the two. (A NaN loss can no longer be asked
    for through params.yaml, whose learning rates are bounded: the NaN guard's own tests poison the loss in
    process, tests/test_engine.py and tests/test_fused.py.)"""
    root = copy(project, tmp_path / "p")
    state = load_checkpoint(RunFiles.of(grid_run[0] / "runs", "BN-VGG-38", 0).previous)  # after epoch 1 of 2
    state["trained_on"] = "cuda:0"
    save_checkpoint(RunFiles.of(root / "runs", "BN-VGG-38", 0).last, state)

    process, stderr = _kill_a_worker(root, RunFiles.of(root / "runs", "VGG-38", 0).epochs_csv, "VGG-38-s0")
    assert process.returncode == 1, stderr[-3000:]
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error == [
        "error: 2 of 3 runs failed: BN-VGG-38-s0, VGG-38-s0; 1 other run(s) finished and are kept. "
        "Re-running trains only what is unfinished, resuming from each run's last epoch"
    ], stderr[-3000:]
    assert "grid: BN-VGG-38-s0 FAILED: " in stderr and "random states cannot continue on cpu" in stderr
    assert "grid: VGG-38-s0 FAILED: its worker process died" in stderr
    assert "Traceback" not in stderr
    assert not (root / "runs" / "grid.json").exists()
    assert not list(root.rglob("*.part"))
    same_run(RunFiles.of(root / "runs", "VGG-08", 0), RunFiles.of(grid_run[0] / "runs", "VGG-08", 0), NOT_COMPARED)
    runs = tracked(embedded(root))
    # BN-VGG-38 failed while loading its checkpoint, before its MLflow run would start (as in the train stage).
    assert {n: r["status"] for n, r in runs.items()} == {
        "VGG-08-s0": "FINISHED",
        "VGG-38-s0": "FAILED",
    }
    assert runs["VGG-38-s0"]["steps"] == [0]

    # Re-run: the killed run resumes after its first epoch and ends as if undisturbed; the others fail again.
    again = run_grid(root)
    assert again.returncode == 1
    assert "VGG-38-s0                1 epochs, resumes after epoch 1" in again.stderr
    assert "error: 1 of 2 runs failed: BN-VGG-38-s0" in again.stderr
    same_run(RunFiles.of(root / "runs", "VGG-38", 0), RunFiles.of(grid_run[0] / "runs", "VGG-38", 0), NOT_COMPARED)
    runs = tracked(embedded(root))
    assert runs["VGG-38-s0"]["steps"] == [0, 1] and runs["VGG-38-s0"]["status"] == "FINISHED"


def test_killed_driver_resumes_every_run_and_ends_as_undisturbed(project, grid_run, tmp_path):
    root = copy(project, tmp_path / "p")
    process = subprocess.Popen(
        grid_command(root),
        cwd=root,
        env=project_env(root, VGGDEPTH_TEST_DRIVER="driver"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for variant in ("VGG-08", "VGG-38"):  # the first two runs have an epoch in the driver's folder
            _wait_for(RunFiles.of(root / "runs", variant, 0).epochs_csv, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    resumed_from = {v: load_checkpoint(RunFiles.of(root / "runs", v, 0).last)["epoch"] for v in ("VGG-08", "VGG-38")}

    again = run_grid(root)
    assert again.returncode == 0, again.stderr[-3000:]
    for variant, epoch in resumed_from.items():
        if epoch < 2:
            assert f"{variant}-s0                {2 - epoch} epochs, resumes after epoch {epoch}" in again.stderr
    for variant in VARIANTS:
        same_run(RunFiles.of(root / "runs", variant, 0), RunFiles.of(grid_run[0] / "runs", variant, 0), NOT_COMPARED)
    runs = tracked(embedded(root))
    assert set(runs) == {f"{v}-s0" for v in VARIANTS}
    assert all(r["status"] == "FINISHED" and r["steps"] == [0, 1] for r in runs.values())
    assert not list(root.rglob("*.part"))

    # The killed driver's Ray processes go with it (Ray's agents check their raylet and leave within minutes).
    deadline = time.monotonic() + 180
    while (left := _ray_processes_of_driver()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, f"Ray processes of the killed driver are still running: {left}"


def _ray_processes_of_driver() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"VGGDEPTH_TEST_DRIVER=driver" in environ:
            found.append(int(proc.name))
    return found


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A real Ray cluster of two 1-CPU nodes on 127.0.0.1 (Ray's own multi-node test harness)."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1, not the primary address
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def test_grid_runs_on_a_two_node_cluster_and_tracks_through_a_server(
    project, grid_run, two_node_cluster, mlflow_server, tmp_path
):
    root = copy(project, tmp_path / "p")
    raw = read_params(root)
    raw["tracking"]["experiment"] = f"grid-cluster-{tmp_path.name}"  # the server is shared with other tests
    write_params(root, raw)
    result = run_grid(root, RAY_ADDRESS=two_node_cluster.address, MLFLOW_TRACKING_URI=mlflow_server.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on the Ray cluster at {two_node_cluster.address}: 2 runs at once" in result.stderr
    nodes = {r["node"] for r in json.loads((root / "runs" / "grid.json").read_text())["runs"].values()}
    assert len(nodes) == 2, f"the runs did not land on both nodes: {nodes}"
    for variant in VARIANTS:
        same_run(RunFiles.of(root / "runs", variant, 0), RunFiles.of(grid_run[0] / "runs", variant, 0), NOT_COMPARED)
    runs = tracked(mlflow_server.uri, raw["tracking"]["experiment"])
    assert set(runs) == {f"{v}-s0" for v in VARIANTS}
    assert all(r["status"] == "FINISHED" and r["steps"] == [0, 1] for r in runs.values())
    assert {r["node"] for r in runs.values()} == nodes
    assert not (root / "mlruns").exists()  # everything went to the server


# ---- without Ray: plain processes, groups of fused runs ------------------------------------------------------


def _without_ray(tmp_path: Path) -> str:
    """A PYTHONPATH under which `import ray` fails, as on a rented GPU machine that has PyTorch but not Ray."""
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("no Ray on this machine")\n')
    return str(fake.parent)


def test_without_ray_the_grid_trains_in_processes_and_equals_runs_alone(project, alone, tmp_path):
    root = copy(project, tmp_path / "p")
    raw = read_params(root)
    raw["grid"]["backend"] = "processes"
    write_params(root, raw)
    result = run_grid(root, PYTHONPATH=_without_ray(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "grid: 3 of 3 runs to train on this machine (processes, no Ray): 2 runs at once" in result.stderr
    for variant in VARIANTS:
        assert f"grid: {variant}-s0 done: val acc" in result.stderr
        same_run(RunFiles.of(root / "runs", variant, 0), RunFiles.of(alone / "runs", variant, 0), NOT_COMPARED)
    runs = tracked(embedded(root))
    assert set(runs) == {f"{v}-s0" for v in VARIANTS} and len({r["parent"] for r in runs.values()}) == 1
    assert all(r["status"] == "FINISHED" and r["steps"] == [0, 1] == r["grad_steps"] for r in runs.values())
    assert {r["node"] for r in runs.values()} == {socket.gethostname()}
    assert not list(root.rglob("*.part"))


def test_runs_of_one_shape_train_as_one_fused_group_and_equal_the_fused_trainer(project, tiny_data, tmp_path):
    """Two seeds of VGG-08 and one of VGG-38 with `runs_per_group: 2`: the VGG-08 runs become one group, each with
    its own folder, MLflow run and results, those of `train_fused`; a worker killed mid-group costs both runs that
    epoch only: re-run, they resume and end as undisturbed."""
    from vggdepth.config import load_params
    from vggdepth.fused import train_fused

    root = copy(project, tmp_path / "p")
    raw = read_params(root)
    raw["grid"].update(backend="processes", runs_per_group=2)
    raw["seeds"] = [0, 1]
    write_params(root, narrow(raw, {v: raw["variants"][v] for v in ("VGG-08", "VGG-38")}))
    epoch_in = RunFiles.of(root / "runs", "VGG-08", 1).epochs_csv  # epoch 1 of the group is in
    process, stderr = _kill_a_worker(root, epoch_in, "VGG-08-s0", b"multiprocessing")
    assert process.returncode == 1, stderr[-3000:]
    assert "fused: VGG-08-s0 + VGG-08-s1; VGG-38-s0 + VGG-38-s1" in stderr
    assert "grid: VGG-08-s0 FAILED: its worker process died" in stderr
    assert "grid: VGG-08-s1 FAILED: its worker process died" in stderr
    assert "Traceback" not in stderr

    again = run_grid(root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "VGG-08-s0                1 epochs, resumes after epoch 1" in again.stderr

    params = load_params(root / "params.yaml")
    params = params.model_copy(update={"runtime": params.runtime.model_copy(update={"threads": 1})})
    threads = torch.get_num_threads()
    try:
        train_fused(params, [("VGG-08", 0), ("VGG-08", 1)], tiny_data, tmp_path / "fused")
    finally:
        torch.set_num_threads(threads)
    for seed in (0, 1):
        same_run(
            RunFiles.of(root / "runs", "VGG-08", seed), RunFiles.of(tmp_path / "fused", "VGG-08", seed), NOT_COMPARED
        )
    runs = tracked(embedded(root))
    assert {n: (r["status"], r["steps"]) for n, r in runs.items()} == {
        f"{v}-s{s}": ("FINISHED", [0, 1]) for v in ("VGG-08", "VGG-38") for s in (0, 1)
    }


def test_a_failure_wrapped_twice_by_ray_is_named_by_its_own_error():
    """A worker whose call to the recorder failed (the driver's disk full) fails itself: the driver gets Ray's
    wrapper of Ray's wrapper; the grid names the error under them, as for a failure in the worker itself."""
    import ray

    from vggdepth.grid.on_ray import ray_reason

    full = OSError(28, "No space left on device")
    inner = ray.exceptions.RayTaskError("Recorder.run_epoch", "Traceback (recorder)", full).as_instanceof_cause()
    outer = ray.exceptions.RayTaskError("GridWorker.train", "Traceback (worker)", inner).as_instanceof_cause()
    assert ray_reason(ray, outer) == ray_reason(ray, inner) == "OSError: [Errno 28] No space left on device"
    crashed = ray.exceptions.WorkerCrashedError()
    assert "worker process died" in ray_reason(ray, crashed)
