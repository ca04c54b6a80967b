"""The real-size study on the CPU, rehearsed small in a real DVC repository: the background job trains through the
grid and evaluates each run as it finishes; stopped mid-run and started again on a "fresh machine" (its checkout
gone, only the committed results/ left), it resumes from the resume points and trains nothing twice; what comes home
renders Table 1 and imports into MLflow as a CPU study."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.helpers import benchmark_script, dvc_env, tiny_clone
from vggdepth.engine import cpu_computes_bf16
from vggdepth.runs import RunFiles

EPOCHS = 30  # VGG-38 still mid-run (a minute) when VGG-08, four times faster, has finished and been tested


def study(repo: Path, *args: str, fails: bool = False) -> str:
    """`cpu_study.py` with `args`: its output; with `fails`, it must fail, and its error is returned."""
    done = subprocess.run(
        [sys.executable, "benchmarks/cpu_study.py", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=dvc_env(),
        timeout=300,
    )
    assert (done.returncode != 0) == fails, done.stdout + done.stderr
    return done.stderr if fails else done.stdout


def git_head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def rows(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:]


def test_a_run_resumes_from_the_newest_checkpoint_that_loads(tmp_path):
    """As the trainer does: last.pt, else previous.pt (a stop between a checkpoint's two writes, or a damaged
    last.pt); what `status` counts and `collect` brings home."""
    cpu_study = benchmark_script("cpu_study")
    files = RunFiles(tmp_path / "VGG-38-s0")
    files.checkpoints.mkdir(parents=True)
    assert cpu_study._resume_point(files) is None  # never trained
    torch.save({"epoch": 4}, files.previous)
    assert cpu_study._resume_point(files) == (files.previous, 4)  # stopped between the two writes
    files.last.write_bytes(b"PK\x03\x04 cut short")
    assert cpu_study._resume_point(files) == (files.previous, 4)  # a damaged last.pt: the one before
    torch.save({"epoch": 5}, files.last)
    assert cpu_study._resume_point(files) == (files.last, 5)


def test_a_resume_point_home_is_kept_over_another_run_or_fewer_epochs(tmp_path, capsys):
    """The checkout's run began again under another fingerprint (as the residual study's did, on a machine whose
    statistics differed in their last bit): the point home stays and what is wrong is returned, naming both. A run
    of its own fingerprint that fell back past a damaged last.pt: the point home keeps its epochs, said once. A
    point of more epochs, or one home that does not load, is replaced."""
    cpu_study = benchmark_script("cpu_study")
    files, home = RunFiles(tmp_path / "RC-VGG-38-s0"), tmp_path / "resume" / "RC-VGG-38-s0.pt"
    files.checkpoints.mkdir(parents=True)
    home.parent.mkdir()
    torch.save({"epoch": 2, "fingerprint": "42af2178cfc24e5a"}, home)
    torch.save({"epoch": 1, "fingerprint": "09f7669ef0d8eddb"}, files.last)  # began again
    wrong = cpu_study._copy_resume_point(files, home)
    assert f"RC-VGG-38-s0 in {files.root} is another run than its resume point {home}" in wrong
    assert "fingerprint 09f7669ef0d8eddb (1 epochs) against 42af2178cfc24e5a (2 epochs)" in wrong
    assert f"remove {files.root} to resume from the point home" in wrong
    torch.save({"epoch": 3, "fingerprint": "09f7669ef0d8eddb"}, files.last)  # more epochs, still another run
    assert "is another run" in cpu_study._copy_resume_point(files, home)
    assert torch.load(home) == {"epoch": 2, "fingerprint": "42af2178cfc24e5a"}

    torch.save({"epoch": 1, "fingerprint": "42af2178cfc24e5a"}, files.last)  # its own run, fallen back
    for _ in range(2):
        assert cpu_study._copy_resume_point(files, home) is None
    assert torch.load(home)["epoch"] == 2
    said = capsys.readouterr().out
    assert said.count(f"{home}: kept (2 epochs): the run in {files.root} has fallen back to 1") == 1
    torch.save({"epoch": 3, "fingerprint": "42af2178cfc24e5a"}, files.last)  # past it: progress
    assert cpu_study._copy_resume_point(files, home) is None
    assert torch.load(home)["epoch"] == 3
    home.write_bytes(b"PK\x03\x04 cut short")  # damaged home: nothing to keep
    torch.save({"epoch": 1, "fingerprint": "09f7669ef0d8eddb"}, files.last)
    assert cpu_study._copy_resume_point(files, home) is None
    assert torch.load(home)["epoch"] == 1


def test_start_refuses_a_checkout_run_of_another_fingerprint_than_its_resume_point(tmp_path, monkeypatch):
    """`start` puts each resume point in place: over a checkout's run of another fingerprint it would mix two
    runs' checkpoints, so the study is not started, naming both; a run of its own fingerprint with fewer epochs
    gets the point, and one with more keeps its own."""
    cpu_study, study, checkout = study_on_disk(tmp_path, monkeypatch, {"seeds": [0]})
    point = study.results / "resume" / "RC-VGG-38-s0.pt"
    point.parent.mkdir()
    torch.save({"epoch": 2, "fingerprint": "42af2178cfc24e5a"}, point)
    last = RunFiles(checkout / "runs" / "RC-VGG-38-s0").last
    last.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "fingerprint": "09f7669ef0d8eddb"}, last)
    with pytest.raises(cpu_study.CannotTrainHere, match=r"not started: RC-VGG-38-s0 in .* is another run than"):
        study.prepare()
    assert torch.load(last)["fingerprint"] == "09f7669ef0d8eddb"  # nothing was mixed
    torch.save({"epoch": 1, "fingerprint": "42af2178cfc24e5a"}, last)
    study.prepare()
    assert torch.load(last)["epoch"] == 2
    torch.save({"epoch": 5, "fingerprint": "42af2178cfc24e5a"}, last)
    study.prepare()
    assert torch.load(last)["epoch"] == 5


def test_the_job_stops_when_a_run_began_again(tmp_path, monkeypatch, capsys):
    """While the grid trains, `bring_home` finds a run of another fingerprint than its point home: training on would
    only waste the CPU, so the job ends its child and exits, saying why (here not a group leader: pytest's own
    group is left alone)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    _, study, checkout = study_on_disk(tmp_path, monkeypatch, {**params, "seeds": [0]})
    wrong = "RC-VGG-38-s0 in runs/RC-VGG-38-s0 is another run than its resume point"
    monkeypatch.setattr(study, "bring_home", lambda: study.began_again.append(wrong))
    started = time.monotonic()
    with pytest.raises(SystemExit, match="a run began again"):
        study._train([sys.executable, "-c", "import time; time.sleep(60)"], checkout / "grid.json", 0.1)
    assert time.monotonic() - started < 30  # the child was ended, not waited for
    assert f"{wrong} \nthe study stops" in capsys.readouterr().out


def study_on_disk(tmp_path: Path, monkeypatch, params: dict):
    """benchmarks/cpu_study.py with its .study/ under tmp_path, and a study of commit 0000000 there: its record, and
    a checkout holding `params` and this library (what the study's methods read); the module, the study and the
    checkout."""
    cpu_study = benchmark_script("cpu_study")
    monkeypatch.setattr(cpu_study, "STUDY", tmp_path / ".study")
    commit = "0" * 40
    results = tmp_path / "results" / "2026-01-01-cpu-0000000"
    results.mkdir(parents=True)
    (results / "study.json").write_text(json.dumps({"commit": commit, "overrides": {}, "first": []}))
    checkout = tmp_path / ".study" / commit[:7]
    checkout.mkdir(parents=True)
    (checkout / "src").symlink_to(ROOT / "src")  # the commit's library: this one
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return cpu_study, cpu_study.Study(results), checkout


def test_a_finished_run_whose_tables_dvc_is_rewriting_comes_home_later(tmp_path, monkeypatch, capsys):
    """DVC deletes a stage's outputs before it runs it again, and the train stage rewrites a finished run's tables
    from its checkpoint: a job stopped in between leaves a tested run without its epochs.csv for a while. `collect`
    then says so and brings the rest home, rather than failing on the missing file (as it once did)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    _, study, checkout = study_on_disk(tmp_path, monkeypatch, {**params, "seeds": [0]})
    results = study.results
    epochs = study.params.train.epochs
    for name in study.run_names():
        files = RunFiles(checkout / "runs" / name)
        files.checkpoints.mkdir(parents=True)
        torch.save({"epoch": epochs}, files.last)  # trained to the end
    run = RunFiles(checkout / "runs" / "VGG-08-s0")
    (run.root / "test.json").write_text("{}")  # tested; its training tables deleted by DVC, not yet rewritten

    states = study.bring_home()
    assert states["VGG-08-s0"] == {"epochs": epochs, "state": "finished"}
    assert "VGG-08-s0: epochs.csv, gradients.csv, train.json" in capsys.readouterr().out
    assert not (results / "runs").exists()  # nothing of it half home
    assert (results / "resume" / "VGG-08-s0.pt").exists()  # its resume point is
    assert json.loads((results / "study.json").read_text())["runs"]["VGG-08-s0"]["state"] == "finished"


def test_a_bfloat16_study_is_emulated_on_a_cpu_without_it_where_the_emulation_reaches(tmp_path, monkeypatch):
    """On a CPU without bfloat16 arithmetic (made so here, whatever this one has) a study in bfloat16 goes on: its
    stages' environment carries the emulation, from the study's own copy, and `start` proves that it reaches a
    trainer before anything starts. Where it could not reach every trainer (a Ray cluster's workers, fused runs)
    the study is refused, saying why."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["train"]["bf16"] is True
    cpu_study, study, checkout = study_on_disk(tmp_path, monkeypatch, params)
    native = cpu_study.bf16_emulation.native()

    monkeypatch.setattr(cpu_study.bf16_emulation, "native", lambda: False)
    assert study.emulates_bf16 and study.cannot_train_here() is None
    env = study.env()
    assert env["VGGDEPTH_BF16_EMULATION"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(study.emulation), str(checkout / "src")]
    study._put_emulation()  # a real process in that environment trains in bfloat16 (natively, where it can)
    assert sorted(p.name for p in study.emulation.iterdir()) == ["bf16_emulation.py", "sitecustomize.py"]
    if not native:  # the emulation is what makes it so here: without it, start refuses, saying what it saw
        with monkeypatch.context() as m:
            m.setattr(cpu_study.bf16_emulation, "ENV", "NOT_THE_EMULATION")  # the stages would not get it
            with pytest.raises(cpu_study.CannotTrainHere, match=r"did not reach a trainer .* trains in float32"):
                study._put_emulation()

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert "cannot reach the workers of a Ray cluster (127.0.0.1:6379)" in study.cannot_train_here()
    monkeypatch.delenv("RAY_ADDRESS")
    params["grid"]["runs_per_group"] = 2
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "does not cover fused runs (grid.runs_per_group 2)" in study.cannot_train_here()
    params["train"]["bf16"] = False  # a float32 study: nothing to emulate, fused or not
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert not study.emulates_bf16 and study.cannot_train_here() is None
    assert "VGGDEPTH_BF16_EMULATION" not in study.env()


def test_a_study_this_machine_cannot_take_further_is_refused_before_anything_starts(
    tmp_path, archive_path, archive_md5, request
):
    """A part-trained run resumes only in the precision it was trained in: `start` says so at once, naming the runs
    and the study's precision, and launches nothing (not a job that prepares the data for minutes and then fails);
    a study begun --after it would wait for ever, and is refused too. `status` says the same; the others still
    start."""
    cpu_study = benchmark_script("cpu_study")
    repo = tiny_clone(tmp_path, archive_path, archive_md5, epochs=3, tracking=False, variants=("VGG-08", "VGG-38"))
    params = (repo / "params.yaml").read_text()
    assert "bf16: true" in params  # float32 on any machine, whatever its CPU: the crafted checkpoint is bfloat16
    (repo / "params.yaml").write_text(params.replace("bf16: true", "bf16: false"))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "fp32"], cwd=repo, check=True)
    commit = git_head(repo)
    shutil.rmtree(repo / "results")  # this repository's own studies: only this test's
    results = repo / "results" / f"2026-01-01-cpu-{commit[:7]}"
    overrides = {"data.url": str(archive_path), "data.md5": archive_md5, **cpu_study.OVERRIDES}
    (results / "resume").mkdir(parents=True)
    (results / "study.json").write_text(json.dumps({"commit": commit, "overrides": overrides, "first": []}))
    torch.save({"epoch": 2, "precision": "bfloat16"}, results / "resume" / "VGG-38-s0.pt")

    # were a job started after all, `stop` ends it with the test
    stop = [sys.executable, "benchmarks/cpu_study.py", "stop"]
    request.addfinalizer(lambda: subprocess.run(stop, cwd=repo, capture_output=True, env=dvc_env(), timeout=120))
    error = study(repo, "start", "--commit", commit, fails=True)
    assert f"2026-01-01-cpu-{commit[:7]}: not started" in error
    assert "VGG-38-s0 (2 epochs) trained in bfloat16, and this study trains in float32 (train.bf16: false)" in error
    assert "VGG-08-s0" not in error  # not started: it trains in this machine's precision
    assert not list((repo / ".study").glob("*.pid"))  # no job
    assert "cannot go on on this machine: VGG-38-s0 (2 epochs) trained in bfloat16" in study(repo, "status")

    # A study begun --after it is recorded (it goes on where the first can) but not started.
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "2"],
        cwd=repo,
        check=True,
    )
    second = git_head(repo)
    begin = ("--variants", "VGG-08", "--after", commit, "--archive", str(archive_path))
    error = study(repo, "start", "--commit", second, *begin, fails=True)
    assert f"begins after the study of {commit[:7]}, which cannot go on here: VGG-38-s0 (2 epochs)" in error
    assert not list((repo / ".study").glob("*.pid"))
    error = study(repo, "start", fails=True)  # every study: each refused by name
    assert f"not started: 2026-01-01-cpu-{commit[:7]}, " in error and f"-cpu-{second[:7]}" in error

    # Trained in this machine's precision, the same run is no obstacle.
    torch.save({"epoch": 2, "precision": "float32"}, results / "resume" / "VGG-38-s0.pt")
    shutil.rmtree(repo / ".study" / commit[:7] / "runs")  # the resume point put in place by the refused start
    assert "cannot go on" not in study(repo, "status")


@pytest.mark.slow
def test_the_study_survives_a_stop_and_a_fresh_machine_and_comes_home(tmp_path, archive_path, archive_md5):
    variants = ("VGG-08", "VGG-38")
    repo = tiny_clone(tmp_path, archive_path, archive_md5, epochs=EPOCHS, tracking=True, variants=variants)
    commit = git_head(repo)
    name = f"-cpu-{commit[:7]}"

    # Begun with no first target, so that the grid trains both runs and VGG-08 ends long before VGG-38.
    started = study(repo, "start", "--commit", commit, "--archive", str(archive_path), "--first", "", "--poll-s", "1")
    assert "lowest priority" in started
    # In bfloat16 (the tiny clone's train.bf16) on any CPU: emulated where it has no bfloat16 arithmetic.
    how = "native" if cpu_computes_bf16() else "emulated"
    assert ("emulated in float32 kernels" in started) == (how == "emulated")
    sessions = json.loads(next((repo / "results").glob(f"*-cpu-{commit[:7]}/study.json")).read_text())["sessions"]
    assert [(s["bf16"], s["epochs"]) for s in sessions] == [(how, {"VGG-08-s0": 0, "VGG-38-s0": 0})]
    checkout = repo / ".study" / commit[:7]
    runs = checkout / "runs"
    job = int(next((repo / ".study").glob("*.pid")).read_text())
    assert os.getpriority(os.PRIO_PROCESS, job) == 19  # the lowest priority, for its session's group too:
    autogroup = Path(f"/proc/{job}/autogroup")  # under autogroup scheduling nice alone does not yield the CPU
    assert not autogroup.exists() or autogroup.read_text().strip().endswith("nice 19")
    wait_for(lambda: (runs / "VGG-08-s0" / "test.json").exists(), 600, "VGG-08 evaluated while the grid trains")
    assert not (runs / "VGG-38-s0" / "train.json").exists()  # evaluated mid-grid, not after it
    # The job brings its progress home as it goes, before any `collect`: a session cut off keeps it in the tree.
    results = next((repo / "results").glob(f"*{name}"))
    home = results / "runs" / "VGG-08-s0"

    def recorded_finished() -> bool:  # the record is written after the tables
        return (
            json.loads((results / "study.json").read_text()).get("runs", {}).get("VGG-08-s0", {}).get("state")
            == "finished"
        )

    wait_for(recorded_finished, 60, "the job to bring VGG-08 home")
    assert (home / "test.json").exists() and (home / "predictions.npz").exists()
    assert (results / "resume" / "VGG-38-s0.pt").exists()
    assert "| VGG-08 |" in (results / "report" / "table1.md").read_text()  # the report, before the record
    assert "stopped" in study(repo, "stop", "--commit", commit)
    ps = subprocess.run(["pgrep", "-f", str(checkout)], capture_output=True, text=True)
    assert ps.stdout == "", "a process of the study outlived `stop`"
    assert "threads_per_run: 1\n" in (checkout / "params.yaml").read_text()

    # A stop between the two writes of a checkpoint (last.pt renamed previous.pt, the new last.pt not yet written)
    # leaves previous.pt alone, and the run resumes from it: so does a fresh machine. Made certain here.
    checkpoints = runs / "VGG-38-s0" / "checkpoints"
    if (checkpoints / "last.pt").exists():
        os.replace(checkpoints / "last.pt", checkpoints / "previous.pt")
    study(repo, "collect", "--commit", commit)
    assert (results / "resume" / "VGG-38-s0.pt").read_bytes() == (checkpoints / "previous.pt").read_bytes()
    kept = torch.load(checkpoints / "previous.pt", map_location="cpu", weights_only=True)["epoch"]
    record = json.loads((results / "study.json").read_text())
    assert record["commit"] == commit and record["overrides"]["data.md5"] == archive_md5
    assert record["params"]["train"]["epochs"] == EPOCHS and record["params"]["seeds"] == [0]
    assert record["runs"]["VGG-08-s0"] == {"epochs": EPOCHS, "state": "finished"}
    stopped_at = record["runs"]["VGG-38-s0"]["epochs"]
    assert 0 < stopped_at < EPOCHS and record["runs"]["VGG-38-s0"]["state"] == "part-trained"
    assert 0 < kept <= stopped_at
    assert sorted(p.name for p in (results / "runs" / "VGG-08-s0").iterdir()) == sorted(
        [
            "epochs.csv",
            "gradients.csv",
            "train.json",
            "test.json",
            "predictions.npz",
            "per_class.csv",
            "superclass_confusion.csv",
        ]
    )
    assert not (results / "runs" / "VGG-38-s0").exists()  # unfinished: only its resume point comes home
    assert sorted(p.name for p in (results / "resume").iterdir()) == ["VGG-08-s0.pt", "VGG-38-s0.pt"]
    table = (results / "report" / "table1.md").read_text()  # rendered from the finished runs
    assert "| VGG-08 |" in table and "Still training, so not in these tables yet: VGG-38." in table
    assert json.loads((results / "runs" / "VGG-08-s0" / "train.json").read_text())["precision"] == "bfloat16"
    vgg08 = (results / "runs" / "VGG-08-s0" / "epochs.csv").read_text()
    tested = (results / "runs" / "VGG-08-s0" / "test.json").read_text()
    before = rows(runs / "VGG-38-s0" / "epochs.csv")[:kept]

    # A fresh machine: the checkout and its run folders are gone; results/ (committed) is all there is.
    subprocess.run(["rm", "-rf", str(repo / ".study")], check=True)
    study(repo, "start", "--commit", commit, "--poll-s", "1")
    # Put in place, not resumed yet (the job probes first): status counts the resume point's epochs, not 0.
    status = study(repo, "status", "--commit", commit)
    shown = re.search(r"VGG-38-s0: (\d+) epochs, part-trained", status)
    assert shown and int(shown[1]) >= kept
    assert f"VGG-08-s0: {EPOCHS} epochs, finished" in status  # tested: its evaluation is home, not run again
    wait_for(lambda: "not running" in study(repo, "status", "--commit", commit), 900, "the study to end")
    log = next((repo / ".study").glob("*.log")).read_text()
    assert "the study is complete" in log, log[-3000:]
    assert "resuming runs/VGG-38-s0/checkpoints/last.pt from epoch" in log
    assert "VGG-08-s0 finished: evaluating it now" not in log  # home already: only DVC's stage tests it again
    assert ("bfloat16 emulated in float32 kernels" in log) == (how == "emulated")  # each stage's process says so

    collected = study(repo, "collect", "--commit", commit)
    record = json.loads((results / "study.json").read_text())
    assert record["runs"] == {f"{v}-s0": {"epochs": EPOCHS, "state": "finished"} for v in variants}
    # complete and home: the resume points leave the tree (megabytes each, in every GPU lease call)
    said = collected + next((repo / ".study").glob("*.log")).read_text()  # the job's last look, or collect's
    assert not (results / "resume").exists() and "complete, its resume points removed" in said
    assert "its resume points removed" not in study(repo, "collect", "--commit", commit)  # and stay gone
    assert not (results / "resume").exists()
    second = record["sessions"][1]  # the fresh machine's start: which epochs it began from, and how
    assert len(record["sessions"]) == 2 and second["bf16"] == how
    assert second["epochs"]["VGG-08-s0"] == EPOCHS and second["epochs"]["VGG-38-s0"] >= kept
    assert (results / "runs" / "VGG-08-s0" / "epochs.csv").read_text() == vgg08  # restored, not trained again
    assert (results / "runs" / "VGG-08-s0" / "test.json").read_text() == tested  # evaluated again, kept as it came
    after = rows(results / "runs" / "VGG-38-s0" / "epochs.csv")
    assert len(after) == EPOCHS and after[:kept] == before  # the epochs of the resume point kept, seconds too
    table = (results / "report" / "table1.md").read_text()
    assert "| VGG-08 |" in table and "| VGG-38 |" in table and "Still training" not in table

    # Home: the runs become MLflow runs under a parent named after the study.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**dvc_env(), "MLFLOW_TRACKING_URI": uri}
    synced = subprocess.run(
        [sys.executable, "-m", "vggdepth", "sync", *map(str, sorted((results / "runs").iterdir()))],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert synced.returncode == 0, synced.stdout + synced.stderr
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("vggdepth")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = found[f"CPU study {results.name}"]
    assert parent.data.tags["git_commit"] == commit and parent.data.tags["device"] == record["device"]
    child = found["VGG-38-s0"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (
        child.data.tags["precision"]
        == json.loads((results / "runs" / "VGG-38-s0" / "train.json").read_text())["precision"]
    )
    assert len(client.get_metric_history(child.info.run_id, "curves/val_acc")) == EPOCHS


@pytest.mark.slow
def test_a_study_narrowed_to_some_rows_waits_for_the_other_and_trains_only_its_rows(
    tmp_path, archive_path, archive_md5
):
    repo = tiny_clone(tmp_path, archive_path, archive_md5, epochs=10, tracking=False, variants=("VGG-08", "VGG-38"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    # no study but this test's: without --commit, the commands apply to every study under results/
    subprocess.run([*git, "rm", "-r", "--quiet", "results"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "no results"], cwd=repo, check=True)
    first = git_head(repo)
    subprocess.run([*git, "commit", "--quiet", "--allow-empty", "-m", "later"], cwd=repo, check=True)
    later = git_head(repo)
    archive = ["--archive", str(archive_path), "--poll-s", "1"]

    # What cannot begin says why, and begins nothing.
    assert "NOPE not in" in study(repo, "start", "--commit", later, "--variants", "NOPE", *archive, fails=True)
    assert "no CPU study of" in study(
        repo, "start", "--commit", later, "--variants", "VGG-08", "--after", first, *archive, fails=True
    )
    assert "name its commit" in study(repo, "start", "--variants", "VGG-08", fails=True)
    assert not (repo / "results").exists()

    study(repo, "start", "--commit", first, "--first", "", *archive)
    study(repo, "start", "--commit", later, "--variants", "VGG-08", "--after", first, *archive)
    assert study(repo, "start").count("already running") == 2  # every session's one command: both run already
    other = repo / ".study" / later[:7]
    log = repo / ".study" / f"{next((repo / 'results').glob(f'*-cpu-{later[:7]}')).name}.log"
    wait_for(lambda: log.exists() and "the study is complete" in log.read_text(), 600, "the narrowed study to end")
    # its last line comes a moment before its process has gone
    wait_for(lambda: f"-cpu-{later[:7]}: not running" in study(repo, "status"), 60, "the narrowed job to exit")
    text = log.read_text()
    assert f"waiting for the study of {first[:7]} (2 run(s) left): this one begins at 1" in text, text[-3000:]
    begins = re.search(rf"the study of {first[:7]} has (\d) run\(s\) left: this one begins\n", text)
    assert begins and int(begins[1]) <= 1, text[-3000:]
    assert begins.end() < text.index("Running stage 'prepare'")  # its first stage ran after the wait
    assert (other / "runs" / "VGG-08-s0" / "test.json").exists()
    assert not (other / "runs" / "VGG-38-s0").exists()  # not its row: never trained
    assert "evaluate@VGG-08-0" in (other / "dvc.lock").read_text()  # its row is DVC's, as in a whole study
    assert "evaluate@VGG-38-0" not in (other / "dvc.lock").read_text()

    stopped = study(repo, "stop")
    assert f"-cpu-{later[:7]}: not running" in stopped and f"-cpu-{first[:7]}: " in stopped
    assert "fixed when it begins" in study(repo, "start", "--commit", later, "--variants", "VGG-38", fails=True)
    collected = study(repo, "collect")
    assert collected.index(f"-cpu-{first[:7]}:") < collected.index(f"-cpu-{later[:7]}:")  # oldest first
    results = next((repo / "results").glob(f"*-cpu-{later[:7]}"))
    record = json.loads((results / "study.json").read_text())
    assert record["variants"] == ["VGG-08"] and record["after"] == first and record["first"] == []
    assert record["runs"] == {"VGG-08-s0": {"epochs": 10, "state": "finished"}}
    assert sorted(p.name for p in (results / "runs").iterdir()) == ["VGG-08-s0"]
    table = (results / "report" / "table1.md").read_text()
    assert "| VGG-08 |" in table and "Still training" not in table
    assert "This study trains only VGG-08: the other rows are another study's." in table
    status = study(repo, "status")
    assert f"-cpu-{later[:7]}: not running\n  VGG-08-s0: 10 epochs, finished\n" in status
    started = study(repo, "start")  # the narrowed study is complete: nothing of it starts again
    assert f"-cpu-{later[:7]}: complete, nothing to train" in started
    study(repo, "stop")
    shutil.rmtree(other)  # a fresh machine, where the complete study never started: nothing of it to collect
    assert f"-cpu-{later[:7]}: not started on this machine, nothing to collect" in study(repo, "collect")
    assert json.loads((results / "study.json").read_text())["runs"] == record["runs"]
