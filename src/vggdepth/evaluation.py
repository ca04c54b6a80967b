"""Test-set evaluation of a trained run: the best-validation checkpoint (as the reference framework reported)
and the final one."""

from __future__ import annotations

import logging

from vggdepth.batches import DeviceDataset
from vggdepth.config import TrainConfig
from vggdepth.data import PreparedData
from vggdepth.engine import RunFiles, TrainingError, evaluate_model, load_checkpoint, load_network, resolve_device
from vggdepth.files import write_json

log = logging.getLogger(__name__)


def evaluate_run(files: RunFiles, data: PreparedData, train: TrainConfig) -> dict:
    """Test loss and accuracy of `files`' best and last checkpoints; written to `files.test_json`."""
    device = resolve_device(train.device)
    test = DeviceDataset(data.test, data.mean, data.std, device)
    autocast = device.type == "cuda" and train.bf16
    result = {}
    for kind, path in (("best", files.best), ("final", files.last)):
        if not path.exists():
            raise TrainingError(f"no {kind} checkpoint at {path}; run the train stage first")
        checkpoint = load_checkpoint(path, device)
        loss, acc = evaluate_model(load_network(checkpoint, device), test, train.eval_batch_size, autocast)
        epoch = checkpoint["epoch"] - 1  # a checkpoint counts completed epochs; tables number epochs from 0
        result[kind] = {"epoch": epoch, "test_loss": loss, "test_acc": acc}
        log.info(
            "%s %s checkpoint (epoch %d): test loss %.4f, accuracy %.4f",
            files.root,
            kind,
            epoch,
            loss,
            acc,
        )
    result["test_images"] = len(test)
    write_json(files.test_json, result)
    return result
