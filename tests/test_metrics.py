"""The evaluation's metrics: a prediction set small enough to work out by hand, then real predictions of a trained
network on real test images checked against scikit-learn's own functions on the full probabilities."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    recall_score,
    top_k_accuracy_score,
)

from vggdepth.batches import DeviceDataset
from vggdepth.checkpoints import load_checkpoint, load_network
from vggdepth.engine import BFLOAT16, train_run, training_precision, validate
from vggdepth.evaluation import evaluate_run, log_probabilities
from vggdepth.labels import Labels
from vggdepth.metrics import (
    Predictions,
    expected_calibration_error,
    load_predictions,
    per_class,
    reliability,
    score,
    superclass_confusion,
)
from vggdepth.runs import CONFUSION, PER_CLASS, PREDICTIONS, RunFiles

# ---- by hand -------------------------------------------------------------------------------------------------

# 6 classes in 2 superclasses (0-2: superclass A, 3-5: superclass B), 5 images, top-2.
HAND_LABELS = Labels("0" * 32, [f"c{i}" for i in range(6)], ["A", "B"], np.array([0, 0, 0, 1, 1, 1]))
HAND_PROBS = np.array(
    [
        # true 0, predicted 0 (0.70): right
        [0.70, 0.10, 0.05, 0.05, 0.05, 0.05],
        # true 1, predicted 2 (0.50), 1 second: wrong, in the top 2, superclass right
        [0.05, 0.30, 0.50, 0.05, 0.05, 0.05],
        # true 3, predicted 0 (0.90): wrong, not in the top 2, superclass wrong
        [0.90, 0.02, 0.02, 0.02, 0.02, 0.02],
        # true 4, predicted 4 (0.35): right
        [0.05, 0.05, 0.05, 0.30, 0.35, 0.20],
        # true 5, predicted 3 (0.45), 5 second: wrong, in the top 2, superclass right
        [0.05, 0.05, 0.05, 0.45, 0.05, 0.35],
    ]
)
HAND_FINE = np.array([0, 1, 3, 4, 5])


def hand_predictions() -> Predictions:
    return Predictions.from_log_probs(np.log(HAND_PROBS), HAND_FINE, np.arange(5), HAND_LABELS, k=2)


def test_predictions_keep_the_top_k_their_probabilities_and_the_true_class():
    pred = hand_predictions()
    assert pred.top.tolist() == [[0, 1], [2, 1], [0, 1], [4, 3], [3, 5]]
    np.testing.assert_allclose(pred.top_prob[:, 0], [0.70, 0.50, 0.90, 0.35, 0.45], rtol=1e-6)
    np.testing.assert_allclose(np.exp(pred.logp_true), [0.70, 0.30, 0.02, 0.35, 0.35], rtol=1e-6)
    assert pred.coarse.tolist() == [0, 0, 1, 1, 1]


def test_metrics_of_a_case_worked_out_by_hand():
    pred = hand_predictions()
    bins = 5  # edges 0.2, 0.4, 0.6, 0.8
    metrics = score(pred, HAND_LABELS, bins)
    assert metrics["test_acc"] == pytest.approx(2 / 5)
    assert metrics["test_top2"] == pytest.approx(4 / 5)  # image 3 (true 3, top 0 and 1) is the miss
    # superclass of the prediction: A, A, A (true B), B, B: all but image 3
    assert metrics["test_superclass_acc"] == pytest.approx(4 / 5)
    # confidences 0.35 (right) | 0.45 (wrong), 0.50 (wrong) | 0.70 (right) | 0.90 (wrong), by bin
    # |acc - conf| per bin: |1 - .35| = .65; |0 - .475| = .475 (2 images); |1 - .7| = .3; |0 - .9| = .9
    ece = (0.65 + 2 * 0.475 + 0.30 + 0.90) / 5
    assert metrics["test_ece"] == pytest.approx(ece)
    assert expected_calibration_error(pred, bins) == pytest.approx(ece)
    accuracy, confidence, counts = reliability(pred, bins)
    assert counts.tolist() == [1, 2, 1, 1]
    np.testing.assert_allclose(accuracy, [1, 0, 1, 0])
    np.testing.assert_allclose(confidence, [0.35, 0.475, 0.70, 0.90], rtol=1e-6)
    nll = -np.mean(np.log([0.70, 0.30, 0.02, 0.35, 0.35]))
    assert metrics["test_nll"] == pytest.approx(nll, rel=1e-6)
    # per class (recall = the class's accuracy): 0 right, 1 wrong, 3 wrong, 4 right, 5 wrong; 2 has no image
    rows = per_class(pred, HAND_LABELS)
    assert rows["recall"].tolist() == [1, 0, 0, 0, 1, 0]
    assert rows["support"].tolist() == [1, 1, 0, 1, 1, 1]
    # predicted 0 twice (right once), 2 once (wrong), 3 once (wrong), 4 once (right)
    np.testing.assert_allclose(rows["precision"], [0.5, 0, 0, 0, 1, 0])
    # F1 of class 0: 2 * 0.5 * 1 / 1.5; of class 4: 1; macro over the 6 classes
    assert metrics["test_macro_f1"] == pytest.approx((2 / 3 + 1) / 6)
    # rows true A, B; columns predicted A, B: A -> A twice; B -> A once, B twice
    assert superclass_confusion(pred, HAND_LABELS).tolist() == [[2, 0], [1, 2]]


def test_the_top_confidence_bin_holds_certainty():
    """A probability of exactly 1 falls in the last bin, not outside the diagram."""
    probs = np.array([[1.0, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0]])
    with np.errstate(divide="ignore"):
        pred = Predictions.from_log_probs(np.log(probs), np.array([0, 1]), np.arange(2), HAND_LABELS, k=2)
    _accuracy, confidence, counts = reliability(pred, 15)
    assert counts.tolist() == [1, 1] and confidence.tolist() == [0.5, 1.0]
    assert expected_calibration_error(pred, 15) == pytest.approx(0.25)  # (|0 - .5| + |1 - 1|) / 2


# ---- real predictions ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(params, tiny_data, labels, tmp_path_factory):
    """VGG-08 trained for 2 epochs on 200 real images, evaluated on the 100 real test images, outputs written."""
    p = params.model_copy(
        update={
            "train": params.train.model_copy(update={"epochs": 2}),
            "runtime": params.runtime.model_copy(update={"device": "cpu"}),
            "tracking": params.tracking.model_copy(update={"enabled": False}),
        }
    )
    files = RunFiles(tmp_path_factory.mktemp("metrics") / "VGG-08-s0")
    train_run(p, "VGG-08", 0, tiny_data, files.root)
    evaluation = evaluate_run(files, tiny_data, labels, p.train, p.runtime, p.evaluate)
    evaluation.write(files, labels)
    test = DeviceDataset(tiny_data.test, tiny_data.mean, tiny_data.std, torch.device("cpu"))
    autocast = training_precision(torch.device("cpu"), p.train.bf16) == BFLOAT16  # as evaluate_run computes
    full = {
        kind: log_probabilities(load_network(load_checkpoint(path, "cpu"), torch.device("cpu")), test, 500, autocast)
        for kind, path in (("best", files.best), ("final", files.last))
    }
    return {"params": p, "files": files, "evaluation": evaluation, "full": full, "test": test, "autocast": autocast}


def test_real_metrics_equal_scikit_learns_on_the_full_probabilities(evaluated, tiny_data, labels):
    fine = tiny_data.test.labels.astype(int)
    for kind in ("best", "final"):
        probs = np.exp(evaluated["full"][kind].astype(np.float64))
        probs /= probs.sum(axis=1, keepdims=True)
        result = evaluated["evaluation"].result[kind]
        predicted = probs.argmax(axis=1)
        assert result["test_acc"] == pytest.approx(accuracy_score(fine, predicted))
        assert result["test_top5"] == pytest.approx(top_k_accuracy_score(fine, probs, k=5, labels=range(100)))
        assert result["test_nll"] == pytest.approx(log_loss(fine, probs, labels=range(100)), rel=1e-5)
        assert result["test_loss"] == pytest.approx(result["test_nll"], rel=1e-6)
        coarse = labels.superclass_of[fine]
        assert result["test_superclass_acc"] == pytest.approx(accuracy_score(coarse, labels.superclass_of[predicted]))
        pred = evaluated["evaluation"].predictions[kind]
        matrix = confusion_matrix(coarse, labels.superclass_of[predicted], labels=range(20))
        assert superclass_confusion(pred, labels).tolist() == matrix.tolist()
        macro_f1 = f1_score(fine, predicted, labels=range(100), average="macro", zero_division=0)
        assert result["test_macro_f1"] == pytest.approx(macro_f1)
        recall = recall_score(fine, predicted, labels=range(100), average=None, zero_division=0)
        np.testing.assert_allclose(per_class(pred, labels)["recall"], recall)
        # ECE by its definition, bin by bin, with bins closed on the right as calibration_curve's are
        confidence, correct = probs.max(axis=1), predicted == fine
        edges = np.linspace(0, 1, 16)
        ece = 0.0
        for low, high in itertools.pairwise(edges):
            inside = (confidence > low) & (confidence <= high) if low > 0 else confidence <= high
            if inside.any():
                ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
        assert result["test_ece"] == pytest.approx(ece, abs=1e-6)
    # the test loss is the one the trainer's own evaluation gives
    net = load_network(load_checkpoint(evaluated["files"].best, "cpu"), torch.device("cpu"))
    (loss,), (acc,) = validate(net, evaluated["test"], 500, evaluated["autocast"])
    assert evaluated["evaluation"].result["best"]["test_loss"] == pytest.approx(loss, rel=1e-6)
    assert evaluated["evaluation"].result["best"]["test_acc"] == acc


def test_the_kept_predictions_give_the_same_metrics_without_the_network(evaluated, tiny_data, labels):
    files, bins = evaluated["files"], evaluated["params"].evaluate.calibration_bins
    kept = load_predictions(files.root / PREDICTIONS, len(tiny_data.test))
    assert (kept["best"].index == tiny_data.test.index).all()
    assert (kept["best"].fine == tiny_data.test.labels).all()
    for kind in ("best", "final"):
        assert score(kept[kind], labels, bins) == pytest.approx(
            {
                k: v
                for k, v in evaluated["evaluation"].result[kind].items()
                if k.startswith("test_") and k != "test_loss"
            }
        )
    with open(files.root / PER_CLASS) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and rows[0]["name"] == "apple" and rows[0]["superclass"] == "fruit_and_vegetables"
    accuracy = sum(float(r["accuracy_best"]) * int(r["support"]) for r in rows) / len(tiny_data.test)
    assert accuracy == pytest.approx(evaluated["evaluation"].result["best"]["test_acc"], abs=1e-5)
    with open(files.root / CONFUSION) as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 400 and sum(int(c["count"]) for c in cells) == len(tiny_data.test)
    right = sum(int(c["count"]) for c in cells if c["actual"] == c["predicted"])
    assert right / len(tiny_data.test) == pytest.approx(evaluated["evaluation"].result["best"]["test_superclass_acc"])
    assert (files.root / PREDICTIONS).stat().st_size < 20_000  # 100 images: a few bytes each
    assert not [p for p in files.root.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_archives_superclasses(labels):
    assert len(labels.classes) == 100 and len(labels.superclasses) == 20
    assert np.bincount(labels.superclass_of).tolist() == [5] * 20
    of = dict(zip(labels.classes, (labels.superclasses[c] for c in labels.superclass_of), strict=True))
    assert of["apple"] == "fruit_and_vegetables" and of["whale"] == "aquatic_mammals"
    assert of["maple_tree"] == "trees" and of["tractor"] == "vehicles_2"
    assert math.isclose(len(set(of.values())), 20)


def test_the_evaluate_stage_writes_exactly_the_tables_the_run_folder_lists(evaluated):
    """vggdepth.runs names a run folder's files once, for the writers (evaluate), the lease's packer and
    unpacker, tracking and sync: the evaluate stage writes exactly the evaluation tables it lists."""
    from vggdepth.runs import EVALUATION_TABLES, TEST, TRAINING_TABLES

    written = {p.name for p in evaluated["files"].root.iterdir() if p.is_file()}
    assert written == {*TRAINING_TABLES, TEST, *EVALUATION_TABLES}
