"""Test-set evaluation of a trained run: the best-validation checkpoint (as the reference framework reported)
and the final one, with what their predictions say (vggdepth.metrics)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vggdepth import engine
from vggdepth.batches import DeviceDataset
from vggdepth.checkpoints import CheckpointError, foreign, load_checkpoint, load_network
from vggdepth.config import EvaluateConfig, RuntimeConfig, TrainConfig
from vggdepth.data import PreparedData
from vggdepth.engine import BFLOAT16, resolve_device, training_precision
from vggdepth.files import staging_dir, write_json
from vggdepth.labels import Labels
from vggdepth.metrics import KINDS, Predictions, save_predictions, score, write_tables
from vggdepth.runs import PREDICTIONS, RunFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """`test.json`'s content and the predictions it was computed from."""

    result: dict
    predictions: dict[str, Predictions]

    def write(self, files: RunFiles, labels: Labels, publish: Callable[[Path], object] | None = None) -> None:
        """`predictions.npz`, `per_class.csv`, `superclass_confusion.csv` and last `test.json` into the run folder.
        The tables are made in a staging folder that `publish` (MLflow) gets first; an old `test.json` goes
        before anything moves, so a stage that fails anywhere leaves no `test.json` and is run again whole."""
        files.test_json.unlink(missing_ok=True)
        staging = staging_dir(files.test_json)  # a leftover of test.json's writer: cleaned when the stage starts
        try:
            save_predictions(staging / PREDICTIONS, self.predictions)
            write_tables(staging, self.predictions, labels)
            if publish is not None:
                publish(staging)
            for table in staging.iterdir():
                os.replace(table, files.root / table.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_json(files.test_json, self.result)


def log_probabilities(net: torch.nn.Module, data: DeviceDataset, batch_size: int, autocast: bool) -> np.ndarray:
    """(N, classes) float32 log-softmax of `net` (in eval mode) over `data`, in the data's order."""
    out = [F.log_softmax(logits[0], dim=1).cpu() for logits, _ in engine.predict(net, data, batch_size, autocast)]
    return torch.cat(out).numpy()


def evaluate_run(
    files: RunFiles,
    data: PreparedData,
    labels: Labels,
    train: TrainConfig,
    runtime: RuntimeConfig,
    evaluate: EvaluateConfig,
    fingerprint: str | None = None,
) -> Evaluation:
    """Test metrics of `files`' best and last checkpoints. Writes nothing: the stage writes its outputs once the
    result is safely elsewhere too (see pipeline/evaluate.py). Each checkpoint must be of the run its folder names
    (`<variant>-s<seed>`) and, given `fingerprint` (the run params.yaml describes), of that very run."""
    device = resolve_device(runtime.device)
    test = DeviceDataset(data.test, data.mean, data.std, device)
    autocast = training_precision(device, train.bf16) == BFLOAT16  # as the run's own validation computed
    result, predictions = {}, {}
    for kind, path in zip(KINDS, (files.best, files.last), strict=True):
        try:
            checkpoint = load_checkpoint(path, device)
        except CheckpointError as exc:
            stage = f"train@{files.run[0]}-{files.run[1]}" if files.run else "train"
            raise CheckpointError(
                f"{exc}. Re-run the train stage (`dvc repro {stage}`): it restores the {kind} checkpoint of a "
                "finished run, or trains it"
            ) from None
        _check_identity(path, checkpoint, files, fingerprint)
        classes = checkpoint["model_config"].get("num_classes")
        if classes != len(labels.classes):
            raise CheckpointError(
                f"{path} is a network of {classes} classes, the test set has {len(labels.classes)}: it is not a "
                "checkpoint of this study"
            )
        log_probs = log_probabilities(load_network(checkpoint, device), test, runtime.eval_batch_size, autocast)
        pred = Predictions.from_log_probs(log_probs, data.test.labels, data.test.index, labels, evaluate.top_k)
        epoch = checkpoint["epoch"] - 1  # a checkpoint counts completed epochs; tables number epochs from 0
        metrics = score(pred, labels, evaluate.calibration_bins)
        loss = metrics["test_nll"]  # the mean cross-entropy, from each image's log-probability of its true class
        result[kind] = {"epoch": epoch, "test_loss": loss, **metrics}
        predictions[kind] = pred
        log.info(
            "%s %s checkpoint (epoch %d): test loss %.4f, accuracy %.4f, top-%d %.4f, superclass %.4f, ECE %.4f",
            files.root,
            kind,
            epoch,
            loss,
            metrics["test_acc"],
            evaluate.top_k,
            metrics[evaluate.top_k_metric],
            metrics["test_superclass_acc"],
            metrics["test_ece"],
        )
    result["test_images"] = len(test)
    return Evaluation(result, predictions)


def _check_identity(path: Path, checkpoint: dict, files: RunFiles, fingerprint: str | None) -> None:
    """A checkpoint copied into another run's folder, or left from other settings, is not tested as this run."""
    if why := foreign(checkpoint, files):
        variant, seed = files.run
        raise CheckpointError(
            f"{path} {why}: a run folder holds another run's checkpoints. Restore the folder's own (`dvc checkout "
            f"{files.root}`) or retrain it (`dvc repro train@{variant}-{seed}`)"
        )
    if fingerprint is not None and checkpoint.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was trained with other settings, data or training code than params.yaml and the prepared data "
            f"describe (fingerprint {str(checkpoint.get('fingerprint'))[:20]}, expected {fingerprint}); re-run its "
            "train stage, which sets it aside and trains the run these settings describe"
        )
