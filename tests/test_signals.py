"""Signals end a stage cleanly, and one writer at a time (vggdepth.signals, vggdepth.locks), with real processes and
real tiny training: SIGTERM to a stage is an interruption (one line, exit 143, the last checkpoint kept, the MLflow
run KILLED, a resume equal to the undisturbed run); a stage ends when `dvc repro` is killed, and a grid's workers
when the grid is; a second writer of a run folder is refused at once, and a killed first one leaves no lock stuck."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.helpers import DVC, IN_CREATE, IN_MOVED_TO, Watch, dvc_env, narrow, project_env, same_run
from vggdepth.checkpoints import load_checkpoint
from vggdepth.files import clean_leftovers, is_leftover
from vggdepth.locks import FolderBusy, lock_path, writing
from vggdepth.runs import RunFiles

RUN = "runs/VGG-08-s0"
TRAIN = ("--variant", "VGG-08", "--seed", "0", "--out", RUN, "--data", "data/prepared")


@pytest.fixture(scope="module")
def project(tiny_data_dir, archive_path, archive_md5, tmp_path_factory) -> Path:
    """VGG-08 and VGG-38, one seed, 200/100/100 real images, 3 epochs on the CPU, untracked."""
    root = tmp_path_factory.mktemp("signals") / "p"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(url=str(archive_path), md5=archive_md5)
    raw["prepare"]["subset"] = {"train": 2, "val": 1, "test": 1}
    raw["train"]["epochs"] = 3
    raw["runtime"].update(device="cpu", progress_every=1, threads=1)
    raw["grid"].update(threads_per_run=1, backend="processes")
    raw["seeds"] = [0]
    raw["tracking"].update(enabled=False, system_metrics=False, log_model=False)
    narrow(raw, {v: raw["variants"][v] for v in ("VGG-08", "VGG-38")})
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(tiny_data_dir, root / "data" / "prepared")
    return root


def _copy(project: Path, dest: Path, **changes) -> Path:
    """A copy of the project; `changes` ({"train.epochs": 30}) set in its params."""
    shutil.copytree(project, dest)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def _stage(root: Path, stage: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline" / f"{stage}.py"), *args, "--params", str(root / "params.yaml")]


def _sighup_as_usual() -> None:
    """In a child: SIGHUP's default action, whatever this test run inherited (a suite started under `nohup` ignores
    it, and an ignored SIGHUP is kept ignored and turns the parent watch off, as it should)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start(root: Path, stage: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        _stage(root, stage, *args),
        cwd=root,
        env=project_env(root, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sighup_as_usual,
    )


def _train(root: Path) -> subprocess.CompletedProcess:
    command = _stage(root, "train", *TRAIN)
    return subprocess.run(command, cwd=root, env=project_env(root), capture_output=True, text=True)


def _after_an_epoch(folder: Path, process: subprocess.Popen, epochs: int = 1) -> None:
    """Wait until `epochs` more epochs of the run in `folder` are written (its epochs.csv replaced)."""
    watch = Watch(folder, IN_CREATE | IN_MOVED_TO)
    try:
        for _ in range(epochs):
            watch.wait(lambda name: name == "epochs.csv")
    finally:
        watch.close()
    assert process.poll() is None, "the stage ended before it could be stopped"


def _gone(pids: list[int], timeout_s: float) -> list[int]:
    """The processes of `pids` still running (not zombies) after waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid in pids if _running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _descendants(pid: int) -> dict[int, str]:
    """Every process under `pid`, by pid: its command line."""
    parents, commands = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                commands[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, queue = {}, [pid]
    while queue:
        parent = queue.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = commands[child]
                queue.append(child)
    return found


def _interrupted_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("interrupted (")]


def _terminated_after_an_epoch(process: subprocess.Popen, run: Path, timeout_s: float = 60, before=None) -> tuple:
    """SIGTERM to `process` once `run` has a finished epoch (`before(process)` first, if given): it must end with
    exit status 143, no traceback and one interruption line, which is returned with its stderr and what
    `before` returned."""
    try:
        _after_an_epoch(run, process)
        found = before(process) if before else None
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=timeout_s)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = _interrupted_lines(stderr)
    return line, stderr, found


def _statuses(root: Path) -> dict[str, str]:
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vggdepth")
    runs = client.search_runs([experiment.experiment_id], "tags.`vggdepth.kind` = 'training'")
    return {r.info.run_name: r.info.status for r in runs}


@pytest.fixture(scope="module")
def undisturbed(project, tmp_path_factory) -> Path:
    """VGG-08 trained for its 3 epochs without a fault."""
    root = _copy(project, tmp_path_factory.mktemp("undisturbed") / "p")
    result = _train(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


# ---- SIGTERM to a stage -----------------------------------------------------------------------------------------


def test_sigterm_to_train_keeps_its_checkpoint_says_one_line_and_resumes_to_the_undisturbed_run(
    project, undisturbed, tmp_path
):
    root = _copy(project, tmp_path / "p", **{"tracking.enabled": True})
    line, stderr, _ = _terminated_after_an_epoch(_start(root, "train", *TRAIN), root / RUN)
    assert stderr.rstrip().endswith(line), "the interruption is the last thing said"
    kept = re.fullmatch(
        rf"interrupted \(SIGTERM\): {RUN} keeps its checkpoint after epoch ([12]) of 3 \((\S+)\); run the stage "
        "again to resume",
        line,
    )
    assert kept, line
    assert load_checkpoint(root / kept.group(2))["epoch"] == int(kept.group(1))
    assert _statuses(root) == {"VGG-08-s0": "KILLED"}
    assert not lock_path(root / RUN).exists()

    again = _train(root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    same_run(RunFiles(root / RUN), RunFiles(undisturbed / RUN))
    assert _statuses(root) == {"VGG-08-s0": "FINISHED"}  # the same MLflow run, continued and closed
    assert not list(root.rglob("*.part"))


def test_sigterm_to_dvc_repro_ends_its_train_stage_too(project, tmp_path):
    root = _copy(project, tmp_path / "p", **{"train.epochs": 200})
    subprocess.run([DVC, "init", "--no-scm", "--quiet"], cwd=root, check=True, env=dvc_env())
    command = " ".join(_stage(root, "train", *TRAIN))
    # `&& ...` keeps the shell DVC runs the command in (`$SHELL -c`) between DVC and the stage
    stage = {"cmd": f"{command} && echo trained", "outs": [{f"{RUN}/checkpoints": {"persist": True}}]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    env = {**dvc_env(), "DVC_NO_ANALYTICS": "1"}  # no daemon of DVC's to hold the output pipe open
    dvc = subprocess.Popen(
        [DVC, "repro", "train"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _after_an_epoch(root / RUN, dvc)
        stages = [pid for pid, cmd in _descendants(dvc.pid).items() if "pipeline/train.py" in cmd and " -c " not in cmd]
        assert len(stages) == 1, _descendants(dvc.pid)
        dvc.send_signal(signal.SIGTERM)
        dvc.wait(timeout=60)
        assert dvc.returncode == -signal.SIGTERM  # DVC itself ends at once, as before: it forwards nothing
        assert _gone(stages, timeout_s=10) == [], "the train stage outlived the dvc repro that ran it"
        output = dvc.stdout.read()  # the stage's stderr too: all of it, now that every writer has ended
    finally:
        dvc.kill()
        dvc.wait()
        dvc.stdout.close()
    (line,) = _interrupted_lines(output)
    assert re.match(r"interrupted \(python\S* \S*dvc repro \(pid \d+\), which started it, ended\): ", line), line
    assert f"{RUN} keeps its checkpoint after epoch" in line
    assert "Traceback" not in output
    assert not lock_path(root / RUN).exists()
    assert load_checkpoint(RunFiles(root / RUN).last)["epoch"] >= 1


# ---- the mechanism, in a command that trains nothing ------------------------------------------------------------

COMMAND = """
import time
import typer
from vggdepth.cli import entry_point
from vggdepth.signals import keeping

@entry_point
def main(stubborn: bool = False) -> None:
    with keeping(lambda: "the work so far is kept; run it again to go on"):
        try:
            print("ready", flush=True)
            time.sleep(120)
        finally:
            if stubborn:  # a clean-up that hangs
                print("cleaning up", flush=True)
                time.sleep(120)

typer.run(main)
"""


def _command(tmp_path: Path, *args: str, preexec_fn=_sighup_as_usual) -> subprocess.Popen:
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    assert process.stdout.readline() == "ready\n"
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_is_an_interruption_said_in_one_line(tmp_path, signum):
    process = _command(tmp_path)
    process.send_signal(signum)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signum
    assert err == f"interrupted ({signum.name}): the work so far is kept; run it again to go on\n"


def test_a_second_signal_ends_a_hanging_clean_up_at_once(tmp_path):
    process = _command(tmp_path, "--stubborn")
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline() == "cleaning up\n"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGTERM


def test_a_nohup_command_keeps_ignoring_sighup(tmp_path):
    process = _command(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    process.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143 and err.startswith("interrupted (SIGTERM): ")


def test_a_command_ends_when_what_started_it_is_killed_even_through_a_shell(tmp_path):
    """The command under `sh -c '... && true'` (the shell stays, waiting for it) under a Python process that is
    then SIGKILLed: the command notices within a second, says so in its line and ends."""
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    out = tmp_path / "out.txt"
    starter = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen(['sh', '-c', {f'{sys.executable} {script} 2>{out} && true'!r}], stdout=subprocess.PIPE)\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", starter], preexec_fn=_sighup_as_usual)
    try:
        deadline = time.monotonic() + 60
        while not (
            commands := [p for p, c in _descendants(process.pid).items() if str(script) in c and " -c " not in c]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1)  # its handlers and watch in place ("ready" goes to a pipe nobody reads)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert _gone(commands, timeout_s=5) == []
    finally:
        process.kill()
        process.wait()
    line = out.read_text()
    assert re.fullmatch(
        r"interrupted \(python\S* -c import subprocess, sys, time.* \(pid \d+\), which started it, ended\): the "
        r"work so far is kept; run it again to go on\n",
        line,
    ), line


# ---- one writer at a time ---------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once_and_a_killed_first_one_leaves_no_lock_stuck(project, undisturbed, tmp_path):
    root = _copy(project, tmp_path / "p")
    first = _start(root, "train", *TRAIN)
    try:
        _after_an_epoch(root / RUN, first)
        first.send_signal(signal.SIGSTOP)  # holding its lock, between two steps: as a slow writer would
        second = _train(root)
        assert second.returncode == 1, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        holder = " ".join([Path(sys.executable).name, *_stage(root, "train", *TRAIN)[1:]])
        assert errors == [
            f"error: {RUN} is being written by another process (pid {first.pid}: {holder}); wait for it to end or "
            "stop it, then run this again"
        ], second.stderr[-3000:]
        assert "Traceback" not in second.stderr

        watch = Watch(root / RUN, IN_MOVED_TO)
        first.send_signal(signal.SIGCONT)
        watch.wait(lambda name: name == "epochs.csv")  # the first goes on, undisturbed: another epoch
        watch.close()
        first.send_signal(signal.SIGKILL)  # its lock file stays behind; the lock itself goes with the process
        first.wait(timeout=60)
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    assert first.returncode == -signal.SIGKILL, "the first writer ended before it could be killed"
    assert lock_path(root / RUN).exists()

    again = _train(root)
    assert again.returncode == 0, again.stderr[-3000:]
    same_run(RunFiles(root / RUN), RunFiles(undisturbed / RUN))
    assert not lock_path(root / RUN).exists()


def test_the_lock_is_no_leftover_and_names_its_holder(tmp_path):
    """Clean-up never removes a lock file (it is none of the temporary names it removes, held or not), and a holder
    in another process is named: its pid and command."""
    run = tmp_path / "runs" / "VGG-08-s0"
    with writing(run):
        lock = lock_path(run)
        assert lock == tmp_path / "runs" / ".VGG-08-s0.vggdepth-lock" and lock.exists()
        assert not is_leftover(lock, run) and clean_leftovers(run) == [] and lock.exists()
        code = "import sys; from vggdepth.locks import writing\nwith writing(sys.argv[1]): pass"
        other = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
        assert other.returncode == 1
        assert f"FolderBusy: {run} is being written by another process (pid {os.getpid()}: " in other.stderr
        with pytest.raises(FolderBusy, match="is being written by another process"), writing(run):
            pass  # a second writer in the same process is refused too
    assert not lock.exists()
    with writing(run):  # and taken again once let go
        assert lock.exists()


# ---- a grid's workers end with it --------------------------------------------------------------------------------


def _grid(root: Path, **env: str) -> subprocess.Popen:
    return _start(root, "grid", "--runs", "runs", "--out", "runs/grid.json", "--data", "data/prepared", **env)


def _workers(driver: subprocess.Popen) -> list[int]:
    workers = [pid for pid, cmd in _descendants(driver.pid).items() if "multiprocessing" in cmd and "spawn" in cmd]
    assert workers, _descendants(driver.pid)
    return workers


def test_sigterm_to_the_grid_ends_its_workers_and_marks_their_runs_killed(project, tmp_path):
    root = _copy(project, tmp_path / "p", **{"train.epochs": 200, "tracking.enabled": True})
    driver = _grid(root)
    line, _, workers = _terminated_after_an_epoch(driver, root / RUN, before=_workers)
    assert line == (
        f"interrupted (SIGTERM): every run in {root / 'runs'} keeps its last finished epoch; run the grid again "
        "(dvc repro) to resume them"
    )
    assert _gone(workers, timeout_s=5) == []
    assert set(_statuses(root).values()) == {"KILLED"}
    assert not list((root / "runs").glob(".*.vggdepth-lock"))
    assert load_checkpoint(RunFiles(root / RUN).last)["epoch"] >= 1


@pytest.mark.slow
def test_a_killed_grid_driver_takes_its_workers_with_it(project, tmp_path):
    root = _copy(project, tmp_path / "p", **{"train.epochs": 200})
    driver = _grid(root)
    try:
        _after_an_epoch(root / RUN, driver)
        workers = _workers(driver)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        assert _gone(workers, timeout_s=10) == [], "the grid's workers outlived their driver"
    finally:
        driver.kill()
        driver.wait()
        driver.stderr.close()


@pytest.mark.slow
def test_sigterm_to_the_grid_on_ray_ends_its_actors_and_marks_their_runs_killed(project, tmp_path):
    root = _copy(project, tmp_path / "p", **{"train.epochs": 200, "tracking.enabled": True, "grid.backend": "ray"})
    driver = _grid(root, VGGDEPTH_TEST_DRIVER=str(tmp_path))
    # ray.init made SIGTERM a bare sys.exit: the grid takes it back
    line, _, _ = _terminated_after_an_epoch(driver, root / RUN, timeout_s=120)
    assert line.startswith("interrupted (SIGTERM): every run in ")
    assert set(_statuses(root).values()) == {"KILLED"}
    assert not list((root / "runs").glob(".*.vggdepth-lock"))
    marker = f"VGGDEPTH_TEST_DRIVER={tmp_path}".encode()
    deadline = time.monotonic() + 60
    while (left := _with_environment(marker)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"Ray processes of the interrupted grid are still running: {left}"


def _with_environment(marker: bytes) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _running(int(proc.name)):
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found
