"""Training throughput, measured one way for every caller: the grid's probe, the GPU lease's table and the
benchmarks all time `StepLoop.train_epoch` of a real trainer (a run alone, or several runs fused) over a few
batches, after a warm-up pass over the same batches. So what is timed is the step that trains the study, gradient
statistics, augmentation and (on CUDA) the CUDA graph included, never a copy of it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vggdepth.config import Params
from vggdepth.data import PreparedData, Split
from vggdepth.engine import StepLoop, make_trainer
from vggdepth.fused import FusedTrainer


@dataclass(frozen=True)
class Timing:
    """One timed epoch: its training images (all runs together), when it started and ended (wall clock, so that
    processes timed together can be summed over their common span), and whether the step was a CUDA graph."""

    images: int
    started: float
    ended: float
    graphed: bool

    @property
    def speed(self) -> float:
        """Training images per second, all runs together."""
        return self.images / (self.ended - self.started)


def synthetic_data(params: Params, variant: str, steps: int, seed: int = 0) -> PreparedData:
    """Random pixels and labels for `steps` full batches of `variant` (a speed depends on shapes, not content), with
    the statistics a prepared data set has."""
    rng = np.random.default_rng(seed)
    n = steps * params.variants[variant].batch_size

    def split(count: int) -> Split:
        images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, params.model.num_classes, count).astype(np.uint8)
        return Split(images, labels, np.arange(count, dtype=np.int32))

    stats = {
        "archive_md5": "synthetic",
        "split_seed": 0,
        "sizes": {"train": n, "val": 1, "test": 1},
        "subset": None,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "classes": [f"class{i}" for i in range(params.model.num_classes)],
    }
    return PreparedData(train=split(n), val=split(1), test=split(1), stats=stats)


def first_batches(params: Params, variant: str, data: PreparedData, steps: int) -> PreparedData:
    """`data` with only the training images of its first `steps` batches of `variant`: a timed epoch."""
    n = min(len(data.train), steps * params.variants[variant].batch_size)
    return PreparedData(train=data.train.take(np.arange(n)), val=data.val, test=data.test, stats=data.stats)


def training_loop(
    params: Params, runs: Sequence[tuple[str, int]], data: PreparedData, workdir: Path, *, fused: bool | None = None
) -> StepLoop:
    """The trainer of `runs`, run folders under `workdir`: `fused` (several runs, or one with a CUDA graph on a GPU)
    or one run alone; by default as the grid trains them (vggdepth.grid.train_group)."""
    trainers = [make_trainer(params, v, s, data, workdir / f"{v}-s{s}") for v, s in runs]
    if fused is None:
        fused = len(trainers) > 1 or (trainers[0].device.type == "cuda" and params.runtime.cuda_graphs)
    if not fused and len(trainers) > 1:
        raise ValueError("several runs train together only fused")
    return FusedTrainer(trainers) if fused else trainers[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epoch(loop: StepLoop, ready: Callable[[], object] | None = None) -> Timing:
    """Begin the loop's runs (fresh, or restored), take one warm-up epoch (allocations, kernel choice, the CUDA
    graph's capture), call `ready` (e.g. a barrier of processes timed together), then time one epoch. The NaN guard
    is off: this times steps, it trains no run."""
    loop.begin()
    loop.start_epoch()
    device = loop.device
    with tqdm(total=0, disable=True) as bar:  # no bar: the timing is the output
        # A speed, not a run: a loss that diverges on random pixels (a variant with a huge learning rate) is timed
        # like any other, not stopped by the NaN guard.
        loop.train_epoch(0, bar, guard=False)
        _sync(device)
        if ready is not None:
            ready()
        started = time.time()
        loop.train_epoch(1, bar, guard=False)
        _sync(device)
        ended = time.time()
    runs = getattr(loop, "k", 1)
    return Timing(runs * len(loop.train_data), started, ended, getattr(loop, "graph", None) is not None)


def speed_of(
    params: Params, runs: Sequence[tuple[str, int]], data: PreparedData, ready=None, *, fused: bool | None = None
) -> Timing:
    """`time_epoch` of `runs` (`training_loop`) on `data`, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="vggdepth-throughput-") as tmp:
        return time_epoch(training_loop(params, runs, data, Path(tmp), fused=fused), ready)
