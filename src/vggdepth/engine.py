"""Training one (variant, seed): Adam, cross-entropy, per-epoch cosine schedule, gradient statistics,
checkpoints that resume to the exact same result, and a guard against non-finite losses.

The loop calls no tracking API: whatever watches a run (MLflow, tests) subscribes through `Callback`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vggdepth.batches import DeviceDataset, training_batches
from vggdepth.config import ModelConfig, Params, RuntimeConfig, TrainConfig, Variant
from vggdepth.data import PreparedData
from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_path, clean_leftovers, ensure_writable, write_csv, write_json
from vggdepth.gradients import COLUMNS as GRADIENT_COLUMNS
from vggdepth.gradients import GradientRecorder, GradientRow
from vggdepth.models import VGG, count_parameters

log = logging.getLogger(__name__)

SUPERSEDED = "superseded"  # checkpoints/superseded/<fingerprint>/: runs of other settings, kept to come back to
KEEP_SUPERSEDED = 2
# 2: loadable with torch.load(weights_only=True) (random states as plain values), best weights inside last.pt.
CHECKPOINT_FORMAT = 2


class TrainingError(VggdepthError):
    """Training cannot go on."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""


class CheckpointError(TrainingError):
    """A checkpoint cannot be read: damaged, truncated, or not a checkpoint this version can load safely."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks for code to run when loaded: refused, never skipped past silently."""


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch measured: train loss/accuracy are means over its batches (train mode, augmented)."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float


EPOCH_COLUMNS = tuple(EpochRecord.__dataclass_fields__)


@dataclass(frozen=True)
class RunFiles:
    """Where one (variant, seed) keeps its outputs."""

    root: Path

    @classmethod
    def of(cls, runs: Path, variant: str, seed: int) -> RunFiles:
        """The folder of (variant, seed) under `runs`: dvc.yaml's `runs/<variant>-s<seed>`."""
        return cls(runs / f"{variant}-s{seed}")

    @property
    def epochs_csv(self) -> Path:
        return self.root / "epochs.csv"

    @property
    def gradients_csv(self) -> Path:
        return self.root / "gradients.csv"

    @property
    def train_json(self) -> Path:
        return self.root / "train.json"

    @property
    def test_json(self) -> Path:
        return self.root / "test.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def previous(self) -> Path:
        """The last checkpoint before the newest one: what a damaged `last.pt` falls back to."""
        return self.checkpoints / "previous.pt"

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file the train stage writes, checkpoints aside."""
        return (self.epochs_csv, self.gradients_csv, self.train_json)


@dataclass
class RunInfo:
    """What a callback learns when a run starts."""

    variant: str
    seed: int
    config: dict
    fingerprint: str
    device: str
    parameters: int
    files: RunFiles
    start_epoch: int  # 0, or the number of epochs restored from the last checkpoint
    node: str  # where it trains (`this_node`), or where its newest epoch was trained when restored
    precision: str = "float32"  # what it computes in (`training_precision`), or what it was trained in when restored
    extra: dict = field(default_factory=dict)  # kept in checkpoints: a callback may store its own state here
    history: list[EpochRecord] = field(default_factory=list)  # every epoch so far, restored ones included
    gradients: list[GradientRow] = field(default_factory=list)


class Callback:
    """Hook points of the training loop; every method is optional."""

    def on_run_start(self, run: RunInfo) -> None: ...

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None: ...

    def on_run_end(self, run: RunInfo, summary: dict) -> None: ...

    def on_run_error(self, run: RunInfo, error: BaseException) -> None: ...


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


BFLOAT16, FLOAT32 = "bfloat16", "float32"


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
_RESULT_CODE = ("engine.py", "models.py", "batches.py", "gradients.py")


def _code_digest() -> str:
    digest = hashlib.sha256()
    for name in _RESULT_CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(model: ModelConfig, train: TrainConfig, variant: Variant, seed: int, data: dict) -> str:
    """Identity of what a run computes; a checkpoint is resumed only under the same fingerprint. Made of the
    sections that change results (`runtime` is not one of them) and of the training code (`_RESULT_CODE`);
    `train.epochs` is left out because a longer run continues a shorter one."""
    payload = {
        "code": _code_digest(),
        "model": model.model_dump(),
        "train": train.model_dump(exclude={"epochs"}),
        "variant": variant.model_dump(),
        "seed": seed,
        "data": {k: data[k] for k in ("archive_md5", "split_seed", "sizes", "subset")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state(generator: torch.Generator) -> dict:
    """Every random state, as tensors and plain Python values only, so checkpoints load with weights_only."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batches": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator.set_state(state["batches"].cpu())


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temporary file, so a kill never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch reports a failed write (a full disk) as a RuntimeError
            raise TrainingError(
                f"cannot write checkpoint {path}: the write failed (a full disk?): {_first_line(exc)}"
            ) from None


_CHECKPOINT_KEYS = ("format", "fingerprint", "variant", "seed", "epoch", "model", "model_config", "variant_config")
# What `last.pt` holds beyond the weights, to resume a run exactly.
_RESUME_KEYS = ("optimizer", "scheduler", "rng", "history", "gradients", "best", "best_model", "trained_on")


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint, read with `weights_only=True`: tensors and plain values only, so a tampered file cannot run
    code. Raises `CheckpointError` naming the file when it is missing, damaged, unsafe or not ours."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a damaged file
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))  # weights_only refused to import something
        if unsafe and unsafe.group(1).startswith("numpy"):
            raise UnsafeCheckpointError(
                f"{path} pickles NumPy objects ({unsafe.group(1)}): it is a checkpoint of an older vggdepth (format "
                f"1), which this version does not unpickle because that could run code. It was not loaded. Retrain "
                f"the run (remove {path.parent}) or load it with the version that wrote it"
            ) from None
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} asks for {unsafe.group(1)}, which a checkpoint never needs (it is not a checkpoint of "
                "this version, or it was tampered with); it was not loaded, so nothing in it ran. Remove it "
                "and re-run training to make a new one"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(exc))
        reason = f"unreadable pickle: {detail.group(1)}" if detail else _first_line(exc)
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({reason})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a vggdepth checkpoint (no {', '.join(missing)})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a checkpoint of format {state['format']}, this version reads format {CHECKPOINT_FORMAT}; "
            "remove it and re-run training"
        )
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def resume_state(files: RunFiles, device: torch.device | str = "cpu") -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint of a run folder and its path: `last.pt`, else `previous.pt` when `last.pt`
    is missing or damaged (a kill between the two writes, a truncated copy); (None, None) when there is none.
    Clears what a killed writer left and removes a damaged `last.pt` it falls back past."""
    for path in (files.last, files.previous, files.best, *files.outputs):
        clean_leftovers(path)
    damaged = []
    for path in (files.last, files.previous):
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, device)
            lacking = [k for k in _RESUME_KEYS if k not in state]
            if lacking:
                raise CheckpointError(f"{path} cannot resume a run: it has no {', '.join(lacking)}")
        except UnsafeCheckpointError:
            raise  # not merely damaged: never skip past it silently
        except CheckpointError as exc:
            damaged.append((path, exc))
            continue
        for bad, exc in damaged:
            log.warning("%s; resuming from %s (end of epoch %d) instead", exc, path, state["epoch"] - 1)
            bad.unlink(missing_ok=True)
        return state, path
    if damaged:
        raise CheckpointError(
            f"{damaged[0][1]} and there is no earlier good checkpoint to fall back to. To train this run "
            f"from scratch, remove the folder: rm -r {files.checkpoints}"
        )
    return None, None


def arrange_checkpoints(
    files: RunFiles, fingerprint: str, device: torch.device | str = "cpu"
) -> tuple[dict | None, Path | None]:
    """Make `files.checkpoints` hold the checkpoints of the run `fingerprint` names, and return the newest one
    (`resume_state`), or (None, None) when there is none. Checkpoints of other settings, data or code are set
    aside in `superseded/<their fingerprint>/` (not deleted), and brought back when those settings return."""
    state, source = resume_state(files, device)
    if state is not None and state["fingerprint"] != fingerprint:
        aside = _set_aside(files, state["fingerprint"])
        log.warning("the checkpoints were made by other settings, data or training code: kept in %s", aside)
        state = None
    earlier = files.checkpoints / SUPERSEDED / fingerprint
    if state is None and (earlier / files.last.name).exists():
        for path in earlier.iterdir():
            os.replace(path, files.checkpoints / path.name)
        earlier.rmdir()
        log.warning("brought back the checkpoints made earlier with these settings from %s", earlier)
        state, source = resume_state(files, device)
    return state, source


def _set_aside(files: RunFiles, fingerprint: str) -> Path:
    """Move a run folder's checkpoints to `superseded/<fingerprint>/`, keeping the newest few such sets."""
    aside = files.checkpoints / SUPERSEDED / fingerprint
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    for path in (files.last, files.previous, files.best):
        if path.exists():
            os.replace(path, aside / path.name)
    older = sorted(aside.parent.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_SUPERSEDED:]
    for folder in older:
        shutil.rmtree(folder, ignore_errors=True)
    return aside


def this_node() -> str:
    """Where this process runs: the host name, and the Ray node inside a Ray worker (several nodes may share a
    host); kept with every checkpoint, so a run's outputs say where its newest epoch was trained."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{host} (ray node {ray.get_runtime_context().get_node_id()[:12]})"
    return host


class Trainer:
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

    # ---- resume -------------------------------------------------------------------------------------------

    def _restore(self) -> None:
        """Continue from the last checkpoint when it belongs to this very run (`arrange_checkpoints`)."""
        state, source = arrange_checkpoints(self.files, self.run.fingerprint, self.device)
        if state is None:
            return
        if state["epoch"] > self.cfg.epochs:
            raise TrainingError(
                f"{source} holds this run trained for {state['epoch']} epochs, more than train.epochs="
                f"{self.cfg.epochs}. It is kept: set train.epochs to {state['epoch']} to use it, or move "
                f"{self.files.checkpoints} away to train a {self.cfg.epochs}-epoch run"
            )
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # Every checkpoint of this code records its precision (older code has another fingerprint: never resumed).
        trained_in = state.get("precision", FLOAT32)
        if state["epoch"] < self.cfg.epochs:  # random states matter only to epochs still to train
            if torch.device(state["trained_on"]).type != self.device.type:
                raise TrainingError(
                    f"{source} was trained on {state['trained_on']} up to epoch {state['epoch']}; its random "
                    f"states cannot continue on {self.device}. Set runtime.device to "
                    f"{torch.device(state['trained_on']).type} to finish it, or move {self.files.checkpoints} "
                    "away to train it here from the start"
                )
            if trained_in != self.precision:
                raise TrainingError(
                    f"{source} was trained in {trained_in} up to epoch {state['epoch']}; here it would continue in "
                    f"{self.precision}, and a run never changes precision midway. Finish it where it computes in "
                    f"{trained_in} (train.bf16 and a device with bfloat16 arithmetic decide it), or move "
                    f"{self.files.checkpoints} away to train it here from the start"
                )
            _set_rng_state(state["rng"], self.generator)
        self.history.extend(EpochRecord(**r) for r in state["history"])
        self.gradients.extend(GradientRow(**r) for r in state["gradients"])
        self.best = state["best"]
        self.best_model = state["best_model"]
        self.trained_on = state["trained_on"]
        self.run.precision = trained_in
        self.node = self.run.node = state.get("node", self.node)  # older checkpoints recorded no node
        self.run.start_epoch = state["epoch"]
        self.run.extra = state.get("extra", {})
        self._check_best(state)
        if source == self.files.previous:  # last.pt was missing: make the state we resume from the last one again
            save_checkpoint(self.files.last, state)
        log.info("resuming %s from epoch %d of %d", source, state["epoch"], self.cfg.epochs)

    def _check_best(self, state: dict) -> None:
        """best.pt must hold the best epoch's weights; rebuild it from last.pt when it is missing or damaged."""
        expected = self.best["epoch"] + 1
        problem = None
        try:
            best = load_checkpoint(self.files.best, "cpu")
            if best["fingerprint"] != state["fingerprint"] or best["epoch"] != expected:
                problem = f"holds epoch {best['epoch'] - 1}, not the best epoch {self.best['epoch']}"
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            problem = str(exc)
        if problem:
            log.warning("%s: %s; rewriting it from %s", self.files.best, problem, self.files.last.name)
            save_checkpoint(self.files.best, self._weights(expected, self.best_model))

    # ---- one epoch ----------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, bar: tqdm) -> tuple[float, float]:
        self.net.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        acc_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        steps = 0
        for step, (x, y) in enumerate(
            training_batches(self.train_data, self.variant.batch_size, self.cfg.augment, self.generator)
        ):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.net(x)
                loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.recorder is not None:
                self.recorder.after_backward()
            self.optimizer.step()
            # Everything below stays on the device; the host looks only every `progress_every` steps.
            loss = loss.detach()
            loss_sum += loss
            acc_sum += (logits.argmax(1) == y).float().mean()
            first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), step, first_bad)
            steps = step + 1
            if steps % self.runtime.progress_every == 0:
                self._check_finite(first_bad, epoch)
                bar.update(self.runtime.progress_every)
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.3f}", acc=f"{acc_sum.item() / steps:.3f}")
        self._check_finite(first_bad, epoch)
        bar.update(bar.total - bar.n)
        return loss_sum.item() / steps, acc_sum.item() / steps

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        step = int(first_bad.item())
        if step >= 0:
            kept = (
                f"the last good checkpoint {self.files.last} (end of epoch {len(self.history) - 1}) is kept"
                if self.files.last.exists()
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"{self.run.variant} seed {self.seed}: the training loss became NaN or infinite at epoch {epoch}, "
                f"step {step}; {kept}. Lower the learning rate or check the data."
            )

    def evaluate(self, data: DeviceDataset) -> tuple[float, float]:
        """Sample-weighted mean loss and accuracy in eval mode."""
        self.net.eval()
        return evaluate_model(self.net, data, self.runtime.eval_batch_size, self.autocast)

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
        """Restore the run from its checkpoint when there is one, rewrite its tables, tell the callbacks."""
        self._restore()
        if self.history:
            self._write_tables()
        for cb in self.callbacks:
            cb.on_run_start(self.run)

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
            train_loss, train_acc = self.train_epoch(epoch, bar)
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
            raise NonFiniteLossError(
                f"{self.run.variant} seed {self.seed}: the validation loss is {record.val_loss} after epoch "
                f"{record.epoch}"
            )
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
        self._end_of_epoch(record)
        for cb in self.callbacks:
            cb.on_epoch_end(self.run, record, rows)

    def _end_of_epoch(self, record: EpochRecord) -> None:
        """Best checkpoint when validation accuracy improved, then the last checkpoint and the tables. The last
        checkpoint before this one stays as `previous.pt`, so a damaged `last.pt` costs one epoch, not the run."""
        if record.val_acc > self.best["val_acc"]:
            self.best = {"epoch": record.epoch, "val_acc": record.val_acc, "val_loss": record.val_loss}
            self.best_model = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            save_checkpoint(self.files.best, self._weights(record.epoch + 1, self.best_model))
        if self.files.last.exists():
            os.replace(self.files.last, self.files.previous)
        save_checkpoint(
            self.files.last,
            {
                **self._weights(record.epoch + 1, self.net.state_dict()),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.generator),
                "history": [asdict(r) for r in self.history],
                "gradients": [asdict(r) for r in self.gradients],
                "best": self.best,
                "best_model": self.best_model,
                "trained_on": self.trained_on,
                "precision": self.run.precision,
                "node": self.node,
                "extra": self.run.extra,
            },
        )
        self._write_tables()

    def _write_tables(self) -> None:
        write_csv(self.files.epochs_csv, EPOCH_COLUMNS, [astuple(r) for r in self.history])
        write_csv(self.files.gradients_csv, GRADIENT_COLUMNS, [astuple(r) for r in self.gradients])

    def _weights(self, epochs: int, model: dict) -> dict:
        """A checkpoint's common part: whose weights these are, after how many epochs, and how to rebuild the net."""
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.run.fingerprint,
            "variant": self.run.variant,
            "seed": self.seed,
            "epoch": epochs,
            "model": model,
            **self._identity(),
        }

    def _identity(self) -> dict:
        """What it takes to rebuild the network from a checkpoint alone."""
        return {
            "model_config": self.model_cfg.model_dump(),
            "variant_config": self.variant.model_dump(),
            "mean": self.train_data.mean.flatten().div(255).tolist(),
            "std": self.train_data.std.flatten().div(255).tolist(),
        }

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


def evaluate_model(net: torch.nn.Module, data: DeviceDataset, batch_size: int, autocast: bool) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `net` (already in eval mode) over `data`."""
    loss_sum = torch.zeros((), device=data.device, dtype=torch.float64)
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    with torch.inference_mode(), torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=autocast):
        for x, y in data.batches(batch_size):
            logits = net(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(data), correct.item() / len(data)


def load_network(checkpoint: dict, device: torch.device) -> VGG:
    """The network stored in a checkpoint, in eval mode."""
    net = VGG(ModelConfig(**checkpoint["model_config"]), Variant(**checkpoint["variant_config"]))
    net.load_state_dict(checkpoint["model"])
    return net.to(device, memory_format=torch.channels_last).eval()


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
