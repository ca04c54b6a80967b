"""The real-size study on this machine's CPU: a background job of many hours, a working session at a time.

    python benchmarks/cpu_study.py start --commit REV     # begin (or restart) the study of REV, in the background
    python benchmarks/cpu_study.py start                  # (re)start every study not complete, lowest CPU priority
    python benchmarks/cpu_study.py status                 # each run's epochs, and whether the jobs run
    python benchmarks/cpu_study.py collect                # finished runs, resume points and report into results/
    python benchmarks/cpu_study.py stop                   # end them (they resume from their checkpoints at `start`)

Without --commit, a command applies to every study under results/, oldest first.

The study trains in `.study/<commit>/`, a git-ignored clone of one fixed commit, so later changes to the code
neither disturb its runs nor make them stale; its params.yaml is the commit's with the study's overrides (the
local archive and its md5, seed 0, one thread per run, tracking off: `python -m vggdepth sync` imports the runs
into MLflow from their tables). It runs `dvc repro` there: first `--first` (VGG-08 through its own train stage:
the fidelity check, minutes), then the whole pipeline, whose grid stage trains the other runs at once. While the
grid trains, every run it finishes is evaluated at once (pipeline/evaluate.py), so its row can be committed without
waiting for the others; at every poll while the grid trains the job brings its progress home (what `collect`
brings; the report when a run has come home), so that a session cut off before it could `collect` leaves the
study's progress in the working tree. Tests get the CPU first (nice 19); a session's end stops the job, and `start`
resumes it from its checkpoints, on a fresh machine from the resume points committed under results/. A study in
bfloat16 trains in it on every CPU: where the CPU has no bfloat16 arithmetic, its stages emulate it in float32
kernels (vggdepth.bf16_emulation, put into them by benchmarks/bf16_emulation/sitecustomize.py); study.json's
`sessions` records every start's CPU and how it computed bfloat16.

A study can be narrowed to some rows (`--variants V`, repeated), for rows a later commit adds: its job trains
only their runs (`pipeline/grid.py --only`), then has DVC evaluate them, and its report says the other rows are
another study's. Begun `--after REV`, its job first waits until REV's study has at most one run left: from then on
that study's grid (two runs at once, a thread each) leaves a core of this 2-core machine free, so none idles
while its last run ends (the three runs share the two cores until it has).

results/<date>-cpu-<commit>/ is what comes home (committed):
  study.json         the commit, the overrides, the machine, each run's epochs and state
  runs/<run>/        each finished run's tables as the stages wrote them (no checkpoints)
  resume/<run>.pt    each run's last checkpoint: a session on a fresh machine resumes the study from these,
                     exactly; removed once every run has finished and come home (git history keeps them)
  report/            Table 1, summary, curves and figures, rendered from the finished runs (the rest named)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vggdepth import bf16_emulation  # noqa: E402
from vggdepth.checkpoints import FLOAT32  # noqa: E402
from vggdepth.config import Params, load_params, recorded_params  # noqa: E402
from vggdepth.download import md5sum  # noqa: E402
from vggdepth.engine import BFLOAT16  # noqa: E402
from vggdepth.errors import VggdepthError  # noqa: E402
from vggdepth.files import atomic_dir, atomic_path, write_json  # noqa: E402
from vggdepth.outputs import read_epochs  # noqa: E402
from vggdepth.report import build_report  # noqa: E402
from vggdepth.runs import EVALUATION_TABLES, TEST, TRAINING_TABLES, RunFiles  # noqa: E402
from vggdepth.schemas import StudyRecord, TrainRecord, read_record  # noqa: E402

T = TypeVar("T")
STUDY = ROOT / ".study"
RESULTS = ROOT / "results"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar-100-python.tar.gz"
OVERRIDES = {
    "seeds": [0],
    "tracking.enabled": False,
    "grid.threads_per_run": 1,  # fixed, not probed: a run resumed in another session continues bit for bit
    # plain processes, no Ray: nothing to start at the lowest priority on a busy machine (Ray's startup timed out
    # there), and a stop ends the whole process group
    "grid.backend": "processes",
}
FIRST = "evaluate@VGG-08-0"  # the fidelity check: against reference/pipeline-cpu-vgg08-s0 (float32)
AFTER_LEFT = 1  # a study begun --after another begins when that one has at most this many runs left (docstring)
# A finished run's tables in the order they come home: test.json, which says the run is home, last (a stop between
# two copies leaves a run that comes home again, never one half home)
HOME_ORDER = (*TRAINING_TABLES, *EVALUATION_TABLES, TEST)
STUDY_GRID = "runs/study-grid.json"  # a narrowed study's grid record (runs/grid.json is the DVC stage's)


class CannotTrainHere(Exception):
    """A study that this machine cannot take further: `start` refuses it before launching anything."""


class Study:
    """One study: its checkout, its results folder, its params."""

    def __init__(self, results: Path):
        self.results = results
        self.record = read_record(results / "study.json", StudyRecord).model_dump(mode="json")
        self.checkout = STUDY / self.record["commit"][:7]
        self.pid_file = STUDY / f"{results.name}.pid"
        self.log = STUDY / f"{results.name}.log"
        # where `emulates_bf16`: the study's own copy of benchmarks/bf16_emulation/ and the module, made at `start`
        # (a job that runs keeps the version it began with), on its stages' PYTHONPATH
        self.emulation = STUDY / f"{results.name}.bf16_emulation"
        self.began_again: list[str] = []  # runs that began again under another fingerprint (`bring_home`)

    @property
    def params(self) -> Params:
        """The study's params (its commit's, with the overrides), read by this version (`recorded_params`)."""
        raw = yaml.safe_load((self.checkout / "params.yaml").read_text())
        return recorded_params(raw, load_params(ROOT / "params.yaml"), str(self.checkout / "params.yaml"))

    @property
    def here(self) -> bool:
        """Whether this machine has the study's clone (a fresh machine has only what results/ holds)."""
        return (self.checkout / "params.yaml").exists()

    @property
    def only(self) -> list[str] | None:
        """The variants of a narrowed study; None: every variant."""
        return self.record.get("variants")

    def run_names(self) -> list[str]:
        p = self.params
        return [f"{v}-s{s}" for s in p.seeds for v in p.variants if self.only is None or v in self.only]

    def states(self) -> dict[str, dict]:
        """Each run's epochs and state (finished: every epoch trained and the run tested; part-trained; not
        started): from the checkout where there is one, else as last collected (on a fresh machine)."""
        if not self.here:
            return dict(self.record.get("runs") or {})
        epochs, states = self.params.train.epochs, {}
        for name in self.run_names():
            files = RunFiles(self.checkout / "runs" / name)
            done = len(read_epochs(files.epochs_csv)) if files.epochs_csv.exists() else 0
            if not done and (resume := _resume_point(files)):  # put in place, not yet resumed: its table follows
                done = resume[1]
            # part-trained, not "training": whether it trains now is the job's line (status), not the run's
            if done < epochs:
                state = "part-trained" if done else "not started"
            else:
                tested = files.test_json.exists() or self._home_tested(name)  # home: on a fresh machine
                state = "finished" if tested else "trained, not tested"
            states[name] = {"epochs": done, "state": state}
        return states

    def _home_tested(self, name: str) -> bool:
        """Whether `name`'s evaluation has come home (committed, perhaps in another session): it is kept as it
        came (see `bring_home`), so the run is not evaluated again."""
        return (self.results / "runs" / name / TEST).exists()

    def runs_left(self) -> int | None:
        """How many runs are not finished; None when not known (never collected, no checkout)."""
        states = self.states()
        return sum(state["state"] != "finished" for state in states.values()) if states else None

    def trained_in(self) -> dict[str, tuple[str, int]]:
        """Each part-trained run's precision and epochs (a run never changes precision), from what it resumes
        from: its checkpoint here, else, on a fresh machine, its resume point as it came home."""
        found = {}
        for name, state in self.states().items():
            if state["state"] != "part-trained":
                continue
            point = _resume_point(RunFiles(self.checkout / "runs" / name)) if self.here else None
            path = point[0] if point else self.results / "resume" / f"{name}.pt"
            if path.exists():
                found[name] = (_precision_in(path), state["epochs"])
        return found

    @property
    def trains_bf16(self) -> bool:
        """Whether the study's runs train in bfloat16 (`train.bf16`): on any CPU, emulated where it has no
        bfloat16 arithmetic (`emulates_bf16`)."""
        if self.here:
            return self.params.train.bf16
        return bool((self.record.get("params") or {}).get("train", {}).get("bf16"))

    @property
    def emulates_bf16(self) -> bool:
        """Whether its stages emulate bfloat16 on this machine (`vggdepth.bf16_emulation`): the study trains in
        it and this CPU has no bfloat16 arithmetic, where PyTorch's own kernels are ten times slower than float32."""
        return self.trains_bf16 and not bf16_emulation.native()

    def cannot_train_here(self) -> str | None:
        """Why this machine cannot take the study further, or None. A part-trained run resumes only in the
        precision it was trained in (the trainer refuses the rest, but only after the job has prepared the data:
        minutes, and then a failed job); a study begun --after one of those would wait for it for ever. A study
        in bfloat16 trains in it on every CPU (`emulates_bf16`), so only a run trained in the precision the study
        does not train in (its params changed since, say) stops it."""
        trained = self.trained_in()
        here = BFLOAT16 if self.trains_bf16 else FLOAT32
        other = {name: point for name, point in trained.items() if point[0] != here}
        if other:
            runs = ", ".join(f"{name} ({epochs} epochs)" for name, (_, epochs) in other.items())
            kinds = " and ".join(sorted({precision for precision, _ in other.values()}))
            return (
                f"{runs} trained in {kinds}, and this study trains in {here} (train.bf16: "
                f"{str(self.trains_bf16).lower()}): a run never changes precision or device midway"
            )
        if self.emulates_bf16 and (why := self._cannot_emulate()):
            return why
        if (after := self.record.get("after")) and self.runs_left() != 0:
            first = _current(after, None)
            if (first.runs_left() or 0) > AFTER_LEFT and (why := first.cannot_train_here()):
                return f"it begins after the study of {after[:7]}, which cannot go on here: {why}"
        return None

    def _cannot_emulate(self) -> str | None:
        """Why the emulation would not reach every run's trainer, or None: on a Ray cluster the workers are
        another machine's processes, and fused runs compute with `baddbmm`, which it does not emulate."""
        # as the commit's code reads it: its own params.yaml (`params` takes this version's grid section)
        raw = yaml.safe_load((self.checkout / "params.yaml").read_text()) if self.here else self.record.get("params")
        grid = (raw or {}).get("grid") or {}
        address, fused = grid.get("address"), grid.get("runs_per_group")
        lacking = "this CPU has no bfloat16 arithmetic, and its emulation"
        if address not in (None, "local") or os.environ.get("RAY_ADDRESS"):
            where = os.environ.get("RAY_ADDRESS") or address
            return f"{lacking} cannot reach the workers of a Ray cluster ({where}): train on this machine alone"
        if fused not in (None, "auto", 1):
            return f"{lacking} does not cover fused runs (grid.runs_per_group {fused}): set it to 1"
        return None

    def _put_emulation(self) -> None:
        """The study's copy of the emulation, and proof that it reaches a trainer: a process in the stages'
        environment trains in bfloat16 (else the job would fail after preparing the data, or start new runs in
        float32)."""
        for source in (ROOT / "benchmarks" / "bf16_emulation" / "sitecustomize.py", Path(bf16_emulation.__file__)):
            _copy_if_changed(source, self.emulation / source.name)
        code = "import torch; from vggdepth.engine import training_precision as p; print(p(torch.device('cpu'), True))"
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=self.checkout, env=self.env(), capture_output=True, text=True
        )
        if done.returncode or done.stdout.strip() != BFLOAT16:
            raise CannotTrainHere(
                f"{self.results.name}: not started, bfloat16 emulation did not reach a trainer in {self.emulation} "
                f"(it trains in {done.stdout.strip() or '?'}): {done.stderr.strip()[-2000:]}"
            )

    # ---- the checkout ------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Clone the commit (once per machine), set the overrides, put every resume point in place."""
        if not self.checkout.exists():
            with atomic_dir(self.checkout) as staging:  # a clone cut short is never taken for the study's
                subprocess.run(["git", "clone", "--quiet", str(ROOT), str(staging)], check=True)
                subprocess.run(
                    ["git", "-C", str(staging), "checkout", "--quiet", "--detach", self.record["commit"]], check=True
                )
                raw = yaml.safe_load((staging / "params.yaml").read_text())
                for key, value in self.record["overrides"].items():
                    *path, last = key.split(".")
                    section = raw
                    for part in path:
                        section = section[part]
                    section[last] = value
                try:  # by this version, as `params` reads it (the commit's own code trains with it)
                    recorded_params(raw, load_params(ROOT / "params.yaml"), "the commit's params with the overrides")
                except VggdepthError as exc:
                    raise SystemExit(f"error: the study's params: {exc}") from None
                (staging / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        for point in sorted((self.results / "resume").glob("*.pt")):
            last = RunFiles(self.checkout / "runs" / point.stem).last
            epochs, fingerprint = key = _checkpoint_key(point)
            here = _key_or_none(last)  # None: no checkpoint there, or one that does not load
            if here is not None and here[1] != fingerprint:
                raise CannotTrainHere(f"{self.results.name}: not started: {_began_again(point, key, last, here)}")
            if here is None or here[0] < epochs:
                last.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(last) as tmp:
                    shutil.copyfile(point, tmp)
                print(f"resume point {point.name}: epoch {epochs}")

    def env(self) -> dict:
        """The stages' environment: this Python's `dvc` and `python`, the checkout's own library; and where
        `emulates_bf16`, the emulation, which every process that imports torch installs at once (its
        sitecustomize.py), leaving the checkout's code as it is."""
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(self.checkout / "src")}
        env.pop(bf16_emulation.ENV, None)
        if self.emulates_bf16:
            env.update({bf16_emulation.ENV: "1", "PYTHONPATH": f"{self.emulation}{os.pathsep}{env['PYTHONPATH']}"})
        return env

    # ---- the background job -------------------------------------------------------------------------------------

    def running(self) -> int | None:
        """The job's process group, while any process of it is alive."""
        try:
            pid = int(self.pid_file.read_text())
            os.killpg(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self, poll_s: float) -> None:
        if pid := self.running():
            raise SystemExit(f"the study already runs (process group {pid}); `stop` it first")
        self.prepare()
        if why := self.cannot_train_here():
            raise CannotTrainHere(f"{self.results.name}: not started, this machine cannot take it further: {why}")
        if self.emulates_bf16:
            self._put_emulation()
        self._record_session()
        command = [sys.executable, __file__, "run", "--results", str(self.results), "--poll-s", str(poll_s)]
        with open(self.log, "a") as log:
            job = subprocess.Popen(
                ["nice", "-n", "19", *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, which `stop` ends whole
            )
        self.pid_file.write_text(str(job.pid))
        _lowest_priority(job.pid)
        print(f"started in {self.checkout} (process group {job.pid}), lowest priority; log: {self.log}")

    def _record_session(self) -> None:
        """study.json's `sessions`: each start's time, CPU, how it computes bfloat16 and every run's epochs then,
        so that which epochs were trained where (and which in emulated bfloat16) can be told afterwards."""
        record = read_record(self.results / "study.json", StudyRecord).model_dump(mode="json")
        bf16 = ("emulated" if self.emulates_bf16 else "native") if self.trains_bf16 else "off"
        epochs = {name: state["epochs"] for name, state in self.states().items()}
        session = {"started_at": _now(), "cpu": _this_cpu(), "bf16": bf16, "epochs": epochs}
        record = {**record, "sessions": [*record.get("sessions", []), session]}
        write_json(self.results / "study.json", record)
        self.record = record
        if bf16 == "emulated":
            print(
                f"{self.results.name}: this CPU has no bfloat16 arithmetic: the runs train in bfloat16 emulated in "
                "float32 kernels (vggdepth.bf16_emulation)"
            )

    def stop(self, wait_s: float = 60) -> bool:
        """End every process of the job (checkpoints are written atomically: a kill loses at most the epoch in
        progress); False when it was not running."""
        pid = self.running()
        if not pid:
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.running():
            os.killpg(pid, signal.SIGKILL)
        return True

    def run(self, poll_s: float) -> None:
        """The job itself (started by `start`): the first targets, then the whole pipeline; a narrowed study: its
        runs through the grid, then their evaluate stages."""
        if self.record.get("after"):
            self._wait_for(self.record["after"], poll_s)
        for target in self.record["first"]:
            subprocess.run(["dvc", "repro", target], cwd=self.checkout, env=self.env(), check=True)
        if self.only is None:
            self._train(["dvc", "repro"], self.checkout / "runs" / "grid.json", poll_s)
        else:
            subprocess.run(["dvc", "repro", "prepare"], cwd=self.checkout, env=self.env(), check=True)
            grid = [sys.executable, "pipeline/grid.py", "--runs", "runs", "--out", STUDY_GRID]
            self._train([*grid, *(a for v in self.only for a in ("--only", v))], self.checkout / STUDY_GRID, poll_s)
            p = self.params
            stages = [f"evaluate@{v}-{seed}" for seed in p.seeds for v in p.variants if v in self.only]
            subprocess.run(["dvc", "repro", *stages], cwd=self.checkout, env=self.env(), check=True)
        self._bring_home_whole()
        print("the study is complete: `python benchmarks/cpu_study.py collect`, then commit results/", flush=True)

    def _train(self, command: list[str], grid_done: Path, poll_s: float) -> None:
        """Run `command` (whose grid writes `grid_done` when every run has trained), evaluating each run the
        moment it finishes, so that its row can come home while the others train."""
        job = subprocess.Popen(command, cwd=self.checkout, env=self.env())
        while job.poll() is None:
            time.sleep(poll_s)
            if not grid_done.exists():  # after the grid, the evaluate stages test every run themselves
                _logged(self._evaluate_finished)
            self._bring_home_whole()
            if self.began_again:  # training on would only waste the CPU: the job ends, as `stop` ends it
                print("\n".join(self.began_again), "\nthe study stops", flush=True)
                if os.getpgid(0) == os.getpid():  # the job `start` began, leading its own group: all of it
                    os.killpg(os.getpid(), signal.SIGTERM)
                job.terminate()
                raise SystemExit("the study stopped: a run began again (above)")
        if job.returncode:
            raise SystemExit(f"{' '.join(command[:2])} failed with status {job.returncode}")

    def _wait_for(self, commit: str, poll_s: float) -> None:
        """Until the study of `commit` has at most AFTER_LEFT runs left (see the module's docstring)."""
        other, said = _current(commit, None), None
        while (left := _logged(other.runs_left)) is None or left > AFTER_LEFT:
            if left != said:
                known = "not known yet" if left is None else f"{left} run(s) left"
                print(f"waiting for the study of {commit[:7]} ({known}): this one begins at {AFTER_LEFT}", flush=True)
                said = left
            time.sleep(poll_s)
        print(f"the study of {commit[:7]} has {left} run(s) left: this one begins", flush=True)

    def _bring_home_whole(self) -> None:
        """`bring_home` from the job, with `stop`'s SIGTERM held until it is done (it ends the job then): a copy
        is never cut short, leaving its temporary file in results/."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            _logged(self.bring_home)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def _evaluate_finished(self) -> None:
        epochs = self.params.train.epochs
        for name in self.run_names():
            files = RunFiles(self.checkout / "runs" / name)
            trained = files.train_json.exists() and read_record(files.train_json, TrainRecord).epochs == epochs
            if trained and not files.test_json.exists() and not self._home_tested(name):
                print(f"{name} finished: evaluating it now", flush=True)
                cmd = [sys.executable, "pipeline/evaluate.py", "--run", f"runs/{name}"]
                subprocess.run(cmd, cwd=self.checkout, env=self.env(), check=False)

    # ---- what comes home ----------------------------------------------------------------------------------------

    def collect(self) -> None:
        """What `bring_home` brings, and the report of the variants finished so far."""
        if not self.here:  # e.g. a complete study, not started on this machine
            print(f"{self.results.name}: not started on this machine, nothing to collect")
            return
        params, states = self.params, self.bring_home(report=True)
        for wrong in self.began_again:
            print(f"error: {wrong}")
        print(f"{self.results.name}:")
        for name, state in states.items():
            print(f"  {name}: {state['epochs']}/{params.train.epochs} epochs, {state['state']}")
        if (table := self.results / "report" / "table1.md").exists():
            print(table.read_text())

    def bring_home(self, report: bool = False) -> dict[str, dict]:
        """Finished runs' tables, every run's last checkpoint, the report (when `report`, or when a run has just
        come home) and, last, the record into results/; the runs' states. The job does it at every poll while
        the grid trains, so that a session cut off before its `collect` leaves the study's progress in the
        working tree, not only in the git-ignored checkout."""
        params, states = self.params, self.states()
        self.began_again = []
        for name, state in states.items():
            files = RunFiles(self.checkout / "runs" / name)
            home = self.results / "runs" / name
            # A finished run comes home once: on a fresh machine its evaluation runs again (DVC has no record of it
            # there), and bfloat16 on other threads may move a few test images; the numbers first committed stay.
            if state["state"] == "finished" and not (home / TEST).exists():
                # DVC deletes a stage's outputs before it runs it again (the train stage rewrites a finished run's
                # tables from its checkpoint): a job stopped in between leaves them missing for a while
                if missing := [t for t in HOME_ORDER if not (files.root / t).exists()]:
                    print(f"{name}: {', '.join(missing)} not there now (DVC rewrites them): it comes home later")
                else:
                    for table in HOME_ORDER:
                        _copy_if_changed(files.root / table, home / table)
                    report = True
        if states and all(s["state"] == "finished" and self._home_tested(name) for name, s in states.items()):
            # Complete and home: nothing resumes from them again, and each is megabytes of the tree that every
            # GPU lease call carries (lease_prepare.sh). Git history keeps them.
            if (resume := self.results / "resume").exists():
                shutil.rmtree(resume)
                print(f"{self.results.name}: complete, its resume points removed (git history keeps them)")
        else:
            for name in states:
                target = self.results / "resume" / f"{name}.pt"
                if wrong := _copy_resume_point(RunFiles(self.checkout / "runs" / name), target):
                    self.began_again.append(wrong)
        if report and any(state["state"] == "finished" for state in states.values()):
            build_report(params, self.results / "runs", self.results / "report", ROOT, partial=True, only=self.only)
        # Read again, not this process's copy: the job runs for hours. The params as the runs train, whatever
        # params.yaml says now. Written only when something changed.
        record = read_record(self.results / "study.json", StudyRecord).model_dump(mode="json")
        recorded = {"params": params.model_dump(mode="json"), "runs": states}
        if any(record.get(key) != value for key, value in recorded.items()):
            record.update(recorded, collected_at=_now())
            write_json(self.results / "study.json", record)
        self.record = record
        return states


def _lowest_priority(pid: int) -> None:
    """Under Linux's autogroup scheduling a new session is a group of its own, and groups share the CPU evenly
    whatever their processes' nice values: the group gets nice 19 too, so that tests really come first."""
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        autogroup.write_text("19")


def _this_cpu() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    bf16 = "with" if bf16_emulation.native() else "without"
    return f"cpu: {names[0] if names else platform.machine()}, {os.cpu_count()} cores, {bf16} bfloat16 arithmetic"


def _resume_point(files: RunFiles) -> tuple[Path, int] | None:
    """What the run resumes from, and its epochs: last.pt, else previous.pt (a stop between the two writes of a
    checkpoint, or a last.pt that does not load: the trainer falls back the same way); None when neither loads."""
    found = _resume_key(files)
    return None if found is None else found[:2]


def _resume_key(files: RunFiles) -> tuple[Path, int, str | None] | None:
    """`_resume_point`, with the fingerprint of the run that wrote it (each checkpoint loaded once)."""
    for path in (files.last, files.previous):
        try:
            return path, *_checkpoint_key(path)
        except FileNotFoundError:
            continue
        except Exception as exc:  # damaged: torch raises what its unpickler or zip reader met
            print(f"{path}: not a checkpoint that loads ({type(exc).__name__}); trying the one before", flush=True)
    return None


def _copy_resume_point(files: RunFiles, target: Path) -> str | None:
    """The run's resume point to `target`, if it has one; looked for again when the trainer renamed last.pt to
    previous.pt between the look and the copy. Never over a point of another fingerprint: a study's commit, params
    and data are fixed, so its run began again under other ones (a defect: the job stops) and what is home must
    stay; what is wrong is returned. Never over one of more epochs either: the run fell back past a damaged
    last.pt, and what a study has trained must not shrink at home (said once a run)."""
    for _ in range(3):
        if (resume := _resume_key(files)) is None:
            return None
        source, epochs, fingerprint = resume
        home = _key_or_none(target)
        if home is not None and home[1] != fingerprint:
            return _began_again(target, home, source, (epochs, fingerprint))
        if home is not None and epochs < home[0]:
            if target not in _KEPT:
                _KEPT.add(target)
                print(f"{target}: kept ({home[0]} epochs): the run in {files.root} has fallen back to {epochs}")
            return None
        try:
            _copy_if_changed(source, target)
            return None
        except FileNotFoundError:
            continue
    return None


_KEPT: set[Path] = set()  # resume points kept over a run's fewer epochs, said once each


def _checkpoint_key(checkpoint: Path) -> tuple[int, str | None]:
    """A checkpoint's epochs and the fingerprint of the run that wrote it (engine.run_fingerprint)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return int(state["epoch"]), state.get("fingerprint")


def _key_or_none(checkpoint: Path) -> tuple[int, str | None] | None:
    """`_checkpoint_key`; None when the checkpoint is missing or does not load (replacing it loses nothing)."""
    try:
        return _checkpoint_key(checkpoint)
    except Exception:  # missing, or damaged: torch raises what its unpickler or zip reader met
        return None


def _began_again(home: Path, home_key: tuple[int, str | None], here: Path, key: tuple[int, str | None]) -> str:
    """What it means that the checkout's checkpoint `here` (epochs, fingerprint: `key`) is not of the run of its
    resume point `home` (`home_key`), and what to do."""
    run = here.parent.parent
    return (
        f"{run.name} in {run} is another run than its resume point {home}: fingerprint {key[1]} ({key[0]} epochs) "
        f"against {home_key[1]} ({home_key[0]} epochs). It began again under other params, data or training code (its "
        f"checkpoints set aside in {run / 'checkpoints' / 'superseded'}), which a study at a fixed commit must "
        f"not: find out why (its log), then remove {run} to resume from the point home, which is kept"
    )


def _logged(step: Callable[[], T]) -> T | None:
    """`step()` in the job: a failure (a disk full, a params.yaml mid-edit) is the log's to tell, and the runs
    train on; None then."""
    try:
        return step()
    except Exception as exc:
        with contextlib.suppress(OSError):  # the log may be on the full disk
            print(f"{step.__name__}: {type(exc).__name__}: {exc}", flush=True)
        return None


def _precision_in(checkpoint: Path) -> str:
    """What the run was trained in, as the trainer reads it (vggdepth.checkpoints: float32 where not recorded)."""
    return str(torch.load(checkpoint, map_location="cpu", weights_only=True).get("precision", FLOAT32))


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.exists() and md5sum(target) == md5sum(source):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _commit(rev: str) -> str:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True
    )
    if found.returncode:
        raise SystemExit(f"error: {rev} is not a commit of {ROOT}")
    return found.stdout.strip()


def _current(commit: str, begin: dict | None) -> Study:
    """The study of `commit`; begun with `begin`'s settings when there is none yet (else `begin` must agree)."""
    full = _commit(commit)
    existing = [p for p in RESULTS.glob(f"*-cpu-{full[:7]}") if (p / "study.json").exists()]
    if existing:
        study = Study(existing[0])
        for key in ("variants", "after"):
            if begin and begin[key] is not None and begin[key] != study.record.get(key):
                raise SystemExit(
                    f"error: the study of {full[:7]} was begun with {key} {study.record.get(key)}, not {begin[key]}: "
                    "a study's runs are fixed when it begins"
                )
        return study
    if begin is None:
        raise SystemExit(f"error: no CPU study of {full[:7]} under results/; `start --commit {full[:7]}` begins it")
    archive = begin["archive"].resolve()
    if not archive.is_file():
        raise SystemExit(f"error: no archive at {archive}; pass --archive PATH")
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{full}:params.yaml"], capture_output=True, text=True)
    known = list((yaml.safe_load(shown.stdout) or {}).get("variants") or {}) if not shown.returncode else []
    unknown = [v for v in begin["variants"] or () if v not in known]
    if unknown:
        raise SystemExit(
            f"error: --variants: {', '.join(unknown)} not in {full[:7]}'s params.yaml "
            f"(its variants: {', '.join(known) or 'none'})"
        )
    if begin["after"] is not None:
        _current(begin["after"], None)  # that study must exist
    overrides = {"data.url": str(archive), "data.md5": md5sum(archive), **OVERRIDES}
    results = RESULTS / f"{datetime.date.today():%Y-%m-%d}-cpu-{full[:7]}"
    results.mkdir(parents=True, exist_ok=True)
    narrowed = begin["variants"] is not None
    record = {
        "commit": full,
        "overrides": overrides,
        "first": [t for t in begin["first"] if t] if begin["first"] is not None else [] if narrowed else [FIRST],
        "command": (
            "pipeline/grid.py --only each of the variants, then dvc repro of their evaluate stages"
            if narrowed
            else "dvc repro"
        )
        + " (in a clone of the commit, params.yaml with the overrides), nice -n 19",
        "device": _this_cpu(),
        "torch": torch.__version__,
        "started_at": _now(),
        **({"variants": begin["variants"]} if narrowed else {}),
        **({"after": begin["after"]} if begin["after"] is not None else {}),
    }
    write_json(results / "study.json", record)
    return Study(results)


def _every_study() -> list[Study]:
    """Every study under results/, oldest first."""
    studies = [Study(p.parent) for p in RESULTS.glob("*-cpu-*/study.json")]
    if not studies:
        raise SystemExit("error: no CPU study under results/ yet: `start --commit REV` begins one")
    return sorted(studies, key=lambda s: (s.record.get("started_at", ""), "after" in s.record, s.results.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "status", "collect", "stop", "run"))
    parser.add_argument("--commit", help="the study of this commit (start: begun when new); default: every study")
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="a new study's CIFAR-100 archive")
    parser.add_argument("--first", action="append", help=f"a new study's targets before the rest ({FIRST}; '' none)")
    parser.add_argument("--variants", action="append", help="a new study narrowed to these rows (repeat)")
    parser.add_argument("--after", help="a new study begins when this commit's study has at most one run left")
    parser.add_argument("--poll-s", type=float, default=60, help="how often the job looks for finished runs")
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)  # `run`: the study `start` chose
    args = parser.parse_args()
    if args.command != "start" and (args.variants or args.after or args.first):
        parser.error("--variants, --after and --first begin a study: they go with `start --commit REV`")
    if not args.commit and (args.variants or args.after or args.first):
        parser.error("--variants, --after and --first begin a study: name its commit (--commit REV)")
    if args.results:
        studies = [Study(args.results)]
    elif args.commit:
        after = _commit(args.after) if args.after else None
        begin = {"archive": args.archive, "first": args.first, "variants": args.variants, "after": after}
        studies = [_current(args.commit, begin if args.command == "start" else None)]
    else:
        studies = _every_study()
    refused = []
    for study in studies:
        if args.command == "start":
            if not args.commit and study.runs_left() == 0:
                print(f"{study.results.name}: complete, nothing to train")
            elif not args.commit and (pid := study.running()):
                print(f"{study.results.name}: already running (process group {pid})")
            else:
                try:
                    study.start(args.poll_s)
                except CannotTrainHere as exc:  # the others may still start
                    print(f"error: {exc}", file=sys.stderr)
                    refused.append(study.results.name)
        elif args.command == "run":
            study.run(args.poll_s)
        elif args.command == "collect":
            study.collect()
        elif args.command == "stop":
            print(f"{study.results.name}: {'stopped' if study.stop() else 'not running'}")
        else:
            pid = study.running()
            print(f"{study.results.name}: {'running, process group ' + str(pid) if pid else 'not running'}")
            for name, state in study.states().items():
                print(f"  {name}: {state['epochs']} epochs, {state['state']}")
            left = study.runs_left()
            if left and (why := study.cannot_train_here()):
                print(f"  cannot go on on this machine: {why}")
            elif left and study.emulates_bf16:
                print("  on this CPU (no bfloat16 arithmetic) it trains in bfloat16 emulated in float32 kernels")
    if refused:
        raise SystemExit(f"not started: {', '.join(refused)}")


if __name__ == "__main__":
    main()
