"""The GPU lease, rehearsed on the CPU: the archive split into as many parts as the working tree leaves room for
in a call and sent as the calls would send them, reassembled and checked; a missing or damaged part refused; the
whole lease end to end (real archive, tiny configuration) into results.tar.gz, and back here into results/ with
Table 1 rendered from it; a lease narrowed to some runs, with an earlier lease's throughput table."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.helpers import benchmark_script, narrow, project_env
from vggdepth.runs import EVALUATION_TABLES

LEASE_FILES = ("benchmarks", "src", "params.yaml", "reference")


def checkout(dest: Path) -> Path:
    """What a lease call carries of the repository: the code, params.yaml and the reference numbers."""
    dest.mkdir(parents=True)
    for name in LEASE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def sh(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], cwd=root, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=1800
    )


def send_in_calls(root: Path, stash: Path, last: list[str], env: dict) -> subprocess.CompletedProcess:
    """Every call but the last carries one part and stashes it; the last carries the last part and runs. Each
    call's tree holds only the part it carried (and MD5SUMS), as a fresh carry would."""
    parts = sorted((root / ".lease").glob("part-*"))
    held = root / "held"
    held.mkdir()
    for part in parts:
        part.rename(held / part.name)
    env = {**env, "LEASE_STASH": str(stash)}
    for part in parts[:-1]:
        (held / part.name).rename(part)
        done = sh(root, "benchmarks/gpu_lease.sh", "stash", env=env)
        assert done.returncode == 0, done.stderr
        assert f"kept {part.name}" in done.stdout
        part.unlink()
    (held / parts[-1].name).rename(parts[-1])
    return sh(root, "benchmarks/gpu_lease.sh", "run", *last, env=env)


def bring_home(archive: Path, results: Path) -> subprocess.CompletedProcess:
    """`benchmarks/gpu_results.py` on a lease's results.tar.gz, into `results`."""
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_results.py"), str(archive), "--results", str(results)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def travelling_bytes(root: Path) -> int:
    """What a call carries of a copy without git besides the lease's own files (lease_prepare.sh's count)."""
    files = (
        p for p in root.rglob("*") if p.is_file() and not {".lease", ".whl", ".git"} & set(p.relative_to(root).parts)
    )
    return sum(p.stat().st_size for p in files)


def test_parts_are_reassembled_exactly_and_a_missing_or_damaged_part_is_refused(tmp_path):
    root = checkout(tmp_path / "repo")
    archive = tmp_path / "archive.bin"
    archive.write_bytes(os.urandom(3 * 1024 * 1024 + 7))  # not divisible by 4: the parts differ in size
    room = 800_000  # what a call leaves for a part once the tree and MD5SUMS are in: 4 parts of this archive
    limit = travelling_bytes(root) + 65536 + room
    made = sh(
        root,
        "benchmarks/lease_prepare.sh",
        str(archive),
        env={"LEASE_WHEELS": "0", "LEASE_CALL_BYTES": str(limit), "LEASE_MARGIN_BYTES": "0"},
    )
    assert made.returncode == 0, made.stderr
    sums = (root / ".lease" / "MD5SUMS").read_text().splitlines()
    names = ["part-aa", "part-ab", "part-ac", "part-ad"]
    assert [line.split()[1] for line in sums] == [*names, "cifar-100-python.tar.gz"]
    assert sum(p.stat().st_size for p in (root / ".lease").glob("part-*")) == archive.stat().st_size
    assert all(p.stat().st_size <= room for p in (root / ".lease").glob("part-*"))
    # the calls to make, printed: a stash for every part but the last, which runs and carries the wheels
    calls = [line.strip() for line in made.stdout.splitlines() if line.startswith("  run carry=")]
    assert [c.split('"')[1] for c in calls] == [f".lease/{n}" for n in names]
    assert all("gpu_lease.sh stash" in c for c in calls[:-1]) and "gpu_lease.sh run" in calls[-1]
    assert '".whl"' in calls[-1] and not any('".whl"' in c for c in calls[:-1])
    pristine = {p.name: p.read_bytes() for p in (root / ".lease").glob("part-*")}

    # all four parts: reassembled byte for byte, then handed to Python (here `true`, which does nothing)
    stash = tmp_path / "stash"
    done = send_in_calls(root, stash, [], {"PYTHON": "true", "OUT": str(tmp_path / "out")})
    assert done.returncode == 0, done.stderr
    assert (stash / "cifar-100-python.tar.gz").read_bytes() == archive.read_bytes()
    assert "archive reassembled and checked" in done.stdout

    # call 2 never arrived: its part is missing, and the run stops before any work
    shutil.rmtree(stash)
    (stash).mkdir()
    for name, blob in pristine.items():
        (root / ".lease" / name).write_bytes(blob)
    shutil.rmtree(root / "held")
    (root / ".lease" / "part-ab").unlink()
    (root / ".lease" / "part-aa").rename(stash / "part-aa")
    shutil.copy(root / ".lease" / "MD5SUMS", stash)
    refused = sh(root, "benchmarks/gpu_lease.sh", "run", env={"LEASE_STASH": str(stash), "PYTHON": "true"})
    assert refused.returncode == 1
    assert "a part is missing or damaged" in refused.stderr and "part-ab" in refused.stdout + refused.stderr
    assert not (stash / "cifar-100-python.tar.gz").exists()

    # a damaged part (one byte changed in transit)
    (stash / "part-ab").write_bytes(pristine["part-ab"][:-1] + bytes([pristine["part-ab"][-1] ^ 1]))
    refused = sh(root, "benchmarks/gpu_lease.sh", "run", env={"LEASE_STASH": str(stash), "PYTHON": "true"})
    assert refused.returncode == 1 and "a part is missing or damaged" in refused.stderr


def test_the_parts_leave_room_for_the_tree_every_call_carries_and_no_room_is_refused(tmp_path):
    """In a git checkout the tree that travels is what git tracks or does not ignore (results/ holds the CPU
    study's resume points, megabytes each): the parts shrink as it grows, and when nothing is left for them the
    script names the largest files and leaves the parts it made before."""
    root = checkout(tmp_path / "repo")
    (root / ".gitignore").write_text("/.lease/\n/.whl/\n/ignored.bin\n")
    (root / "results").mkdir()
    (root / "results" / "resume.pt").write_bytes(os.urandom(1_500_000))  # tracked
    (root / "untracked file.bin").write_bytes(os.urandom(500_000))  # not ignored: it travels too
    (root / "ignored.bin").write_bytes(os.urandom(4_000_000))  # stays here
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(
        ["git", "add", "src", "benchmarks", "params.yaml", "reference", "results", ".gitignore"], cwd=root, check=True
    )
    subprocess.run([*git, "commit", "-qm", "checkout"], cwd=root, check=True)
    tree = sum(
        p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not {".git", ".lease", ".whl"} & set(p.relative_to(root).parts) and p.name != "ignored.bin"
    )
    archive = tmp_path / "archive.bin"
    archive.write_bytes(os.urandom(2_000_000))
    limit = tree + 65536 + 700_000
    env = {"LEASE_WHEELS": "0", "LEASE_CALL_BYTES": str(limit), "LEASE_MARGIN_BYTES": "0"}
    made = sh(root, "benchmarks/lease_prepare.sh", str(archive), env=env)
    assert made.returncode == 0, made.stderr
    parts = sorted((root / ".lease").glob("part-*"))
    assert len(parts) == 3 and all(p.stat().st_size <= 700_000 for p in parts)  # the ignored 4 MB not counted
    assert f"({tree // 1048576} MiB)" in made.stdout and "3 parts" in made.stdout
    before = {p.name: p.read_bytes() for p in (root / ".lease").iterdir()}

    # the resume point grows past what a call carries: refused, naming it; the parts made before are kept
    (root / "results" / "resume.pt").write_bytes(os.urandom(2_500_000))
    refused = sh(root, "benchmarks/lease_prepare.sh", str(archive), env=env)
    assert refused.returncode == 1
    assert "no room for the archive's parts" in refused.stderr and "results/resume.pt" in refused.stderr
    assert "untracked file.bin" in refused.stderr  # named whole, spaces and all
    assert {p.name: p.read_bytes() for p in (root / ".lease").iterdir()} == before


def test_deadline_stops_a_run_only_when_its_next_epoch_would_overrun():
    from vggdepth.grid import Deadline, TimeUp
    from vggdepth.runs import EpochRecord, RunFiles, RunInfo

    run = RunInfo("VGG-08", 0, {}, "f", "cpu", 1, RunFiles(Path("runs/VGG-08-s0")), 0, "here")
    deadline = Deadline(time.time() + 60)
    deadline.on_epoch_end(run, EpochRecord(3, 1.0, 0.5, 1.0, 0.5, 1e-3, 10.0), [])  # 10 s more fits
    with pytest.raises(TimeUp, match="VGG-08 seed 0: stopped after epoch 3, the time is spent"):
        deadline.on_epoch_end(run, EpochRecord(3, 1.0, 0.5, 1.0, 0.5, 1e-3, 90.0), [])


def test_a_lease_narrowed_to_some_seeds_and_variants_keeps_valid_params_and_refuses_unknown_names():
    lease = benchmark_script("gpu_lease")
    params = lease.lease_params(ROOT / "params.yaml", "cpu", None, None)
    assert params.seeds == [0, 1, 2] and params.report.seed == 0

    kept, only = lease.narrow(params, "2, 1", "RC-VGG-38,VGG-08")
    assert kept.seeds == [1, 2] and kept.report.seed == 1  # params.yaml's order; the report's seed one of them
    assert only == ["VGG-08", "RC-VGG-38"] and list(kept.variants) == list(params.variants)
    assert lease.study_order(kept, only) == [("VGG-08", 1), ("RC-VGG-38", 1), ("VGG-08", 2), ("RC-VGG-38", 2)]
    assert kept.model_dump(exclude={"seeds", "report"}) == params.model_dump(exclude={"seeds", "report"})
    same, everything = lease.narrow(params, None, None)
    assert same == params and everything is None
    assert lease.narrow(params, "0", None)[0].report.seed == 0

    for seeds, variants, said in (
        ("1,7", None, "params.yaml's seeds are 0, 1, 2 (7 not among them)"),
        ("one", None, "not a comma-separated list of seeds"),
        (",", None, "(none given)"),
        (None, "VGG-08,VGG-83", "(VGG-83 not among them)"),
    ):
        with pytest.raises(SystemExit, match=re.escape(said)):
            lease.narrow(params, seeds, variants)


def test_an_earlier_table_is_taken_only_from_a_lease_on_the_same_device_and_checked_as_foreign_input(tmp_path):
    lease = benchmark_script("gpu_lease")
    record = json.loads((ROOT / "results" / "2026-12-04-h200-abf9652" / "lease.json").read_text())
    path = tmp_path / "lease.json"
    path.write_text(json.dumps(record))
    earlier = lease.earlier_table(path, "NVIDIA H200")
    rows = earlier["throughput"]
    assert rows == record["throughput"] and max(r["aggregate"] for r in rows) > 50_000
    assert earlier["throughput_errors"] == [] and earlier["from"] == {
        "path": str(path),
        "commit": record["commit"],
        "torch": "2.11.0+cu130",
    }
    assert lease.choose(rows, "BN-VGG-38") == (9, 1)  # the plan the first lease trained with
    assert lease.earlier_table(path, "NVIDIA H100 80GB HBM3") is None  # another device: measured again

    for damage, said in (
        (lambda r: r.pop("throughput"), "no throughput table in it"),
        (lambda r: r["throughput"][0].update(aggregate="fast"), "throughput.0.aggregate: .*found 'fast'"),
        (lambda r: r["throughput"][3].update(fused=True), "throughput.3.fused: .*found True"),
        (lambda r: r["throughput"][1].pop("per_run"), "throughput.1.per_run: field required"),
        (lambda r: r["throughput"][2].update(aggregate=-1.0), "throughput.2.aggregate: .*greater than or equal to 0"),
        (lambda r: r.update(device=""), "device: "),
    ):
        broken = json.loads(json.dumps(record))
        damage(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(SystemExit, match=f"error: --table-from: {re.escape(str(path))}: {said}"):
            lease.earlier_table(path, "NVIDIA H200")
    path.write_text("{not json")
    with pytest.raises(SystemExit, match=r"lease\.json: not JSON .*an earlier lease brought home"):
        lease.earlier_table(path, "NVIDIA H200")
    path.unlink()
    with pytest.raises(SystemExit, match=r"lease\.json is missing"):
        lease.earlier_table(path, "NVIDIA H200")


VARIANTS = ("VGG-08", "VGG-38", "BN-VGG-38", "HIGHLR-BN-38")  # two of one shape, to fuse


@pytest.mark.slow
def test_the_lease_end_to_end_on_the_cpu_and_its_results_rendered_here(archive_path, tmp_path):
    """Four variants x two seeds (the study's six x three, narrowed for time), 2 epochs of 200 images; VGG-08 in the
    throughput table (the GPU's table has VGG-38 and BN-VGG-38 too); the study fused as a GPU would fuse it."""
    root = checkout(tmp_path / "repo")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    narrow(raw, {v: raw["variants"][v] for v in VARIANTS})
    raw["seeds"] = [0, 1]
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    made = sh(root, "benchmarks/lease_prepare.sh", str(archive_path), env={"LEASE_WHEELS": "0"})
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    out.mkdir()
    tiny = ["900", "--device", "cpu", "--per-class", "2", "--epochs", "2", "--bench-steps", "1"]
    table = ["--networks", "VGG-08", "--fuse-network", "VGG-08", "--fuse", "2", "--processes", "2"]
    study = ["--profile-steps", "1", "--study-fuse", "3", "--study-processes", "2"]
    done = send_in_calls(
        root,
        tmp_path / "stash",
        [*tiny, *table, *study, "--work", str(tmp_path / "work")],
        {"PYTHON": sys.executable, "OUT": str(out)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    lease = json.loads((out / "lease.json").read_text())
    assert lease["device"].startswith("CPU") and lease["epochs"] == 2
    assert (
        [(r["network"], r["path"], r["fused"], r["processes"]) for r in lease["throughput"]]
        == [
            ("VGG-08", "eager", 1, 1),
            ("VGG-08", "fused, eager", 1, 1),  # the CPU never captures a CUDA graph
            ("VGG-08", "fused, eager", 2, 1),
            ("VGG-08", "fused, eager", max(lease["throughput"][1:3], key=lambda r: r["aggregate"])["fused"], 2),
        ]
    )
    assert all(r["aggregate"] > 0 for r in lease["throughput"])
    assert lease["plan"] == {"fuse": 3, "processes": 2, "start_margin_s": 45.0}
    assert lease["throughput_errors"] == [] and "graph_check" not in lease  # no GPU: nothing graphed to check
    assert "convolution" in (out / "profile.txt").read_text()
    # the pipeline's grid, fused as far as the shapes allow (3 at most: --study-fuse), every group at once
    assert (
        "groups: VGG-08-s0 + VGG-08-s1; VGG-38-s0 + VGG-38-s1; BN-VGG-38-s0 + BN-VGG-38-s1 + HIGHLR-BN-38-s0; "
        "HIGHLR-BN-38-s1" in done.stdout
    )
    assert "on this machine (processes, no Ray)" in done.stdout + done.stderr
    assert [r["fused_with"] for r in lease["runs"]] == [2, 2, 3, 3, 2, 2, 3, 1]
    # seed 0 of every variant first
    order = [(r["variant"], r["seed"]) for r in lease["runs"]]
    assert order == [(v, s) for s in (0, 1) for v in VARIANTS]
    assert all(r["state"] == "finished" and r["epochs"] == 2 for r in lease["runs"]), lease["runs"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert names == {"lease.json", "profile.txt"} | {
        f"runs/{r['run']}/{table}"
        for r in lease["runs"]
        for table in ("epochs.csv", "gradients.csv", "train.json", "test.json", *EVALUATION_TABLES)
    }
    assert (out / "results.tar.gz").stat().st_size < 5_000_000

    results = tmp_path / "results"
    back = bring_home(out / "results.tar.gz", results)
    assert back.returncode == 0, back.stderr
    (folder,) = results.iterdir()
    assert folder.name.startswith(lease["finished_at"][:10] + "-cpu")
    table = (folder / "report" / "table1.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} |" in table
    assert "Table 1, over 2 seed(s)" in table
    assert list((folder / "report" / "figures").glob("*.png"))
    assert "| test top-5 | test ECE |" in table  # the evaluation came home with the runs
    assert not list(folder.rglob("*.pt"))

    # Into MLflow with `sync`, as a user back from a lease does: one finished run per lease run, under one parent
    # that names the lease's device; every epoch, the test metrics; a second sync sends nothing.
    from mlflow import MlflowClient

    runs = sorted(str(p) for p in (folder / "runs").iterdir())
    sync = [sys.executable, "-m", "vggdepth", "sync", *runs, "--params", str(root / "params.yaml")]
    first = subprocess.run(sync, cwd=tmp_path, env=project_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("sent run, epochs 0-1, tables, test metrics") == len(lease["runs"]), first.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vggdepth")
    found = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("vggdepth.kind") == "pipeline"]
    assert parent.info.run_name == f"GPU lease {folder.name}" and parent.data.tags["device"] == lease["device"]
    trained = [r for r in found if r.data.tags.get("vggdepth.kind") == "training"]
    assert sorted(r.info.run_name for r in trained) == sorted(r["run"] for r in lease["runs"])
    for run in trained:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "curves/val_acc")] == [0, 1]
        test = json.loads((folder / "runs" / run.info.run_name / "test.json").read_text())
        assert run.data.metrics["test_acc_best"] == test["best"]["test_acc"]
    again = subprocess.run(sync, cwd=tmp_path, env=project_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("MLflow already has everything") == len(lease["runs"]), (
        again.stdout
    )


@pytest.mark.slow
def test_a_narrowed_lease_trains_only_its_runs_with_an_earlier_table_and_comes_home_without_a_report(
    archive_path, tmp_path
):
    """The next lease's shape: seed 1 of two variants, the table taken from an earlier lease on this device (not
    measured again), groups as given; back here its runs come home, and no report (no seed has every row)."""
    root = checkout(tmp_path / "repo")
    lease = benchmark_script("gpu_lease")
    earlier = tmp_path / "earlier.json"
    row = {"network": "BN-VGG-38", "path": "fused, eager", "fused": 2, "processes": 1, "runs_at_once": 2}
    first = json.loads((ROOT / "results" / "2026-12-04-h200-abf9652" / "lease.json").read_text())
    first.update(  # a whole lease.json, as an earlier lease on this device would have brought home
        device=lease.device_name(lease.torch.device("cpu")),
        throughput=[{**row, "per_run": 40.0, "aggregate": 80.0}],
    )
    earlier.write_text(json.dumps(first))
    made = sh(root, "benchmarks/lease_prepare.sh", str(archive_path), env={"LEASE_WHEELS": "0"})
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    tiny = ["900", "--device", "cpu", "--per-class", "2", "--epochs", "2", "--profile-steps", "0"]
    share = ["--seeds", "1", "--variants", "BN-VGG-38,VGG-08", "--table-from", str(earlier), "--study-processes", "2"]
    done = send_in_calls(
        root,
        tmp_path / "stash",
        [*tiny, *share, "--work", str(tmp_path / "work")],
        {"PYTHON": sys.executable, "OUT": str(out)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not measured again" in done.stdout and "throughput VGG-08" not in done.stdout
    record = json.loads((out / "lease.json").read_text())
    assert record["throughput"] == json.loads(earlier.read_text())["throughput"]
    assert record["throughput_from"] == {"path": str(earlier), "commit": first["commit"], "torch": first["torch"]}
    assert record["variants"] == ["VGG-08", "BN-VGG-38"]
    assert record["plan"] == {"fuse": 2, "processes": 2, "start_margin_s": 45.0}  # the earlier table's best row
    assert record["params"]["seeds"] == [1] and record["params"]["report"]["seed"] == 1
    assert [(r["run"], r["state"], r["epochs"]) for r in record["runs"]] == [
        ("VGG-08-s1", "finished", 2),
        ("BN-VGG-38-s1", "finished", 2),
    ]
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == ["BN-VGG-38-s1", "VGG-08-s1"]

    results = tmp_path / "results"
    back = bring_home(out / "results.tar.gz", results)
    assert back.returncode == 0, back.stderr
    (folder,) = results.iterdir()
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["BN-VGG-38-s1", "VGG-08-s1"]
    assert "no seed has every variant finished: no report rendered" in back.stdout
    assert all((folder / "runs" / name / "test.json").exists() for name in ("BN-VGG-38-s1", "VGG-08-s1"))


def test_runs_a_lease_stopped_part_way_are_imported_as_killed_runs_with_every_epoch_they_trained(tmp_path):
    """The first lease's own runs (results/2026-12-04-h200-abf9652): none finished, so none has a train.json. Each
    becomes a KILLED MLflow run under the lease's parent, with every epoch it trained and the lease's words for why
    it ended; a second sync sends nothing, and a folder the record does not name is refused."""
    from mlflow import MlflowClient

    lease_dir = ROOT / "results" / "2026-12-04-h200-abf9652"
    home = tmp_path / "results" / "lease"
    for name in ("VGG-38-s0", "RC-VGG-38-s0"):
        shutil.copytree(lease_dir / "runs" / name, home / "runs" / name)
    shutil.copy(lease_dir / "lease.json", home / "lease.json")
    record = json.loads((home / "lease.json").read_text())
    said = {r["run"]: r["state"] for r in record["runs"]}

    def sync(*names: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "vggdepth", "sync", *(str(home / "runs" / n) for n in names)]
        command += ["--params", str(ROOT / "params.yaml")]
        return subprocess.run(command, cwd=tmp_path, env=project_env(tmp_path), capture_output=True, text=True)

    first = sync("VGG-38-s0", "RC-VGG-38-s0")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"status KILLED ({said['VGG-38-s0']})" in first.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("vggdepth").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("vggdepth.kind") == "pipeline"]
    assert parent.data.tags["device"] == "NVIDIA H200"
    for name in ("VGG-38-s0", "RC-VGG-38-s0"):
        (run,) = [r for r in found if r.info.run_name == name]
        assert run.info.status == "KILLED" and run.data.tags["vggdepth.state"] == said[name]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        with open(home / "runs" / name / "epochs.csv") as table:
            epochs = list(csv.DictReader(table))
        history = client.get_metric_history(run.info.run_id, "curves/val_acc")
        assert [m.step for m in history] == list(range(len(epochs))) and len(epochs) >= 27
        assert [m.value for m in history] == pytest.approx([float(e["val_acc"]) for e in epochs])
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"epochs.csv", "gradients.csv"} <= logged and "train.json" not in logged
    # the claim the lease's numbers make in the README: VGG-38 at chance, RC-VGG-38 learning
    finals = {r.info.run_name: r.data.metrics for r in found if r.info.run_name in said}
    assert (
        finals["VGG-38-s0"]["curves/val_acc"] == pytest.approx(0.01) and finals["RC-VGG-38-s0"]["curves/val_acc"] > 0.4
    )
    entry = "log10_grad_last_mean_abs/entry.conv"
    assert finals["VGG-38-s0"][entry] < -15 and finals["RC-VGG-38-s0"][entry] > -3

    again = sync("VGG-38-s0")
    assert again.returncode == 0 and "MLflow already has everything" in again.stdout

    shutil.copytree(lease_dir / "runs" / "VGG-08-s0", home / "runs" / "VGG-08-s9")  # a run the lease never had
    refused = sync("VGG-08-s9")
    assert refused.returncode != 0 and "records no state of a run of that name" in refused.stderr
    shutil.copytree(lease_dir / "runs" / "VGG-08-s0", home / "runs" / "scratch")
    refused = sync("scratch")
    assert refused.returncode != 0 and "not a run folder's name" in refused.stderr
    # a record that says finished where the folder has no train.json: half brought home, not a stopped run
    for run in record["runs"]:
        run["state"] = "finished" if run["run"] == "RC-VGG-38-s0" else run["state"]
    (home / "lease.json").write_text(json.dumps(record))
    refused = sync("RC-VGG-38-s0")
    assert refused.returncode != 0 and "as finished, but its train.json is missing" in refused.stderr
