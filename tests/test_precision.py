"""bfloat16 where the device computes it: a CPU with bfloat16 arithmetic trains in bfloat16 autocast as CUDA does, a
CPU without it trains in float32 and says so once, every run records what it computed in, and a run never
continues in another precision."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from vggdepth.checkpoints import load_checkpoint
from vggdepth.engine import BFLOAT16, FLOAT32, _say_float32, cpu_computes_bf16, make_trainer, train_run
from vggdepth.errors import TrainingError
from vggdepth.runs import RunFiles

VARIANT = "VGG-08"


@pytest.fixture
def run_params(params):
    """Two epochs on the CPU, no tracking, bf16 asked for (as params.yaml ships it)."""
    return params.model_copy(
        update={
            "train": params.train.model_copy(update={"epochs": 2, "bf16": True}),
            "runtime": params.runtime.model_copy(update={"device": "cpu", "progress_every": 1}),
        }
    )


@pytest.fixture
def cpu_arithmetic(monkeypatch):
    """Pretend this CPU has (True) or lacks (False) bfloat16 arithmetic; PyTorch emulates it where it is absent,
    so either way the numbers are real."""

    def pretend(native: bool) -> None:
        flags = {"avx512_bf16": native, "amx_bf16": False}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
        cpu_computes_bf16.cache_clear()
        _say_float32.cache_clear()

    yield pretend
    cpu_computes_bf16.cache_clear()
    _say_float32.cache_clear()


def _with(params, **train):
    return params.model_copy(update={"train": params.train.model_copy(update=train)})


def test_this_cpu_trains_in_the_precision_its_arithmetic_allows(run_params, tiny_data, tmp_path):
    """On this machine's CPU: bfloat16 where /proc/cpuinfo's flags say it computes it, float32 elsewhere."""
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_computes_bf16() == native

    trainer = train_run(_with(run_params, epochs=1), VARIANT, 0, tiny_data, tmp_path / "run")

    assert trainer.precision == (BFLOAT16 if native else FLOAT32)
    assert json.loads(trainer.files.train_json.read_text())["precision"] == trainer.precision
    assert load_checkpoint(trainer.files.last)["precision"] == trainer.precision


def test_bf16_on_a_cpu_with_bf16_arithmetic_computes_in_bfloat16(run_params, tiny_data, tmp_path, cpu_arithmetic):
    cpu_arithmetic(True)
    bf16 = make_trainer(run_params, VARIANT, 0, tiny_data, tmp_path / "bf16")
    fp32 = make_trainer(_with(run_params, bf16=False), VARIANT, 0, tiny_data, tmp_path / "fp32")
    x, _ = next(iter(bf16.val_data.batches(20)))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16.autocast):
        assert bf16.net(x).dtype == torch.bfloat16
    assert (bf16.precision, fp32.precision) == (BFLOAT16, FLOAT32)
    assert fp32.net(x).dtype == torch.float32

    bf16.fit()
    fp32.fit()
    loss_bf16 = [r.train_loss for r in bf16.history]
    loss_fp32 = [r.train_loss for r in fp32.history]
    # The same run in two precisions: near each other (the same weights and batches), but not the same numbers.
    assert loss_bf16 != loss_fp32
    assert loss_bf16 == pytest.approx(loss_fp32, rel=2e-2)


def test_a_cpu_without_bf16_arithmetic_trains_in_float32_and_says_so_once(
    run_params, tiny_data, tmp_path, cpu_arithmetic, caplog
):
    cpu_arithmetic(False)
    with caplog.at_level(logging.WARNING, logger="vggdepth.engine"):
        first = make_trainer(run_params, VARIANT, 0, tiny_data, tmp_path / "a")
        second = make_trainer(run_params, VARIANT, 1, tiny_data, tmp_path / "b")

    assert (first.precision, second.precision) == (FLOAT32, FLOAT32)
    assert not first.autocast
    said = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert said == [
        "train.bf16 is set but this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX): training in float32 "
        "instead, which is faster here"
    ]


def test_a_run_never_continues_in_another_precision(run_params, tiny_data, tmp_path, cpu_arithmetic):
    files = RunFiles(tmp_path / "run")
    cpu_arithmetic(True)
    train_run(_with(run_params, epochs=1), VARIANT, 0, tiny_data, files.root)
    kept = files.last.read_bytes()

    cpu_arithmetic(False)  # the same settings on a machine that cannot compute bfloat16
    with pytest.raises(TrainingError, match=r"trained in bfloat16 up to epoch 1; here it would continue in float32"):
        train_run(run_params, VARIANT, 0, tiny_data, files.root)
    assert files.last.read_bytes() == kept  # refused before any work: the run is kept as it was

    cpu_arithmetic(True)  # back where it computes bfloat16, it continues
    trainer = train_run(run_params, VARIANT, 0, tiny_data, files.root)
    assert (trainer.run.start_epoch, len(trainer.history), trainer.run.precision) == (1, 2, BFLOAT16)


def test_a_finished_run_restores_anywhere_and_keeps_its_precision(run_params, tiny_data, tmp_path, cpu_arithmetic):
    files = RunFiles(tmp_path / "run")
    cpu_arithmetic(True)
    train_run(run_params, VARIANT, 0, tiny_data, files.root)
    first = files.train_json.read_text()
    files.train_json.unlink()

    cpu_arithmetic(False)  # nothing left to train: its outputs come back, saying what it was trained in
    trainer = train_run(run_params, VARIANT, 0, tiny_data, files.root)

    assert trainer.run.start_epoch == 2
    assert files.train_json.read_text() == first
    assert json.loads(first)["precision"] == BFLOAT16 == trainer.run.precision
