"""Checkpoints never cost a run: a finished run re-run restores its outputs, a damaged checkpoint falls back to
the previous one or says what to do, a shorter `train.epochs` keeps the longer run, a tampered file runs nothing."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from vggdepth.checkpoints import CheckpointError, load_checkpoint
from vggdepth.engine import train_run
from vggdepth.errors import TrainingError
from vggdepth.runs import RunFiles

VARIANT = "VGG-08"


@pytest.fixture
def run_params(params):
    """Two epochs on the CPU, no tracking."""
    return params.model_copy(
        update={
            "train": params.train.model_copy(update={"epochs": 2}),
            "runtime": params.runtime.model_copy(update={"device": "cpu", "progress_every": 1}),
        }
    )


def _with_epochs(params, epochs: int):
    return params.model_copy(update={"train": params.train.model_copy(update={"epochs": epochs})})


def _bytes(files: RunFiles) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in files.outputs}


def _timeless(path: Path) -> list[str]:
    """A table without its timing column (the one thing a re-trained epoch changes)."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = rows[0].index("seconds") if "seconds" in rows[0] else None
    return [",".join(v for i, v in enumerate(r) if i != drop) for r in rows]


def test_rerun_of_a_finished_run_restores_identical_outputs(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    first, checkpoint = _bytes(files), files.last.read_bytes()
    for path in files.outputs:  # what DVC does before re-running a stage
        path.unlink()

    trainer = train_run(run_params, VARIANT, 0, tiny_data, files.root)

    assert trainer.run.start_epoch == 2
    assert _bytes(files) == first
    assert files.last.read_bytes() == checkpoint  # nothing trained, nothing rewritten


def test_rerun_with_other_runtime_settings_trains_nothing(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    first = _bytes(files)
    other = run_params.model_copy(
        update={"runtime": run_params.runtime.model_copy(update={"threads": 1, "eval_batch_size": 7})}
    )

    trainer = train_run(other, VARIANT, 0, tiny_data, files.root)

    assert trainer.run.start_epoch == 2
    assert _bytes(files) == first


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(run_params, tiny_data, tmp_path, caplog):
    straight = RunFiles(tmp_path / "straight")
    train_run(_with_epochs(run_params, 3), VARIANT, 0, tiny_data, straight.root)
    files = RunFiles(tmp_path / "damaged")
    train_run(_with_epochs(run_params, 3), VARIANT, 0, tiny_data, files.root)
    assert load_checkpoint(files.previous)["epoch"] == 2
    files.last.write_bytes(files.last.read_bytes()[:5000])  # a truncated copy

    trainer = train_run(_with_epochs(run_params, 3), VARIANT, 0, tiny_data, files.root)

    assert trainer.run.start_epoch == 2  # one epoch re-trained, not the run
    assert "is damaged or truncated" in caplog.text and f"resuming from {files.previous}" in caplog.text
    assert _timeless(files.epochs_csv) == _timeless(straight.epochs_csv)
    assert files.gradients_csv.read_text() == straight.gradients_csv.read_text()
    for name, value in load_checkpoint(straight.last)["model"].items():
        assert torch.equal(value, load_checkpoint(files.last)["model"][name]), name


def test_damaged_checkpoint_without_an_earlier_one_says_how_to_start_over(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(_with_epochs(run_params, 1), VARIANT, 0, tiny_data, files.root)
    files.last.write_bytes(b"not a checkpoint at all")

    with pytest.raises(CheckpointError) as error:
        train_run(_with_epochs(run_params, 1), VARIANT, 0, tiny_data, files.root)

    assert f"checkpoint {files.last} is damaged or truncated" in str(error.value)
    assert f"rm -r {files.checkpoints}" in str(error.value)
    assert files.last.read_bytes() == b"not a checkpoint at all"  # evidence kept, nothing deleted


def test_damaged_best_checkpoint_is_rebuilt_from_the_last_one(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    best = load_checkpoint(files.best)
    files.best.write_bytes(b"\x00" * 100)

    train_run(run_params, VARIANT, 0, tiny_data, files.root)

    rebuilt = load_checkpoint(files.best)
    assert rebuilt["epoch"] == best["epoch"]
    for name, value in best["model"].items():
        assert torch.equal(value, rebuilt["model"][name]), name


def test_fewer_epochs_than_a_finished_run_keep_it(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(_with_epochs(run_params, 3), VARIANT, 0, tiny_data, files.root)
    kept = {p.name: p.read_bytes() for p in files.checkpoints.iterdir()}

    with pytest.raises(TrainingError, match=r"trained for 3 epochs, more than train.epochs=2. It is kept"):
        train_run(run_params, VARIANT, 0, tiny_data, files.root)

    assert {p.name: p.read_bytes() for p in files.checkpoints.iterdir()} == kept


class _Planted:
    """A pickle that would create a file when unpickled with plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_tampered_checkpoint_is_refused_and_runs_nothing(run_params, tiny_data, tmp_path, name):
    files = RunFiles(tmp_path / "run")
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    marker = tmp_path / "pwned"
    state = load_checkpoint(files.checkpoints / name)
    state["extra"] = {"payload": _Planted(marker)}
    torch.save(state, files.checkpoints / name)  # torch.save pickles: the object rides inside the zip

    with pytest.raises(CheckpointError, match="nothing in it ran"):
        load_checkpoint(files.checkpoints / name)
    with pytest.raises(CheckpointError, match="nothing in it ran"):
        train_run(run_params, VARIANT, 0, tiny_data, files.root)

    assert not marker.exists()
    pickle.loads(pickle.dumps(_Planted(marker)))  # noqa: S301 (the payload is real: plain unpickling runs it)
    assert marker.exists()


def test_leftovers_of_a_killed_checkpoint_write_are_removed(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    leftovers = [  # as atomic_path names them: `.<name>.vggdepth-tmp-<8 random>.part`
        files.checkpoints / ".last.pt.vggdepth-tmp-x1y2z3w4.part",
        files.root / ".epochs.csv.vggdepth-tmp-a1b2c3d4.part",
    ]
    for path in leftovers:
        path.write_bytes(b"half")

    train_run(run_params, VARIANT, 0, tiny_data, files.root)

    assert not any(path.exists() for path in leftovers)


def test_other_training_code_trains_the_run_afresh(run_params, tiny_data, tmp_path, monkeypatch):
    import vggdepth.engine as engine

    files = RunFiles(tmp_path / "run")
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    monkeypatch.setattr(engine, "_code_digest", lambda: "other code")

    trainer = train_run(run_params, VARIANT, 0, tiny_data, files.root)

    assert trainer.run.start_epoch == 0  # not a restore of results the old code computed


def test_checkpoint_without_resume_state_counts_as_damaged(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(_with_epochs(run_params, 3), VARIANT, 0, tiny_data, files.root)
    files.last.write_bytes(files.best.read_bytes())  # weights only: no optimiser, no random states

    trainer = train_run(_with_epochs(run_params, 3), VARIANT, 0, tiny_data, files.root)

    assert trainer.run.start_epoch == 2  # fell back to previous.pt


def test_checkpoints_of_other_settings_are_kept_and_come_back_with_them(run_params, tiny_data, tmp_path):
    files = RunFiles(tmp_path / "run")
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    first = _bytes(files)
    other = run_params.model_copy(update={"train": run_params.train.model_copy(update={"weight_decay": 1e-4})})

    assert train_run(other, VARIANT, 0, tiny_data, files.root).run.start_epoch == 0  # other settings: trained
    assert len(list((files.checkpoints / "superseded").iterdir())) == 1  # the first run, set aside
    back = train_run(run_params, VARIANT, 0, tiny_data, files.root)

    assert back.run.start_epoch == 2  # the first settings again: restored, not retrained
    assert _bytes(files) == first
