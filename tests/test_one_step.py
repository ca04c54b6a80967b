"""One training step and one evaluation loop, whichever way a run trains: a run alone (`train_run`: the train
stage), several runs fused (`train_fused`), a group of the grid (`grid.train_group`: what every grid worker runs, on
Ray or in plain processes, and so the GPU lease's study), the grid's throughput probe and the lease's throughput
rows all reach `engine.train_step`; validation, fused validation and the test set's predictions all reach
`engine.predict`. Each is checked by patching that one function and counting who calls it."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tests.helpers import benchmark_script
from vggdepth import engine
from vggdepth.engine import train_run
from vggdepth.evaluation import evaluate_run
from vggdepth.fused import train_fused
from vggdepth.grid import Packing, PlannedRun, probe_throughput, train_group
from vggdepth.runs import RunFiles
from vggdepth.throughput import synthetic_data


def _params(params, epochs: int = 2):
    return params.model_copy(
        update={
            "train": params.train.model_copy(update={"epochs": epochs}),
            "runtime": params.runtime.model_copy(update={"device": "cpu", "threads": 1}),
        }
    )


@pytest.fixture
def steps(monkeypatch):
    """Every call of engine.train_step: (runs in the network, images in the batch, input channels)."""
    calls = []
    real = engine.train_step

    def traced(net, optimizer, recorder, x, y, tally, autocast):
        calls.append((tally.runs, len(x), x.shape[1]))
        return real(net, optimizer, recorder, x, y, tally, autocast)

    monkeypatch.setattr(engine, "train_step", traced)
    return calls


@pytest.fixture
def predictions(monkeypatch):
    """Every batch engine.predict yields: (runs, images)."""
    calls = []
    real = engine.predict

    def traced(net, data, batch_size, autocast, runs=1):
        for logits, y in real(net, data, batch_size, autocast, runs):
            calls.append((runs, len(y)))
            yield logits, y

    monkeypatch.setattr(engine, "predict", traced)
    return calls


def test_a_run_alone_trains_and_validates_through_the_one_step_and_loop(
    params, tiny_data, tmp_path, steps, predictions
):
    train_run(_params(params), "VGG-08", 0, tiny_data, tmp_path / "run")
    # 200 training images at batch 100, 2 epochs; 100 validation images per epoch at the evaluation batch size
    assert steps == [(1, 100, 3)] * 4
    assert {runs for runs, _ in predictions} == {1} and sum(n for _, n in predictions) == 2 * len(tiny_data.val)


def test_fused_runs_train_and_validate_through_the_same_step_and_loop(params, tiny_data, tmp_path, steps, predictions):
    group = train_fused(_params(params), [("VGG-08", 0), ("VGG-08", 1)], tiny_data, tmp_path)
    assert all(isinstance(outcome, dict) for outcome in group.outcome)
    assert steps == [(2, 100, 6)] * 4  # one step for both runs: their images side by side in the channels
    assert {runs for runs, _ in predictions} == {2} and sum(n for _, n in predictions) == 2 * len(tiny_data.val)


def test_the_test_set_is_predicted_through_the_same_loop(params, tiny_data, labels, tmp_path, predictions):
    p = _params(params, epochs=1)
    files = RunFiles(tmp_path / "run")
    train_run(p, "VGG-08", 0, tiny_data, files.root)
    predictions.clear()
    evaluate_run(files, tiny_data, labels, p.train, p.runtime, p.evaluate)
    assert sum(n for _, n in predictions) == 2 * len(tiny_data.test)  # the best and the final checkpoint


def test_the_grids_groups_train_through_the_same_step(params, tiny_data, steps):
    """`grid.train_group` is what every grid worker runs (a Ray actor, or a process without Ray: the GPU lease's
    study too): a group of two runs of one shape trains fused, a group of one alone, both through the one step."""
    relayed = []

    def recorder(method, name, changed, *args):  # the grid's recorder, as a worker reaches it
        relayed.append((method, name))
        return {} if method == "run_start" else None

    p = _params(params)
    fused = train_group(p, [("VGG-08", 0), ("VGG-08", 1)], tiny_data, {}, Packing("cpu", 1, 1, 0, 1, 2), recorder, "t")
    assert [name for name, outcome in fused if isinstance(outcome, dict)] == ["VGG-08-s0", "VGG-08-s1"]
    assert steps == [(2, 100, 6)] * 4
    steps.clear()
    alone = train_group(p, [("VGG-38", 0)], tiny_data, {}, Packing("cpu", 1, 1, 0, 1), recorder, "t")
    assert isinstance(alone[0][1], dict) and steps == [(1, 100, 3)] * 4
    assert [m for m, n in relayed if n == "VGG-08-s1"] == ["run_start", "epoch_end", "epoch_end", "run_end"]


def test_the_grid_probe_times_the_real_trainers_step(params, steps):
    p = _params(params)
    planned = [PlannedRun("VGG-08", 0, RunFiles.of(ROOT / "unused", "VGG-08", 0), 0, 2)]
    speeds = probe_throughput(p, planned, "cpu", threads=1, copies=1, steps=2)
    assert next(iter(speeds.values()))[1] > 0
    assert steps == [(1, 100, 3)] * 4  # a warm-up epoch and a timed one, 2 batches each


def test_the_lease_times_through_the_same_step(params, steps):
    """The lease's throughput rows (its study trains with `train_fused` and `train_run`, above)."""
    lease = benchmark_script("gpu_lease")
    p = _params(params)
    data = synthetic_data(p, "VGG-08", 2)
    assert lease.fused_speed(p, "VGG-08", data, 2, 3).speed > 0  # a row of the fast path, 3 runs fused
    assert steps == [(3, 100, 9)] * 4
