"""What a run's test predictions say beyond loss and accuracy: top-k and superclass accuracy, per-class precision,
recall and F1, the superclass confusion matrix, calibration (ECE, reliability) and negative log-likelihood.

Everything here is computed from the compact predictions the evaluate stage keeps (`predictions.npz`), so any
later analysis needs no network and no GPU. scikit-learn does the counting where it has the function."""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_path, write_csv
from vggdepth.labels import Labels
from vggdepth.runs import CONFUSION, PER_CLASS

KINDS = ("best", "final")


class PredictionsError(VggdepthError):
    """A predictions file that is missing, damaged, or not of the test set it is read against."""


@dataclass(frozen=True)
class Predictions:
    """One checkpoint's predictions on the test set, per image: its index in the official test set, fine and
    coarse label, the k most probable classes (most probable first), their probabilities, and the natural log of
    the true class's probability (a log: the high-learning-rate variants give probabilities below float32's
    smallest number)."""

    index: np.ndarray  # (N,) int32
    fine: np.ndarray  # (N,) int
    coarse: np.ndarray  # (N,) int
    top: np.ndarray  # (N, k) int
    top_prob: np.ndarray  # (N, k) float32
    logp_true: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return len(self.fine)

    @property
    def predicted(self) -> np.ndarray:
        return self.top[:, 0]

    @property
    def confidence(self) -> np.ndarray:
        """The probability of the predicted class."""
        return self.top_prob[:, 0].astype(np.float64)

    @property
    def correct(self) -> np.ndarray:
        return (self.predicted == self.fine).astype(np.int64)

    @classmethod
    def from_log_probs(
        cls, log_probs: np.ndarray, fine: np.ndarray, index: np.ndarray, labels: Labels, k: int
    ) -> Predictions:
        """From the (N, classes) log-probabilities of a network on the test set."""
        if log_probs.ndim != 2 or log_probs.shape != (len(fine), len(labels.classes)):
            raise PredictionsError(
                f"predictions of shape {log_probs.shape} for {len(fine)} test images of {len(labels.classes)} classes"
            )
        top = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]
        return cls(
            index=index.astype(np.int32),
            fine=fine.astype(np.int64),
            coarse=labels.superclass_of[fine],
            top=top,
            top_prob=np.exp(np.take_along_axis(log_probs, top, axis=1)).astype(np.float32),
            logp_true=log_probs[np.arange(len(fine)), fine].astype(np.float32),
        )


def expected_calibration_error(pred: Predictions, bins: int) -> float:
    """ECE: over `bins` equal-width bins of confidence, the image-weighted mean |accuracy - confidence|.
    The bins are scikit-learn's `calibration_curve` ones (uniform strategy), whose per-bin values it uses."""
    accuracy, confidence, counts = reliability(pred, bins)
    return float(np.sum(counts / counts.sum() * np.abs(accuracy - confidence)))


def reliability(pred: Predictions, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty confidence bin: accuracy, mean confidence, number of images (a reliability diagram)."""
    from sklearn.calibration import calibration_curve

    accuracy, confidence = calibration_curve(pred.correct, pred.confidence, n_bins=bins, pos_label=1)
    # calibration_curve returns the non-empty bins only; its binning, to count the images in each
    counts = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], pred.confidence), minlength=bins)
    return accuracy, confidence, counts[counts > 0]


def superclass_confusion(pred: Predictions, labels: Labels) -> np.ndarray:
    """(20, 20) counts: row the true superclass, column the superclass of the predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(
        pred.coarse, labels.superclass_of[pred.predicted], labels=np.arange(len(labels.superclasses))
    )


def per_class(pred: Predictions, labels: Labels) -> dict[str, np.ndarray]:
    """Per fine class: precision, recall (the class's accuracy), F1 and support (classes never predicted have
    precision 0)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        pred.fine, pred.predicted, labels=np.arange(len(labels.classes)), zero_division=0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def score(pred: Predictions, labels: Labels, bins: int) -> dict[str, float]:
    """The test metrics of one checkpoint (the keys of test.json's `best` and `final`, test_loss aside)."""
    k = pred.top.shape[1]
    return {
        "test_acc": float(pred.correct.mean()),
        f"test_top{k}": float((pred.top == pred.fine[:, None]).any(axis=1).mean()),
        "test_superclass_acc": float((labels.superclass_of[pred.predicted] == pred.coarse).mean()),
        "test_macro_f1": float(per_class(pred, labels)["f1"].mean()),  # over every class, as the macro average is
        "test_ece": expected_calibration_error(pred, bins),
        "test_nll": float(-pred.logp_true.astype(np.float64).mean()),
    }


def save_predictions(path: Path, preds: dict[str, Predictions]) -> None:
    """Both checkpoints' predictions in one compressed file, written atomically: the image index and labels
    once, `<kind>_top`, `<kind>_top_prob` and `<kind>_logp_true` per checkpoint."""
    first = preds[KINDS[0]]
    arrays = {"index": first.index, "fine": first.fine.astype(np.uint8), "coarse": first.coarse.astype(np.uint8)}
    for kind, pred in preds.items():
        arrays |= {f"{kind}_top": pred.top.astype(np.uint8), f"{kind}_top_prob": pred.top_prob}
        arrays[f"{kind}_logp_true"] = pred.logp_true
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_predictions(path: Path, images: int | None = None) -> dict[str, Predictions]:
    """The predictions `save_predictions` wrote; `images`, when given, is the test set's size they must match."""
    remedy = f"re-run the evaluate stage that wrote it (`dvc repro --force` on it, or delete {path})"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except FileNotFoundError:
        raise PredictionsError(f"{path} is missing; {remedy}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise PredictionsError(f"{path} is damaged ({type(exc).__name__}: {exc}); {remedy}") from None
    wanted = ["index", "fine", "coarse", *(f"{k}_{a}" for k in KINDS for a in ("top", "top_prob", "logp_true"))]
    if missing := [name for name in wanted if name not in arrays]:
        raise PredictionsError(f"{path} lacks {', '.join(missing)}; {remedy}")
    n = len(arrays["fine"])
    if images is not None and n != images:
        raise PredictionsError(f"{path} holds {n} images, the test set {images}; {remedy}")
    preds = {}
    for kind in KINDS:
        top, top_prob, logp = (arrays[f"{kind}_{a}"] for a in ("top", "top_prob", "logp_true"))
        shapes_ok = top.ndim == 2 and len(top) == n and top_prob.shape == top.shape and logp.shape == (n,)
        if not shapes_ok or arrays["index"].shape != (n,) or arrays["coarse"].shape != (n,):
            raise PredictionsError(f"{path}: the arrays of {kind!r} do not hold one row per image; {remedy}")
        preds[kind] = Predictions(
            arrays["index"],
            arrays["fine"].astype(np.int64),
            arrays["coarse"].astype(np.int64),
            top.astype(np.int64),
            top_prob,
            logp,
        )
    return preds


def write_tables(root: Path, preds: dict[str, Predictions], labels: Labels) -> None:
    """The run's per-class table (both checkpoints) and superclass confusion counts (best checkpoint), the
    evaluate stage's DVC plots."""
    per_kind = {kind: per_class(pred, labels) for kind, pred in preds.items()}
    columns = ["class", "name", "superclass", "support"]
    columns += [f"{m}_{kind}" for kind in KINDS for m in ("accuracy", "precision", "f1")]
    rows = []
    for c, name in enumerate(labels.classes):
        row = [c, name, labels.superclasses[labels.superclass_of[c]], int(per_kind["best"]["support"][c])]
        for kind in KINDS:
            row += [_round(per_kind[kind][m][c]) for m in ("recall", "precision", "f1")]
        rows.append(row)
    write_csv(root / PER_CLASS, columns, rows)
    matrix = superclass_confusion(preds["best"], labels)
    names = labels.superclasses
    write_csv(
        root / CONFUSION,
        ("actual", "predicted", "count"),
        [[names[a], names[p], int(matrix[a, p])] for a in range(len(names)) for p in range(len(names))],
    )


def _round(value: float) -> float:
    return round(float(value), 6) if math.isfinite(value) else value
