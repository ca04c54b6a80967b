"""The logged and registered model as a user calls it: raw CIFAR-style images in, class probabilities by class name
out. An MLflow pyfunc model around a run's best checkpoint (`ImageClassifier`): it takes uint8 images, N x 32 x 32 x
3 (as CIFAR's python archive and most image libraries hold them) or N x 3 x 32 x 32 (as the prepared data does),
normalises them with the run's own channel statistics and returns one row per image, one column per class name.
The checkpoint inside is loaded with `weights_only=True`: loading the model executes no pickle.

    mlflow models serve -m models:/vggdepth-cifar100@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": <N x 32 x 32 x 3 uint8>}'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

SIDE = 32  # CIFAR's images are 32 x 32 pixels, 3 channels
INPUTS = "inputs.json"  # the model's artefact naming its classes and normalisation


class ImageError(ValueError):
    """Images that are not what the model takes."""


def channels_first(images: Any) -> np.ndarray:
    """`images` as an (N, 3, 32, 32) uint8 array: N x 32 x 32 x 3 is transposed, N x 3 x 32 x 32 kept; a clear
    error for any other shape or type (values outside 0..255 are not pixels)."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ImageError(f"images must be uint8 pixels 0..255, got {array.dtype} values")
        array = array.astype(np.uint8)
    if array.ndim == 3:  # one image
        array = array[None]
    if array.ndim == 4 and array.shape[1:] == (SIDE, SIDE, 3):
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    if array.ndim == 4 and array.shape[1:] == (3, SIDE, SIDE):
        return np.ascontiguousarray(array)
    raise ImageError(
        f"images must be N x {SIDE} x {SIDE} x 3 or N x 3 x {SIDE} x {SIDE} uint8, got shape {tuple(array.shape)}"
    )


def class_probabilities(net, images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(N, classes) float64 softmax of `net` (float32, eval mode, CPU) over (N, 3, 32, 32) uint8 `images`, normalised
    exactly as in training and evaluation (vggdepth.batches.DeviceDataset)."""
    import torch

    from vggdepth.batches import DeviceDataset
    from vggdepth.data import Split

    n = len(images)
    split = Split(images, np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))
    data = DeviceDataset(split, mean, std, torch.device("cpu"))
    with torch.inference_mode():
        out = [torch.softmax(net(x).double(), dim=1) for x, _ in data.batches(500)]
    return torch.cat(out).numpy() if out else np.zeros((0, net.head.linear.out_features))


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """A run's best checkpoint as an MLflow model of raw images (see the module's docstring). Artefacts:
    `checkpoint`, the run's `best.pt`; `inputs` (`INPUTS`), what its images are: `classes` (names, in label order),
    `mean` and `std` (the training split's channel statistics, pixels scaled to [0, 1])."""

    def load_context(self, context) -> None:
        import torch

        from vggdepth.checkpoints import load_checkpoint, load_network

        inputs = json.loads(Path(context.artifacts["inputs"]).read_text())
        self.classes, self.mean, self.std = list(inputs["classes"]), list(inputs["mean"]), list(inputs["std"])
        self.net = load_network(load_checkpoint(Path(context.artifacts["checkpoint"])), torch.device("cpu"))

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        probabilities = class_probabilities(self.net, channels_first(model_input), self.mean, self.std)
        return pd.DataFrame(probabilities, columns=self.classes)


def signature(classes: list[str]):
    """Input: uint8 images of any N x H x W x C layout the model accepts (checked when called); output: one
    probability per class name."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
        outputs=Schema([ColSpec("double", name) for name in classes]),
    )


def input_example(images: np.ndarray) -> np.ndarray:
    """Two real test images as a user has them: N x 32 x 32 x 3 uint8."""
    return np.ascontiguousarray(images[:2].transpose(0, 2, 3, 1))
