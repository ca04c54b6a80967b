"""The training engine: schedules, repeatability, resume to the identical result, NaN guard, gradient table."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import pytest
import torch

import vggdepth.engine as engine
from tests.conftest import KillAfter
from vggdepth.checkpoints import load_checkpoint
from vggdepth.engine import NonFiniteLossError, Trainer, make_scheduler
from vggdepth.grid import workers
from vggdepth.grid.driver import GridResult
from vggdepth.runs import Callback, RunFiles


def _closed_form_lr(epoch: int, lr: float, lr_min: float, period: int, restarts: bool) -> float:
    t = epoch % period if restarts else epoch
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / period)) / 2


@pytest.mark.parametrize(
    "variant", ["VGG-08", "VGG-38", "BN-VGG-38", "HIGHLR-BN-38", "WR50-HIGHLR-BN-38", "MBS50-BN-38"]
)
def test_learning_rate_follows_the_closed_form(params, variant):
    v = params.variant(variant)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=v.lr)
    scheduler = make_scheduler(optimizer, v, params.train.lr_min)
    seen = {}
    for epoch in range(100):
        seen[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()

    for epoch in (0, 25, 49, 50, 75, 99):
        expected = _closed_form_lr(epoch, v.lr, 2e-5, v.period, v.schedule == "warm_restarts")
        assert seen[epoch] == pytest.approx(expected, rel=1e-9), f"epoch {epoch}"
    if v.schedule == "warm_restarts":
        assert seen[50] == pytest.approx(v.lr)  # the restart
        assert seen[49] < 1e-4
    else:
        assert seen[50] == pytest.approx((v.lr + 2e-5) / 2)


def _train(data, params, quick_train, tmp: Path, variant="VGG-08", seed=0, callbacks=(), **train_changes):
    trainer = Trainer(
        model=params.model,
        train=quick_train(**train_changes),
        runtime=params.runtime.model_copy(update={"device": "cpu", "progress_every": 1}),
        variant_name=variant,
        variant=params.variant(variant),
        seed=seed,
        data=data,
        files=RunFiles(tmp),
        callbacks=callbacks,
    )
    return trainer.fit(), trainer


def _table(path: Path, drop: tuple[str, ...] = ("seconds",)) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def test_same_seed_on_cpu_gives_identical_metrics(tiny_data, params, quick_train, tmp_path):
    _train(tiny_data, params, quick_train, tmp_path / "a", epochs=2)
    _train(tiny_data, params, quick_train, tmp_path / "b", epochs=2)
    _train(tiny_data, params, quick_train, tmp_path / "c", seed=1, epochs=2)

    assert _table(tmp_path / "a" / "epochs.csv") == _table(tmp_path / "b" / "epochs.csv")
    assert _table(tmp_path / "a" / "gradients.csv") == _table(tmp_path / "b" / "gradients.csv")
    assert _table(tmp_path / "a" / "epochs.csv") != _table(tmp_path / "c" / "epochs.csv")


def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny_data, params, quick_train, tmp_path):
    straight, straight_trainer = _train(tiny_data, params, quick_train, tmp_path / "straight", epochs=4)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_data, params, quick_train, tmp_path / "resumed", epochs=4, callbacks=[KillAfter(2)])
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 2

    resumed, resumed_trainer = _train(tiny_data, params, quick_train, tmp_path / "resumed", epochs=4)

    assert resumed_trainer.run.start_epoch == 2
    assert _table(tmp_path / "straight" / "epochs.csv") == _table(tmp_path / "resumed" / "epochs.csv")
    assert _table(tmp_path / "straight" / "gradients.csv") == _table(tmp_path / "resumed" / "gradients.csv")
    drop = ("seconds", "images_per_second")
    assert {k: v for k, v in straight.items() if k not in drop} == {k: v for k, v in resumed.items() if k not in drop}
    for (name, a), b in zip(
        straight_trainer.net.state_dict().items(), resumed_trainer.net.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_of_other_settings_is_not_resumed(tiny_data, params, quick_train, tmp_path):
    _train(tiny_data, params, quick_train, tmp_path, epochs=1)
    _, trainer = _train(tiny_data, params, quick_train, tmp_path, epochs=1, weight_decay=1e-4)
    assert trainer.run.start_epoch == 0
    _, longer = _train(tiny_data, params, quick_train, tmp_path, epochs=2, weight_decay=1e-4)
    assert longer.run.start_epoch == 1  # more epochs of the same run: it continues


def test_a_callback_that_fails_to_start_stops_the_run_and_those_started_hear_why(
    tiny_data, params, quick_train, tmp_path
):
    """As an MLflow callback whose store refuses the run: the callbacks already started (another tracker, the grid's
    recorder) learn the run stopped, rather than being left open; the ones never started are not told."""

    class Heard(Callback):
        def __init__(self, fails: bool = False):
            self.fails, self.events = fails, []

        def on_run_start(self, run) -> None:
            if self.fails:
                raise OSError("the tracking store refused the run")
            self.events.append("start")

        def on_epoch_end(self, run, record, gradients) -> None:
            self.events.append("epoch")

        def on_run_error(self, run, error) -> None:
            self.events.append(f"error: {error}")

    first, failing, never = Heard(), Heard(fails=True), Heard()
    with pytest.raises(OSError, match="the tracking store refused the run"):
        _train(tiny_data, params, quick_train, tmp_path, callbacks=[first, failing, never], epochs=1)
    assert first.events == ["start", "error: the tracking store refused the run"]
    assert failing.events == [] and never.events == []
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # stopped before it trained


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(
    tiny_data, params, quick_train, tmp_path, monkeypatch
):
    real = engine.F.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, **kwargs):
        loss = real(logits, target, **kwargs)
        if not torch.is_inference_mode_enabled():  # a training step (validation runs in inference mode)
            calls["train"] += 1
            if calls["train"] == 6:  # 200 images at batch 100 make 2 steps an epoch: epoch 2, step 1
                return loss * float("nan")
        return loss

    monkeypatch.setattr(engine.F, "cross_entropy", poisoned)
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(NonFiniteLossError) as err:
        _train(tiny_data, params, quick_train, tmp_path, epochs=4)
    assert "NaN or infinite at epoch 2, step 1" in str(err.value)
    assert f"the last good checkpoint {last} (end of epoch 1) is kept" in str(err.value)
    # it names every setting that can cause it, with its value, the prepared data's statistics included
    for setting in ("variants.VGG-08.lr 0.001", "variants.VGG-08.batch_size", "train.weight_decay 0", "train.betas"):
        assert setting in str(err.value)
    assert f"mean {[round(m, 4) for m in tiny_data.mean]}" in str(err.value)
    state = load_checkpoint(last)
    assert state["epoch"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # the grid hears what happened in a few words beside the whole line (the sweep's reason is the few words)
    again = pickle.loads(pickle.dumps(err.value))  # noqa: S301 (our own bytes: as a process would send the error)
    assert (str(again), again.what) == (str(err.value), err.value.what)
    told = pickle.loads(pickle.dumps(workers.told(err.value)))  # noqa: S301 (as a worker process sends its outcome)
    assert told == workers.Diverged("the training loss became NaN or infinite at epoch 2, step 1", str(err.value))
    books = GridResult()
    assert books.take("VGG-08-s0", told) == f"grid: VGG-08-s0 FAILED: {err.value}"
    assert books.diverged == {"VGG-08-s0": told.what} and books.failed == {"VGG-08-s0": str(err.value)}


def test_nan_validation_loss_stops_the_run_and_says_so_in_a_few_words(
    tiny_data, params, quick_train, tmp_path, monkeypatch
):
    real = engine.F.cross_entropy

    def poisoned(logits, target, **kwargs):
        loss = real(logits, target, **kwargs)
        return loss * float("nan") if torch.is_inference_mode_enabled() else loss  # validation only

    monkeypatch.setattr(engine.F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        _train(tiny_data, params, quick_train, tmp_path, epochs=2)
    assert err.value.what == "the validation loss is nan after epoch 0"
    assert str(err.value).startswith(f"VGG-08 seed 0: {err.value.what}. ") and "variants.VGG-08.lr" in str(err.value)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing of the diverged epoch is kept


@pytest.mark.parametrize(("variant", "tensors"), [("VGG-08", 9), ("VGG-38", 39), ("BN-VGG-38", 75)])
def test_gradient_table_has_every_weight_tensor_and_finite_values(
    tiny_data, params, quick_train, tmp_path, variant, tensors
):
    _train(tiny_data, params, quick_train, tmp_path, variant=variant, epochs=2)
    rows = _table(tmp_path / "gradients.csv", drop=())

    assert len(rows) == 2 * tensors
    assert [int(r["epoch"]) for r in rows] == [0] * tensors + [1] * tensors
    assert len({r["layer"] for r in rows}) == tensors
    for r in rows:
        for column in ("mean_abs", "last_mean_abs", "grad_l2", "weight_l2"):
            assert math.isfinite(float(r[column])), (r["layer"], column)
    assert not any(r["layer"].endswith("bias") for r in rows)
