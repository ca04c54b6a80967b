"""The grid's plan: how it hands runs out (longest first), which packings it compares, and `python -m vggdepth
plan` on real data: it probes each packing worth trying on this machine, names the fastest, and changes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.helpers import project_env
from vggdepth.grid import GridError, makespan, plan_runs, probe_throughput, thread_choices


def test_makespan_hands_the_longest_runs_out_first():
    assert makespan([1, 1, 2], 2) == 2  # 2 | 1+1; in the given order 1+2 | 1 would take 3
    assert makespan([2, 2, 2, 3, 3], 2) == 7  # 3+2+2 | 3+2: each run to the worker free first
    assert makespan([5.0], 4) == 5.0  # one run cannot use a second worker
    assert makespan([1, 1, 1, 1], 4) == 1
    assert makespan([4, 1, 1, 1, 1], 2) == 4  # the long run alone on one worker, the four short on the other


def test_thread_choices_are_powers_of_two_and_the_share_of_every_core():
    assert thread_choices(2, 2, 6) == [1, 2]
    assert thread_choices(16, 16, 18) == [1, 2, 4, 8, 16]
    # 16 cores over 3 runs: 5 threads each (1, 2 and 4 would also train 3 at once, leaving cores idle); no node has
    # more than 8, which trains 2 at once
    assert thread_choices(16, 8, 3) == [5, 8]
    assert thread_choices(2, 2, 1) == [2]  # one run: all cores
    assert thread_choices(6, 6, 6) == [1, 2, 6]  # 4 threads would train 1 run at once, as 6 do
    assert thread_choices(1, 1, 4) == [1]


@pytest.fixture(scope="module")
def project(archive_path, archive_md5, params, tmp_path_factory) -> Path:
    """Two cheap networks of two shapes (VGG-08 at batch 100 and 50), one seed, 3 epochs, 2/1/1 real images per
    class."""
    from tests.conftest import prepare_subset

    root = tmp_path_factory.mktemp("plan")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(url=str(archive_path), md5=archive_md5)
    raw["runtime"].update(device="cpu")
    raw["train"]["epochs"] = 3  # estimates of seconds
    small = dict(raw["variants"]["VGG-08"])
    raw["variants"] = {"VGG-08": small, "VGG-08-MBS": {**small, "batch_size": 50}}
    raw["seeds"] = [0]
    raw["report"].update(final_variant="VGG-08", figures={})
    raw["report"]["reference"]["curves"] = {}
    raw["report"]["guard"].update(vanishing="VGG-08-MBS", learning=["VGG-08"])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    prepare_subset(archive_path, root / "data" / "prepared", params, train=2, val=1, test=1)
    return root


def plan(root: Path, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "vggdepth", "plan", *args],
        cwd=root,
        env=project_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


PROBE = re.compile(
    r"  probe, (\d+) thread\(s\) per run x (\d+) run\(s\) at once, img/s per run: VGG-08 (\d+), VGG-08-MBS (\d+)"
    r"(?:; all runs in about (\d+) s)?"
)


def test_plan_probes_each_packing_worth_trying_and_picks_the_fastest(project):
    cores = len(os.sched_getaffinity(0))
    lines = plan(project)
    probes = [(line, PROBE.match(line)) for line in lines if line.startswith("  probe")]
    assert all(match for _, match in probes), probes
    assert [int(m[1]) for _, m in probes] == thread_choices(cores, cores, 2)
    for _, match in probes:  # as many runs at once as the packing would train: the cores over its threads
        assert int(match[2]) == min(2, cores // int(match[1]))
        assert int(match[3]) > 0 and int(match[4]) > 0
    fastest = [match for line, match in probes if line.endswith("<- fastest")]
    assert len(fastest) == (1 if len(probes) > 1 else 0)
    if fastest:  # the fastest is the shortest prediction, and the plan's estimate
        assert int(fastest[0][5]) == min(int(match[5]) for _, match in probes)
        assert re.fullmatch(rf"  estimated wall time: about {fastest[0][5]} s \(the probe took \d+ s\)", lines[-1])
    threads = int(fastest[0][1]) if fastest else int(probes[0][1][1])
    assert lines[0].startswith("grid: 2 of 2 runs to train on this machine (Ray on 127.0.0.1): ")
    assert f"{threads} torch thread(s)" in lines[0]
    epochs = yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"]
    runs = ("VGG-08-s0", "VGG-08-MBS-s0")
    assert [line.split() for line in lines[1:3]] == [[run, str(epochs), "epochs"] for run in runs]
    assert lines[-1].startswith("  estimated wall time: about ")  # the two runs take seconds: shown in seconds
    assert not (project / "runs").exists()  # a plan changes nothing


def test_plan_with_fixed_threads_probes_that_packing_only(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["grid"]["threads_per_run"] = 1
    fixed = project.parent / "fixed"
    fixed.mkdir(exist_ok=True)
    (fixed / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    data = str(project / "data" / "prepared")
    lines = plan(fixed, "--data", data)
    probes = [line for line in lines if line.startswith("  probe")]
    assert len(probes) == 1 and not probes[0].endswith("<- fastest")
    match = PROBE.match(probes[0])
    assert match and match[1] == "1" and int(match[2]) == min(2, len(os.sched_getaffinity(0)))
    assert not any(line.startswith("  probe") for line in plan(fixed, "--data", data, "--no-probe"))


def test_a_failed_probe_process_is_named(project, params, monkeypatch):
    from vggdepth.data import load_prepared

    data = load_prepared(project / "data" / "prepared")
    planned = plan_runs(params, project / "runs", data.stats, arrange=False)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the probe's processes start and exit 1 at once
    with pytest.raises(GridError, match=r"the throughput probe \(1 thread\(s\), 2 at once\) failed: exit status 1"):
        probe_throughput(params, planned, "cpu", 1, copies=2)


def test_the_probe_times_a_variant_whose_loss_diverges(params):
    """The probe times the real trainer's step on random pixels; a learning rate that makes the loss NaN at once
    (a variant that will fail when trained) is timed like any other, not stopped by the NaN guard: the plan of the
    other runs goes on, and the variant fails in training, where its failure is said."""
    from vggdepth.grid import PlannedRun
    from vggdepth.runs import RunFiles

    diverging = params.variants["VGG-08"].model_copy(update={"lr": 1.0e30})
    p = params.model_copy(
        update={
            "variants": {**params.variants, "NAN": diverging},
            "runtime": params.runtime.model_copy(update={"device": "cpu"}),
        }
    )
    planned = [PlannedRun("NAN", 0, RunFiles.of(Path("unused"), "NAN", 0), 0, 2)]
    ((name, speed),) = probe_throughput(p, planned, "cpu", 1, copies=1, steps=3).values()
    assert name == "NAN" and speed > 0
