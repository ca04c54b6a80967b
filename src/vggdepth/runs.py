"""A run and its folder, `runs/<variant>-s<seed>/`: the one list of the files a (variant, seed) keeps, what one
epoch measured, what a watcher of training (`Callback`) learns, and where a run trains. No torch and no tracking
here: the report, the lease's unpacker and `sync` read run folders without the training code.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vggdepth.gradients import GradientRow

# Every file of a run folder, relative to it.
EPOCHS, GRADIENTS, TRAIN, TEST = "epochs.csv", "gradients.csv", "train.json", "test.json"
PREDICTIONS = "predictions.npz"  # per test image and checkpoint: top-k classes, their probabilities, log p(true)
PER_CLASS = "per_class.csv"  # per fine class: support, precision, recall (= accuracy), F1 of both checkpoints
CONFUSION = "superclass_confusion.csv"  # best checkpoint: actual, predicted, count (every pair, zeros too)
CHECKPOINTS = "checkpoints"
BEST, LAST, PREVIOUS = f"{CHECKPOINTS}/best.pt", f"{CHECKPOINTS}/last.pt", f"{CHECKPOINTS}/previous.pt"

TRAINING_TABLES = (EPOCHS, GRADIENTS, TRAIN)  # what the train stage writes beside the checkpoints
EVALUATION_TABLES = (PREDICTIONS, PER_CLASS, CONFUSION)  # what the evaluate stage writes beside test.json
TABLES = (*TRAINING_TABLES, TEST, *EVALUATION_TABLES)  # a finished run, checkpoints aside: what a lease brings home
# What a run writes while it trains, in the order it writes them after an epoch: a copy made in this order (the
# grid's recorder) is always a state training resumes from (a best.pt newer than last.pt is rebuilt from last.pt;
# a missing last.pt falls back to previous.pt: vggdepth.checkpoints).
TRAINING_FILES = (BEST, PREVIOUS, LAST, *TRAINING_TABLES)


@dataclass(frozen=True)
class RunFiles:
    """Where one (variant, seed) keeps its outputs."""

    root: Path

    @classmethod
    def of(cls, runs: Path, variant: str, seed: int) -> RunFiles:
        """The folder of (variant, seed) under `runs`: dvc.yaml's `runs/<variant>-s<seed>`."""
        return cls(runs / run_name(variant, seed))

    def __truediv__(self, relative: str) -> Path:
        return self.root / relative

    @property
    def epochs_csv(self) -> Path:
        return self / EPOCHS

    @property
    def gradients_csv(self) -> Path:
        return self / GRADIENTS

    @property
    def train_json(self) -> Path:
        return self / TRAIN

    @property
    def test_json(self) -> Path:
        return self / TEST

    @property
    def checkpoints(self) -> Path:
        return self / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self / LAST

    @property
    def best(self) -> Path:
        return self / BEST

    @property
    def previous(self) -> Path:
        """The last checkpoint before the newest one: what a damaged `last.pt` falls back to."""
        return self / PREVIOUS

    @property
    def run(self) -> tuple[str, int] | None:
        """(variant, seed) its name says (`parse_run_name`), or None."""
        return parse_run_name(self.root.name)

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file the train stage writes, checkpoints aside."""
        return tuple(self / name for name in TRAINING_TABLES)


def run_name(variant: str, seed: int) -> str:
    """`<variant>-s<seed>`: a run's folder, its MLflow run and its line in every plan."""
    return f"{variant}-s{seed}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """(variant, seed) of a run's name `<variant>-s<seed>`; None for any other name."""
    variant, _, seed = name.rpartition("-s")
    return (variant, int(seed)) if variant and seed.isdigit() else None


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


def this_node() -> str:
    """Where this process runs: the host name, and the Ray node inside a Ray worker (several nodes may share a
    host); kept with every checkpoint, so a run's outputs say where its newest epoch was trained."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{host} (ray node {ray.get_runtime_context().get_node_id()[:12]})"
    return host


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
    precision: str = "float32"  # what it computes in (engine.training_precision), or what it was trained in
    extra: dict = field(default_factory=dict)  # kept in checkpoints: a callback may store its own state here
    history: list[EpochRecord] = field(default_factory=list)  # every epoch so far, restored ones included
    gradients: list[GradientRow] = field(default_factory=list)

    @property
    def name(self) -> str:
        return run_name(self.variant, self.seed)


class Callback:
    """Hook points of the training loop; every method is optional. The loop calls no tracking API: whatever
    watches a run (MLflow, the grid's relay, a deadline, tests) subscribes through this."""

    def on_run_start(self, run: RunInfo) -> None: ...

    def on_epoch_end(self, run: RunInfo, record: EpochRecord, gradients: list[GradientRow]) -> None: ...

    def on_run_end(self, run: RunInfo, summary: dict) -> None: ...

    def on_run_error(self, run: RunInfo, error: BaseException) -> None: ...
