"""Fused training (several runs as one grouped network) against the same runs trained alone, on the real data.

The tolerance: Adam divides each update by sqrt(v) + 1e-8, so a weight whose gradient is near 1e-8 moves by up to
its learning rate for a rounding-level change of that gradient. Grouped and plain convolutions sum in other orders,
so single weights drift apart by a few learning rates within steps, while losses agree to ~1e-6 relative and each
run's whole weight vector to ~1e-2 relative. In float64 the drift starts ~1e9 times smaller, and one step agrees to
1e-9: that checks every piece (grouped layers, stacked batch norm, per-run head, per-run learning rate, moments)
strictly.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vggdepth.fused as fused
from vggdepth.checkpoints import load_checkpoint
from vggdepth.engine import NonFiniteLossError, Trainer, make_trainer, train_run
from vggdepth.errors import TrainingError
from vggdepth.fused import FusedAdam, FusedTrainer, fusion_groups, train_fused
from vggdepth.runs import Callback, RunFiles


def _params(params, epochs: int = 2, **variants):
    """params.yaml on the CPU, `epochs` long, with variants changed (name -> field updates)."""
    changed = {name: params.variants[name].model_copy(update=update) for name, update in variants.items()}
    return params.model_copy(
        update={
            "train": params.train.model_copy(update={"epochs": epochs}),
            "runtime": params.runtime.model_copy(update={"device": "cpu", "progress_every": 1}),
            "variants": {**params.variants, **changed},
        }
    )


def _trainer(p, variant: str, seed: int, data, folder: Path) -> Trainer:
    return make_trainer(p, variant, seed, data, RunFiles.of(folder, variant, seed).root)


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _weights(state: dict) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in state.values() if t.is_floating_point()])


def test_one_fused_step_equals_the_runs_alone_in_float64(tiny_data, params, tmp_path):
    """Three runs of one shape with their own seeds and learning rates (one a warm-restart schedule): after two
    steps on a real batch of 20, the fused logits, gradients and weights are each run's own to float64 rounding."""
    p = _params(params, **{"HIGHLR-BN-38": {"lr": 2e-4}, "WR50-HIGHLR-BN-38": {"lr": 5e-4, "period": 1}})
    runs = [("BN-VGG-38", 0), ("HIGHLR-BN-38", 1), ("WR50-HIGHLR-BN-38", 2)]
    alone = [_trainer(p, v, s, tiny_data, tmp_path / "alone") for v, s in runs]
    group = FusedTrainer([_trainer(p, v, s, tiny_data, tmp_path / "fused") for v, s in runs])
    for t in (*alone, *group.trainers):
        t.net.double()
    group.net.double()
    # Adam's eps at 1e-3 instead of 1e-8 takes away its gain of lr/eps on rounding (see the module docstring), so
    # that two steps stay at rounding level; every other part of the update is the one trained with.
    for t in alone:
        t.optimizer.param_groups[0]["eps"] = 1e-3
    settings = alone[0].optimizer.param_groups[0]
    group.optimizer = FusedAdam(list(group.net.parameters()), 3, settings["betas"], 1e-3, settings["weight_decay"])
    group.begin()  # the fused weights and Adam state from the runs' own
    lrs = [t.optimizer.param_groups[0]["lr"] for t in alone]
    assert lrs == [1e-3, 2e-4, 5e-4]
    group.optimizer.lr.copy_(torch.tensor(lrs, dtype=torch.float64))
    x = tiny_data_batch(tiny_data)
    y = torch.from_numpy(tiny_data.train.labels[:20]).long()
    for step in range(2):
        for t in alone:
            t.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(t.net(x), y).backward()
        group.optimizer.zero_grad()
        logits = group.net(torch.cat([x] * 3, dim=1).contiguous(memory_format=torch.channels_last))
        F.cross_entropy(logits.flatten(0, 1), y.repeat(3), reduction="none").view(3, -1).mean(1).sum().backward()
        for r, t in enumerate(alone):
            diff = (logits[r] - t.net(x)).abs().max().item()
            assert diff < 1e-10, (runs[r], step, diff)
            for (name, fp), own in zip(group.net.named_parameters(), t.net.parameters(), strict=True):
                g = fused.by_run(fp.grad, 3)[r].reshape(own.shape)
                # atol: the bias of a convolution before batch norm has a gradient of rounding noise (~1e-17)
                assert torch.allclose(g, own.grad, rtol=1e-8, atol=1e-13), (runs[r], step, name)
            t.optimizer.step()
        group.optimizer.step()
        for t in alone:  # a new epoch of each run's own schedule: the cosine ones and the one restarting every epoch
            t.scheduler.step()
        lrs = [t.optimizer.param_groups[0]["lr"] for t in alone]
        group.optimizer.lr.copy_(torch.tensor(lrs, dtype=torch.float64))
    assert lrs[2] == 5e-4 and lrs[0] < 1e-3  # WR50's period is 1 here: restarted
    for r, t in enumerate(alone):
        for (name, fp), own in zip(group.net.named_parameters(), t.net.parameters(), strict=True):
            diff = (fused.by_run(fp.detach(), 3)[r].reshape(own.shape) - own.detach()).abs().max().item()
            assert diff < 1e-12, f"{runs[r]} {name}: {diff}"
            if name.endswith(".weight"):  # the comparison is of trained weights (biases before batch norm stay)
                moved = (own.detach() - alone_initial(t, name)).abs().max().item()
                assert moved > 1e-5, f"{name} did not train"


def tiny_data_batch(data) -> torch.Tensor:
    from vggdepth.batches import DeviceDataset

    return (
        DeviceDataset(data.train, data.mean, data.std, torch.device("cpu"))
        .normalise(torch.from_numpy(data.train.images[:20]))
        .double()
    )


def _initial_state(p, variant: str, seed: int) -> dict:
    """The state of (variant, seed) at initialisation (its seed, PyTorch's default init)."""
    from vggdepth.engine import seed_everything
    from vggdepth.models import VGG

    seed_everything(seed)
    return VGG(p.model, p.variants[variant]).state_dict()


def alone_initial(trainer: Trainer, name: str) -> torch.Tensor:
    """The parameter `name` of the trainer's run at initialisation (its seed, PyTorch's default init)."""
    from vggdepth.engine import seed_everything
    from vggdepth.models import VGG

    seed_everything(trainer.seed)
    return dict(VGG(trainer.model_cfg, trainer.variant).named_parameters())[name].detach().double()


def test_fused_runs_write_the_outputs_of_runs_trained_alone(small_data, params, tmp_path):
    """Three seeds of VGG-08 fused for 2 epochs x 5 real batches: each run's folder has the files of a run trained
    alone, its per-epoch losses and gradient statistics agree with the run alone, its checkpoints load, and the
    CPU trains eagerly although cuda_graphs is on."""
    p = _params(params)
    assert p.runtime.cuda_graphs
    runs = [("VGG-08", 0), ("VGG-08", 1), ("VGG-08", 2)]
    for variant, seed in runs:
        train_run(p, variant, seed, small_data, RunFiles.of(tmp_path / "alone", variant, seed).root)
    group = train_fused(p, runs, small_data, tmp_path / "fused")
    assert not group.graphed
    assert [o["epochs"] for o in group.outcome] == [2, 2, 2]
    for variant, seed in runs:
        a, b = RunFiles.of(tmp_path / "alone", variant, seed), RunFiles.of(tmp_path / "fused", variant, seed)
        for path in (b.epochs_csv, b.gradients_csv, b.train_json, b.best, b.last, b.previous):
            assert path.exists(), path
        for ra, rb in zip(_rows(a.epochs_csv), _rows(b.epochs_csv), strict=True):
            for key in ("train_loss", "val_loss"):
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=5e-5), (variant, seed, key)
            assert (ra["lr"], ra["epoch"]) == (rb["lr"], rb["epoch"])
        ga, gb = _rows(a.gradients_csv), _rows(b.gradients_csv)
        assert [(r["epoch"], r["layer"], r["numel"]) for r in ga] == [(r["epoch"], r["layer"], r["numel"]) for r in gb]
        for ra, rb in zip(ga, gb, strict=True):
            # Measured worst cases: 1.2% (mean_abs), 1.3% (grad_l2); the last step's value alone, 3.8% in one
            # run and 6.7% in another (after other tests changed the thread count: other sums); weights 4e-5.
            tolerances = (("mean_abs", 5e-2), ("last_mean_abs", 0.15), ("grad_l2", 5e-2), ("weight_l2", 2e-3))
            for statistic, rel in tolerances:
                assert float(rb[statistic]) == pytest.approx(float(ra[statistic]), rel=rel), (ra["layer"], statistic)
        la, lb = load_checkpoint(a.last), load_checkpoint(b.last)
        wa, wb = _weights(la["model"]), _weights(lb["model"])
        assert (wa - wb).norm() / wa.norm() < 2e-2
        initial = _weights(_initial_state(p, variant, seed))
        assert (wb - initial).norm() / initial.norm() > 10 * (wa - wb).norm() / wa.norm()  # trained, and far more
        assert lb["fingerprint"] == la["fingerprint"]  # the same run, as far as resuming is concerned
        assert float(lb["optimizer"]["state"][0]["step"]) == float(la["optimizer"]["state"][0]["step"]) == 10


def test_a_fused_run_resumes_fused_bit_for_bit_and_alone_and_the_other_way(small_data, params, tmp_path):
    """Fused for 1 epoch, then fused on to 2, equals fused for 2 epochs straight, bit for bit on the CPU. Runs trained
    fused continue alone from their checkpoints, and runs trained alone continue fused, each to float tolerance of
    the runs fused throughout."""
    runs = [("VGG-08", 3), ("VGG-08", 4)]
    one, two = _params(params, epochs=1), _params(params, epochs=2)
    train_fused(two, runs, small_data, tmp_path / "straight")
    train_fused(one, runs, small_data, tmp_path / "resumed")
    group = train_fused(two, runs, small_data, tmp_path / "resumed")
    assert [o["epochs"] for o in group.outcome] == [2, 2]
    train_fused(one, runs, small_data, tmp_path / "to-alone")
    for variant, seed in runs:
        train_run(one, variant, seed, small_data, RunFiles.of(tmp_path / "to-fused", variant, seed).root)
        train_run(two, variant, seed, small_data, RunFiles.of(tmp_path / "to-alone", variant, seed).root)
    train_fused(two, runs, small_data, tmp_path / "to-fused")

    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    for variant, seed in runs:
        a, b = RunFiles.of(tmp_path / "straight", variant, seed), RunFiles.of(tmp_path / "resumed", variant, seed)
        assert _rows(a.gradients_csv) == _rows(b.gradients_csv)
        assert drop(_rows(a.epochs_csv)) == drop(_rows(b.epochs_csv))
        sa, sb = load_checkpoint(a.last), load_checkpoint(b.last)
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
        for other in ("to-alone", "to-fused"):
            c = RunFiles.of(tmp_path / other, variant, seed)
            rows_a, rows_c = _rows(a.epochs_csv), _rows(c.epochs_csv)
            if other == "to-alone":  # the same fused first epoch, bit for bit
                assert drop(rows_a[:1]) == drop(rows_c[:1])
            assert len(rows_c) == 2
            for ra, rc in zip(rows_a, rows_c, strict=True):
                assert float(rc["val_loss"]) == pytest.approx(float(ra["val_loss"]), rel=5e-5), (other, seed)
            assert float(load_checkpoint(c.last)["optimizer"]["state"][0]["step"]) == 10


def test_a_callback_that_stops_one_run_stops_only_that_run(tiny_data, params, tmp_path):
    """As the GPU lease's deadline does: a callback raising at the end of an epoch stops its own run (which learns
    it through on_run_error); the others of the group go on."""

    class Stop(Exception):
        pass

    class StopAfterFirstEpoch(Callback):
        def __init__(self):
            self.errors = []

        def on_epoch_end(self, run, record, gradients) -> None:
            raise Stop(f"{run.variant} seed {run.seed} stopped after epoch {record.epoch}")

        def on_run_error(self, run, error) -> None:
            self.errors.append(error)

    stopper = StopAfterFirstEpoch()
    runs = [("VGG-08", 0), ("VGG-08", 1)]
    group = train_fused(_params(params, epochs=2), runs, tiny_data, tmp_path, lambda v, s: [stopper] if s else [])
    going, stopped = group.outcome
    assert going["epochs"] == 2 and isinstance(stopped, Stop) and stopper.errors == [stopped]
    assert str(stopped) == "VGG-08 seed 1 stopped after epoch 0"
    assert len(_rows(RunFiles.of(tmp_path, "VGG-08", 1).epochs_csv)) == 1  # its epoch was kept before it stopped


def test_runs_at_different_epochs_do_not_fuse_and_their_callbacks_hear_why(tiny_data, params, tmp_path):
    class Heard(Callback):
        def __init__(self):
            self.errors = []

        def on_run_error(self, run, error) -> None:
            self.errors.append((run.seed, str(error)))

    train_run(_params(params, epochs=1), "VGG-08", 0, tiny_data, RunFiles.of(tmp_path, "VGG-08", 0).root)
    heard = Heard()
    runs = [("VGG-08", 0), ("VGG-08", 1)]
    with pytest.raises(TrainingError, match="fused runs must resume from the same epoch") as error:
        train_fused(_params(params, epochs=2), runs, tiny_data, tmp_path, lambda v, s: [heard])
    assert "VGG-08-s0 at epoch 1, VGG-08-s1 at epoch 0" in str(error.value)
    assert heard.errors == [(0, str(error.value)), (1, str(error.value))]


def test_a_nan_in_one_fused_run_stops_only_that_run(tiny_data, params, tmp_path, monkeypatch):
    real = F.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, **kwargs):
        losses = real(logits, target, **kwargs)
        if not torch.is_inference_mode_enabled():  # a training step
            calls["train"] += 1
            if calls["train"] == 4:  # 200 images at batch 100: epoch 1, step 1
                losses = losses.view(2, -1) * torch.tensor([[1.0], [float("nan")]])
                return losses.flatten()
        return losses

    monkeypatch.setattr(F, "cross_entropy", poisoned)  # torch.nn.functional: engine.train_step calls it
    runs = [("VGG-08", 0), ("VGG-08", 1)]
    group = train_fused(_params(params, epochs=3), runs, tiny_data, tmp_path)
    ok, stopped = group.outcome
    assert ok["epochs"] == 3
    assert isinstance(stopped, NonFiniteLossError)
    assert "VGG-08 seed 1: the training loss became NaN or infinite at epoch 1, step 1" in str(stopped)
    files = RunFiles.of(tmp_path, "VGG-08", 1)
    assert load_checkpoint(files.last)["epoch"] == 1
    assert not files.train_json.exists()
    assert len(_rows(files.epochs_csv)) == 1


def test_only_runs_of_one_shape_fuse(params, tiny_data, tmp_path):
    p = _params(params)
    order = [(v, s) for s in (0, 1) for v in p.variants]
    groups = fusion_groups(p, order, most=4)
    assert groups == [
        [("VGG-08", 0), ("VGG-08", 1)],
        [("VGG-38", 0), ("VGG-38", 1)],
        [("BN-VGG-38", 0), ("HIGHLR-BN-38", 0), ("WR50-HIGHLR-BN-38", 0), ("BN-VGG-38", 1)],
        [("MBS50-BN-38", 0), ("MBS50-BN-38", 1)],
        [("RC-VGG-38", 0), ("RC-VGG-38", 1)],  # a shortcut is part of the shape
        [("BN-RC-VGG-38", 0), ("BN-RC-VGG-38", 1)],
        [("HIGHLR-BN-38", 1), ("WR50-HIGHLR-BN-38", 1)],
    ]
    assert sorted(run for g in groups for run in g) == sorted(order)
    with pytest.raises(TrainingError, match="MBS50-BN-38 seed 0 cannot be fused with BN-VGG-38 seed 0"):
        FusedTrainer(
            [_trainer(p, "BN-VGG-38", 0, tiny_data, tmp_path), _trainer(p, "MBS50-BN-38", 0, tiny_data, tmp_path)]
        )
