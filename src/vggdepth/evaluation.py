"""Test-set evaluation of a trained run: the best-validation checkpoint (as the reference framework reported)
and the final one."""

from __future__ import annotations

import logging

from vggdepth.batches import DeviceDataset
from vggdepth.config import RuntimeConfig, TrainConfig
from vggdepth.data import PreparedData
from vggdepth.engine import CheckpointError, RunFiles, evaluate_model, load_checkpoint, load_network, resolve_device

log = logging.getLogger(__name__)


def evaluate_run(files: RunFiles, data: PreparedData, train: TrainConfig, runtime: RuntimeConfig) -> dict:
    """Test loss and accuracy of `files`' best and last checkpoints. Writes nothing: the stage writes
    `test.json` once the result is safely elsewhere too (see pipeline/evaluate.py)."""
    device = resolve_device(runtime.device)
    test = DeviceDataset(data.test, data.mean, data.std, device)
    autocast = device.type == "cuda" and train.bf16
    result = {}
    for kind, path in (("best", files.best), ("final", files.last)):
        try:
            checkpoint = load_checkpoint(path, device)
        except CheckpointError as exc:
            variant, _, seed = files.root.name.rpartition("-s")
            stage = f"train@{variant}-{seed}" if variant else "train"
            raise CheckpointError(
                f"{exc}. Re-run the train stage (`dvc repro {stage}`): it restores the {kind} checkpoint of a "
                "finished run, or trains it"
            ) from None
        loss, acc = evaluate_model(load_network(checkpoint, device), test, runtime.eval_batch_size, autocast)
        epoch = checkpoint["epoch"] - 1  # a checkpoint counts completed epochs; tables number epochs from 0
        result[kind] = {"epoch": epoch, "test_loss": loss, "test_acc": acc}
        log.info("%s %s checkpoint (epoch %d): test loss %.4f, accuracy %.4f", files.root, kind, epoch, loss, acc)
    result["test_images"] = len(test)
    return result
