"""CIFAR-100 from the python archive to compact uint8 arrays: split, reduce, normalisation statistics."""

from __future__ import annotations

import json
import logging
import math
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggdepth.config import PrepareConfig
from vggdepth.download import md5sum
from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_dir, ready_to_write
from vggdepth.schemas import RecordError, StatsRecord, check_file, read_record

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SHAPE = (3, 32, 32)
STATS_FILE = "stats.json"


class PrepareError(VggdepthError):
    """The archive or the prepared data is not what the pipeline expects."""


@dataclass(frozen=True)
class Split:
    """Images (N, 3, 32, 32) uint8, fine labels (N,) uint8, and each image's position in its official set."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> Split:
        return Split(self.images[rows], self.labels[rows], self.index[rows])


@dataclass(frozen=True)
class PreparedData:
    """The output of the prepare stage, loaded: the three splits and `stats.json`."""

    train: Split
    val: Split
    test: Split
    stats: dict

    @property
    def mean(self) -> list[float]:
        return self.stats["mean"]

    @property
    def std(self) -> list[float]:
        return self.stats["std"]

    @property
    def classes(self) -> list[str]:
        return self.stats["classes"]


def read_archive(path: str | Path) -> tuple[Split, Split, list[str]]:
    """The official train and test sets and the fine class names, read from the python archive's pickles."""
    wanted = {"train", "test", "meta"}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:  # one pass: a gzip stream is slow to seek backwards
                name = Path(member.name).name
                if member.isfile() and name in wanted and Path(member.name).parent.name == "cifar-100-python":
                    found[name] = pickle.load(tar.extractfile(member), encoding="latin1")  # noqa: S301 (md5-verified)
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise PrepareError(f"cannot read {path} as the CIFAR-100 python archive (.tar.gz): {exc}") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise PrepareError(
            f"{path} has no cifar-100-python/{', cifar-100-python/'.join(missing)}: is it the CIFAR-100 python archive?"
        )
    classes = list(found["meta"].get("fine_label_names", []))
    if len(classes) != 100:
        raise PrepareError(f"{path}: meta lists {len(classes)} fine class names, expected 100")
    return _split_from_pickle(found["train"], "train"), _split_from_pickle(found["test"], "test"), classes


def _split_from_pickle(batch: dict, name: str) -> Split:
    data = np.asarray(batch.get("data"))
    labels = np.asarray(batch.get("fine_labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(IMAGE_SHAPE):
        raise PrepareError(f"cifar-100-python/{name}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),) or labels.min() < 0 or labels.max() > 99:
        raise PrepareError(f"cifar-100-python/{name}: 'fine_labels' must hold one label in 0..99 per image")
    # The pickles store each image as 3 planes of 32x32 (CHW), which is the layout the network takes.
    return Split(data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.uint8), np.arange(len(data), dtype=np.int32))


def split_train_val(full: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Stratified split of the official training set: the same `seed` always gives the same split."""
    num_classes = len(np.unique(full.labels))
    if not num_classes <= val_size <= len(full) - num_classes:
        raise PrepareError(
            f"prepare.val_size: {val_size} cannot be split stratified from {len(full)} images of "
            f"{num_classes} classes; use a value between {num_classes} and {len(full) - num_classes}"
        )
    # Imported here: scikit-learn takes a second to import, and only the prepare stage splits (not the many
    # processes that load prepared data: train, evaluate, grid workers).
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(
        np.arange(len(full)), test_size=val_size, random_state=seed, stratify=full.labels
    )
    return full.take(np.sort(train_idx)), full.take(np.sort(val_idx))


def take_per_class(split: Split, per_class: int, seed: int, *, field: str) -> Split:
    """A class-balanced subset: `per_class` images of every class, chosen at random by `seed`."""
    order = np.random.default_rng(seed).permutation(len(split))
    keep = []
    for label in np.unique(split.labels):
        of_class = order[split.labels[order] == label]
        if len(of_class) < per_class:
            raise PrepareError(
                f"{field}: asked for {per_class} images per class, but class {label} has only {len(of_class)}"
            )
        keep.append(of_class[:per_class])
    return split.take(np.sort(np.concatenate(keep)))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and (population) std of uint8 images (N, C, H, W), scaled to [0, 1]: the same to the
    last bit on every machine. A 256-bin histogram's moments are summed in integers (exact); the mean is their
    correctly rounded quotient, the std the IEEE square root of the correctly rounded variance (both operations
    are exactly specified). A float dot product would not do: its order of summation is the CPU's BLAS kernel's,
    so its last bit differs between an AVX2 and an AVX-512 machine, and with it every run's fingerprint
    (engine.run_fingerprint), which would set a study's checkpoints aside on the next machine."""
    levels = np.arange(256, dtype=np.int64)
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = np.bincount(images[:, channel].ravel(), minlength=256).astype(np.int64)
        n, total, squares = int(counts.sum()), int(counts @ levels), int(counts @ levels**2)
        means.append(total / (255 * n))  # Python's int / int: the exact quotient, rounded once
        # n^2 * 255^2 * variance = n * sum(x^2) - (sum x)^2, exact in integers
        stds.append(math.sqrt((n * squares - total * total) / (n * n * 255 * 255)))
    return means, stds


def prepare(archive: str | Path, out_dir: str | Path, cfg: PrepareConfig) -> dict:
    """Write train/val/test `.npz` arrays and `stats.json` to `out_dir`, atomically; return the stats."""
    archive, out_dir = Path(archive), Path(out_dir)
    ready_to_write(out_dir)
    official_train, test, classes = read_archive(archive)
    train, val = split_train_val(official_train, cfg.val_size, cfg.split_seed)
    # Normalisation comes from the whole training split, so reduced runs normalise exactly as full ones do.
    mean, std = channel_stats(train.images)
    stats_images = len(train)
    splits = {"train": train, "val": val, "test": test}
    for name in SPLITS:
        per_class = getattr(cfg.subset, name)
        if per_class is not None:
            splits[name] = take_per_class(splits[name], per_class, cfg.split_seed, field=f"prepare.subset.{name}")
    stats = {
        "archive_md5": md5sum(archive),
        "split_seed": cfg.split_seed,
        "sizes": {name: len(split) for name, split in splits.items()},
        "subset": cfg.subset.model_dump(),
        "mean": mean,
        "std": std,
        "stats_images": stats_images,
        "classes": classes,
    }
    _write(out_dir, splits, stats)
    log.info(
        "prepared %s: train/val/test %s; mean %s std %s",
        out_dir,
        "/".join(f"{len(s):,}" for s in splits.values()),
        _fmt(mean),
        _fmt(std),
    )
    return stats


def write_prepared(out_dir: Path, data: PreparedData) -> None:
    """`data` into `out_dir` in the prepare stage's form (what `load_prepared` reads), atomically."""
    _write(out_dir, {name: getattr(data, name) for name in SPLITS}, data.stats)


def _write(out_dir: Path, splits: dict[str, Split], stats: dict) -> None:
    with atomic_dir(out_dir) as staging:
        try:
            for name, split in splits.items():
                np.savez(staging / f"{name}.npz", images=split.images, labels=split.labels, index=split.index)
            (staging / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        except OSError as exc:
            raise PrepareError(f"cannot write the prepared data to {out_dir}: {exc.strerror or exc}") from None


MAX_SPLIT_BYTES = 1 << 30  # the 47,500 training images are 146 MB


def load_prepared(out_dir: str | Path) -> PreparedData:
    """Read what `prepare` wrote; a clear error naming the file when something is missing, damaged or does not
    fit (shapes, label range, split sizes)."""
    out_dir = Path(out_dir)
    remedy = "run `dvc repro prepare` (or `dvc checkout data/prepared`) to make it again"
    try:
        stats = read_record(out_dir / STATS_FILE, StatsRecord, remedy).model_dump(mode="json")
    except RecordError as exc:
        raise PrepareError(str(exc)) from None
    classes = stats["classes"]
    splits = {}
    for name in SPLITS:
        path = out_dir / f"{name}.npz"
        try:
            check_file(path, remedy, MAX_SPLIT_BYTES)
        except RecordError as exc:
            raise PrepareError(f"no usable prepared data: {exc}") from None
        try:
            with np.load(path, allow_pickle=False) as arrays:
                split = Split(arrays["images"], arrays["labels"], arrays["index"])
        except FileNotFoundError:
            raise PrepareError(f"no prepared data: {path} is missing; {remedy}") from None
        except Exception as exc:  # a damaged zip, a missing array, a truncated member: numpy raises many kinds
            raise PrepareError(f"{path} is damaged ({type(exc).__name__}: {exc}); {remedy}") from None
        problem = _split_problem(split, len(classes))
        if problem is None and stats["sizes"].get(name) != len(split):
            problem = f"holds {len(split)} images, {STATS_FILE} says {stats['sizes'].get(name)}"
        if problem:
            raise PrepareError(f"{path} {problem}; {remedy}")
        splits[name] = split
    return PreparedData(stats=stats, **splits)


def _split_problem(split: Split, classes: int) -> str | None:
    """What is wrong with a loaded split, or None."""
    if split.images.dtype != np.uint8 or split.images.ndim != 4 or split.images.shape[1:] != IMAGE_SHAPE:
        return f"has images {split.images.dtype} {split.images.shape}, expected uint8 (N, 3, 32, 32)"
    if split.labels.shape != (len(split.images),) or split.index.shape != (len(split.images),):
        return f"has {len(split.images)} images but {len(split.labels)} labels and {len(split.index)} indices"
    if len(split) == 0:
        return "is empty"
    if split.labels.dtype.kind not in "iu" or split.index.dtype.kind not in "iu":
        return f"has labels {split.labels.dtype} and indices {split.index.dtype}, expected whole numbers"
    if split.labels.min() < 0 or split.labels.max() >= classes:
        return f"has labels outside 0..{classes - 1} (the classes of {STATS_FILE})"
    return None


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
