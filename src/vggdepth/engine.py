"""Training one (variant, seed): Adam, cross-entropy, per-epoch cosine schedule, gradient statistics, and a guard
against non-finite losses. The one training step (`train_step`) and the one evaluation loop (`predict`) live
here, for a run alone (`Trainer`) and for several runs fused into one network (vggdepth.fused) alike.

This module's source, with the network's, the batches' and the gradient statistics', is part of every run's
fingerprint: a change here trains runs afresh instead of restoring results the old code computed. Checkpoint files,
resume and their messages live in vggdepth.checkpoints, the run folder in vggdepth.runs, so rewording those
retrains nothing. The loop calls no tracking API: whatever watches a run subscribes through `runs.Callback`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vggdepth import checkpoints
from vggdepth.batches import DeviceDataset, training_batches
from vggdepth.config import ModelConfig, Params, RuntimeConfig, TrainConfig, Variant
from vggdepth.data import PreparedData
from vggdepth.errors import TrainingError
from vggdepth.files import ensure_writable, write_csv, write_json
from vggdepth.gradients import COLUMNS as GRADIENT_COLUMNS
from vggdepth.gradients import GradientRecorder, GradientRow
from vggdepth.models import VGG, count_parameters
from vggdepth.runs import EPOCH_COLUMNS, Callback, EpochRecord, RunFiles, RunInfo, this_node

log = logging.getLogger(__name__)


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite. `what` says which loss and when, in a few words (a record's reason); the
    message adds the run, the checkpoint kept and the settings to suspect."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what

    def __reduce__(self):  # pickled with both arguments (a worker process sends it whole)
        return type(self), (str(self), self.what)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"runtime.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TrainingError(
            f"runtime.device is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


BFLOAT16, FLOAT32 = "bfloat16", checkpoints.FLOAT32


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16): without it, PyTorch emulates bfloat16,
    which is slower than float32."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def training_precision(device: torch.device, bf16: bool) -> str:
    """What a run on `device` computes in: bfloat16 autocast when `train.bf16` asks for it and the device computes
    bfloat16 natively (CUDA, or a CPU that `cpu_computes_bf16`), else float32, said once per process."""
    if not bf16:
        return FLOAT32
    if device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16()):
        return BFLOAT16
    _say_float32(device.type)
    return FLOAT32


@functools.cache
def _say_float32(device_type: str) -> None:
    what = "this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX)" if device_type == "cpu" else device_type
    log.warning("train.bf16 is set but %s: training in float32 instead, which is faster here", what)


def make_scheduler(optimizer: torch.optim.Optimizer, variant: Variant, lr_min: float):
    """The variant's per-epoch schedule: one cosine cycle, or cosine restarted every `period` epochs."""
    if variant.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=variant.period, eta_min=lr_min)
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=variant.period, eta_min=lr_min)


# The modules whose code decides what a run computes: a change to any of them makes a new run, not a resumed one.
RESULT_CODE = ("engine.py", "models.py", "batches.py", "gradients.py")


def _code_digest() -> str:
    digest = hashlib.sha256()
    for name in RESULT_CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(model: ModelConfig, train: TrainConfig, variant: Variant, seed: int, data: dict) -> str:
    """Identity of what a run computes; a checkpoint is resumed only under the same fingerprint. Made of the
    sections that change results (`runtime` is not one of them) and of the training code (`RESULT_CODE`);
    `train.epochs` is left out because a longer run continues a shorter one."""
    payload = {
        "code": _code_digest(),
        "model": model.model_dump(),
        "train": train.model_dump(exclude={"epochs"}),
        # `residual: false` is what a run was before the setting existed: the same fingerprint
        "variant": variant.model_dump(exclude=set() if variant.residual else {"residual"}),
        "seed": seed,
        # the normalisation statistics too: the same images normalised otherwise are another run
        "data": {k: data[k] for k in ("archive_md5", "split_seed", "sizes", "subset", "mean", "std")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- the step and the evaluation loop: one of each, for k runs in one network (a run alone: k = 1) ------------


class Tally:
    """Each run's sums over an epoch's steps, on the device: loss, accuracy, and the first step whose loss was not
    finite (-1: none). Updated in place, so that a CUDA graph can hold the step."""

    def __init__(self, runs: int, device: torch.device):
        self.runs = runs
        self.loss = torch.zeros(runs, dtype=torch.float64, device=device)
        self.acc = torch.zeros_like(self.loss)
        self.first_bad = torch.full((runs,), -1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)

    def reset(self) -> None:
        for t in (self.loss, self.acc, self.step):
            t.zero_()
        self.first_bad.fill_(-1)


def train_step(net: nn.Module, optimizer, recorder, x: Tensor, y: Tensor, tally: Tally, autocast: bool) -> None:
    """One training step of the `tally.runs` runs held by `net` (gradients already cleared): forward, each run's
    mean cross-entropy, backward of their sum (so each run's gradients are those of the run alone), the gradient
    statistics (`recorder`, or None), the optimiser's step, and the tally. `net` maps a batch to logits
    (batch, classes), or (runs, batch, classes) when fused; `y` is (batch,) or (runs, batch)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        logits = net(x)
    logits = logits.float().view(tally.runs, -1, logits.shape[-1])
    y = y.view(tally.runs, -1)
    losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(tally.runs, -1).mean(1)
    losses.sum().backward()
    if recorder is not None:
        recorder.after_backward()
    optimizer.step()
    with torch.no_grad():
        losses = losses.detach()
        tally.loss += losses
        tally.acc += (logits.argmax(2) == y).double().mean(1)
        tally.first_bad.copy_(torch.where(~torch.isfinite(losses) & (tally.first_bad < 0), tally.step, tally.first_bad))
        tally.step += 1


def predict(net: nn.Module, data: DeviceDataset, batch_size: int, autocast: bool, runs: int = 1) -> Iterator:
    """(logits (runs, batch, classes) float32, labels (batch,)) of `net` (in eval mode) over `data`, batch by batch
    in the data's order; a network of `runs` fused runs sees every image once per run."""
    for x, y in data.batches(batch_size):
        if runs > 1:
            x = x.repeat(1, runs, 1, 1).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = net(x).float()
        yield logits.view(runs, len(y), -1), y


def validate(
    net: nn.Module, data: DeviceDataset, batch_size: int, autocast: bool, runs: int = 1
) -> tuple[list[float], list[float]]:
    """Each run's mean cross-entropy and accuracy over `data` (`net` in eval mode)."""
    loss_sum = torch.zeros(runs, dtype=torch.float64, device=data.device)
    correct = torch.zeros(runs, dtype=torch.long, device=data.device)
    with torch.inference_mode():
        for logits, y in predict(net, data, batch_size, autocast, runs):
            y = y.expand(runs, -1)
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            loss_sum += losses.view(runs, -1).sum(1).double()
            correct += (logits.argmax(2) == y).sum(1)
    return (loss_sum / len(data)).tolist(), (correct.double() / len(data)).tolist()


class StepLoop:
    """An epoch of training steps, for `Trainer` (one run) and `fused.FusedTrainer` (several): what differs is
    where the batches come from (`batches`), how a step runs (`step`: eager, or a CUDA graph's replay) and what a
    non-finite loss stops (`check_finite`)."""

    net: nn.Module
    tally: Tally
    runtime: RuntimeConfig

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError

    def check_finite(self, epoch: int) -> None:
        raise NotImplementedError

    def train_epoch(self, epoch: int, bar: tqdm, guard: bool = True) -> tuple[list[float], list[float], int]:
        """One pass over the training set: each run's mean loss and accuracy over the steps, and the steps. The host
        looks at the device only every `runtime.progress_every` steps. `guard`: the NaN guard (`check_finite`);
        off only where steps are timed, not runs trained (vggdepth.throughput)."""
        self.net.train()
        self.tally.reset()
        steps = 0
        for x, y in self.batches():
            self.step(x, y)
            steps += 1
            if steps % self.runtime.progress_every == 0:
                if guard:
                    self.check_finite(epoch)
                bar.update(self.runtime.progress_every)
                bar.set_postfix(loss=f"{self.tally.loss[0].item() / steps:.3f}")
        if guard:
            self.check_finite(epoch)
        bar.update(bar.total - bar.n)
        return (self.tally.loss / steps).tolist(), (self.tally.acc / steps).tolist(), steps


class Trainer(StepLoop):
    """Trains one (variant, seed) on prepared data, writing its outputs to `files`."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        train: TrainConfig,
        runtime: RuntimeConfig,
        variant_name: str,
        variant: Variant,
        seed: int,
        data: PreparedData,
        files: RunFiles,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
    ):
        self.model_cfg, self.cfg, self.runtime, self.variant, self.seed = model, train, runtime, variant, seed
        self.files, self.callbacks = files, list(callbacks)
        self.device = resolve_device(runtime.device)
        # Before any work: a run that cannot write its outputs should fail now, not after its first epoch.
        ensure_writable(files.checkpoints)
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        self.precision = training_precision(self.device, train.bf16)
        self.autocast = self.precision == BFLOAT16

        seed_everything(seed)
        self.net = VGG(model, variant).to(self.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=variant.lr, betas=tuple(train.betas), weight_decay=train.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, variant, train.lr_min)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.train_data = DeviceDataset(data.train, data.mean, data.std, self.device)
        self.val_data = DeviceDataset(data.val, data.mean, data.std, self.device)
        self.recorder = GradientRecorder(self.net) if train.grad_stats else None
        self.tally = Tally(1, self.device)

        self.best = {"epoch": -1, "val_acc": -1.0, "val_loss": math.inf}
        self.best_model: dict | None = None  # the best epoch's weights, kept in last.pt so best.pt can be rebuilt
        self.trained_on = str(self.device)  # the device of the newest epoch, restored with a finished run
        self.node = this_node()  # where the newest epoch was trained, restored likewise
        self.run = RunInfo(
            variant=variant_name,
            seed=seed,
            config={
                "model": model.model_dump(),
                "train": train.model_dump(),
                "variant": variant.model_dump(),
                "seed": seed,
                "data": {k: v for k, v in data.stats.items() if k != "classes"},
            },
            fingerprint=run_fingerprint(model, train, variant, seed, data.stats),
            device=str(self.device),
            parameters=count_parameters(self.net),
            files=files,
            start_epoch=0,
            node=self.node,
            precision=self.precision,
        )
        self.history, self.gradients = self.run.history, self.run.gradients

    # ---- one epoch ----------------------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return training_batches(self.train_data, self.variant.batch_size, self.cfg.augment, self.generator)

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        train_step(self.net, self.optimizer, self.recorder, x, y, self.tally, self.autocast)

    def check_finite(self, epoch: int) -> None:
        self.stop_if_not_finite(int(self.tally.first_bad[0].item()), epoch)

    def stop_if_not_finite(self, step: int, epoch: int) -> None:
        """The NaN guard: a run whose loss became NaN or infinite at `step` (>= 0) of `epoch` stops, its last good
        checkpoint kept, naming the settings that can cause it."""
        if step < 0:
            return
        kept = (
            f"the last good checkpoint {self.files.last} (end of epoch {len(self.history) - 1}) is kept"
            if self.files.last.exists()
            else "no checkpoint was written yet"
        )
        what = f"the training loss became NaN or infinite at epoch {epoch}, step {step}"
        raise NonFiniteLossError(f"{self.run.variant} seed {self.seed}: {what}; {kept}. {self.suspects()}", what)

    def suspects(self) -> str:
        """The settings a non-finite loss can come from, with their values, for the NaN guard's message."""
        v, name, data = self.variant, self.run.variant, self.run.config["data"]

        def rounded(values: list[float]) -> list[float]:
            return [round(x, 4) for x in values]

        return (
            f"The settings that can cause it: variants.{name}.lr {v.lr:g} (lower it first), variants.{name}.batch_size "
            f"{v.batch_size}, variants.{name}.batch_norm {str(v.batch_norm).lower()}, train.weight_decay "
            f"{self.cfg.weight_decay:g}, train.betas {list(self.cfg.betas)}, the precision ({self.precision}, "
            f"train.bf16), and the prepared data's mean {rounded(data['mean'])} and std {rounded(data['std'])} "
            "(stats.json)"
        )

    def evaluate(self, data: DeviceDataset) -> tuple[float, float]:
        """Sample-weighted mean loss and accuracy in eval mode."""
        self.net.eval()
        (loss,), (acc,) = validate(self.net, data, self.runtime.eval_batch_size, self.autocast)
        return loss, acc

    # ---- the run ------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to `train.epochs` (resuming if possible), write all outputs, return the summary. A run already
        trained to `train.epochs` trains nothing and writes its outputs again from its checkpoint, identical to
        the first time (DVC deletes them before re-running a stage)."""
        self.begin()
        try:
            for epoch in range(self.run.start_epoch, self.cfg.epochs):
                self._epoch(epoch)
            summary = self.conclude()
        except BaseException as error:  # KeyboardInterrupt included: watchers learn the run was stopped
            self.fail(error)
            raise
        self.end(summary)
        return summary

    # The steps of `fit`, public so that a trainer of several runs at once (vggdepth.fused) keeps each run's books
    # exactly as a run trained alone does.

    def begin(self) -> None:
        """Restore the run from its checkpoint when there is one, rewrite its tables, tell the callbacks. A callback
        that fails to start stops the run; those already started learn why (an MLflow run is not left running)."""
        checkpoints.restore(self)
        if self.history:
            self._write_tables()
        started: list[Callback] = []
        try:
            for cb in self.callbacks:
                cb.on_run_start(self.run)
                started.append(cb)
        except BaseException as error:
            for cb in started:
                cb.on_run_error(self.run, error)
            raise

    def conclude(self) -> dict:
        """After the last epoch: the summary, written to train.json."""
        summary = self.summary()
        write_json(self.files.train_json, summary)
        return summary

    def fail(self, error: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_run_error(self.run, error)

    def end(self, summary: dict) -> None:
        for cb in self.callbacks:
            cb.on_run_end(self.run, summary)

    def start_epoch(self) -> float:
        """Mark where and on what the epoch trains; its learning rate."""
        self.trained_on = str(self.device)
        self.run.precision = self.precision
        self.node = self.run.node = this_node()
        return self.optimizer.param_groups[0]["lr"]

    def describe(self, epoch: int) -> str:
        return f"{self.run.variant} s{self.seed} epoch {epoch + 1}/{self.cfg.epochs}"

    def _epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        lr = self.start_epoch()
        steps = math.ceil(len(self.train_data) / self.variant.batch_size)
        with tqdm(total=steps, desc=self.describe(epoch), unit="step", disable=not sys.stderr.isatty()) as bar:
            (train_loss,), (train_acc,), _ = self.train_epoch(epoch, bar)
            val_loss, val_acc = self.evaluate(self.val_data)
            bar.set_postfix(
                loss=f"{train_loss:.3f}", acc=f"{train_acc:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}"
            )
        rows = self.recorder.epoch_rows(epoch) if self.recorder is not None else []
        record = EpochRecord(epoch, train_loss, train_acc, val_loss, val_acc, lr, time.perf_counter() - started)
        self.end_epoch(record, rows)

    def end_epoch(self, record: EpochRecord, rows: list[GradientRow]) -> None:
        """Keep the books of a trained epoch: the schedule's step, history, log line, checkpoints, tables and
        callbacks. A non-finite validation loss stops the run here, its last good checkpoint kept."""
        if not math.isfinite(record.val_loss):
            what = f"the validation loss is {record.val_loss} after epoch {record.epoch}"
            raise NonFiniteLossError(f"{self.run.variant} seed {self.seed}: {what}. {self.suspects()}", what)
        self.scheduler.step()
        self.history.append(record)
        self.gradients.extend(rows)
        if not sys.stderr.isatty():
            print(
                f"{self.describe(record.epoch)}: train loss {record.train_loss:.4f} acc {record.train_acc:.4f} | "
                f"val loss {record.val_loss:.4f} acc {record.val_acc:.4f} | lr {record.lr:.3g} | "
                f"{record.seconds:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        improved = record.val_acc > self.best["val_acc"]
        if improved:
            self.best = {"epoch": record.epoch, "val_acc": record.val_acc, "val_loss": record.val_loss}
            self.best_model = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        checkpoints.save_epoch(self, improved)
        self._write_tables()
        for cb in self.callbacks:
            cb.on_epoch_end(self.run, record, rows)

    def _write_tables(self) -> None:
        write_csv(self.files.epochs_csv, EPOCH_COLUMNS, [astuple(r) for r in self.history])
        write_csv(self.files.gradients_csv, GRADIENT_COLUMNS, [astuple(r) for r in self.gradients])

    def summary(self) -> dict:
        last = self.history[-1]
        train_seconds = sum(r.seconds for r in self.history)
        return {
            "variant": self.run.variant,
            "seed": self.seed,
            "epochs": len(self.history),
            "train_loss": last.train_loss,
            "train_acc": last.train_acc,
            "val_loss": last.val_loss,
            "val_acc": last.val_acc,
            "best_epoch": self.best["epoch"],
            "best_val_acc": self.best["val_acc"],
            "parameters": self.run.parameters,
            "seconds": train_seconds,
            "images_per_second": len(self.train_data) * len(self.history) / train_seconds,
            "device": self.trained_on,
            "precision": self.run.precision,
            "node": self.node,
        }


def train_run(
    params: Params, variant: str, seed: int, data: PreparedData, out: Path, callbacks: list[Callback] | tuple = ()
) -> Trainer:
    """Train (or resume, or restore the outputs of) one (variant, seed) into `out`: the one entry point the stage,
    the tests and the benchmarks share. Returns the trainer, its run complete."""
    trainer = make_trainer(params, variant, seed, data, out, callbacks)
    trainer.fit()
    return trainer


def make_trainer(
    params: Params, variant: str, seed: int, data: PreparedData, out: Path, callbacks: list[Callback] | tuple = ()
) -> Trainer:
    """The trainer of one (variant, seed) under `params`, writing into the run folder `out`."""
    return Trainer(
        model=params.model,
        train=params.train,
        runtime=params.runtime,
        variant_name=variant,
        variant=params.variant(variant, field="variant"),
        seed=seed,
        data=data,
        files=RunFiles(out),
        callbacks=callbacks,
    )
