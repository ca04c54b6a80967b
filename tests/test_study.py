"""The study's central claim, on real CIFAR-100 images: VGG-38's gradients vanish, batch norm restores them."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from vggdepth.batches import DeviceDataset
from vggdepth.engine import Trainer, seed_everything
from vggdepth.gradients import GradientRecorder
from vggdepth.models import VGG
from vggdepth.runs import RunFiles

CHANCE_LOSS = math.log(100)


def _entry_gradient_at_init(params, data, variant: str) -> float:
    seed_everything(0)
    net = VGG(params.model, params.variant(variant)).train()
    batch = DeviceDataset(data.train, data.mean, data.std, torch.device("cpu"))
    x, y = next(batch.batches(100))
    recorder = GradientRecorder(net)
    F.cross_entropy(net(x), y).backward()
    recorder.after_backward()
    return next(r.mean_abs for r in recorder.epoch_rows(0) if r.layer == "entry.conv")


def test_vgg38_without_bn_has_vanishing_entry_gradient_at_init(params, small_data):
    vgg08 = _entry_gradient_at_init(params, small_data, "VGG-08")
    vgg38 = _entry_gradient_at_init(params, small_data, "VGG-38")
    bn38 = _entry_gradient_at_init(params, small_data, "BN-VGG-38")

    assert vgg38 < 1e-12, vgg38
    assert vgg08 > 1e-7, vgg08
    assert bn38 > 1e-3, bn38


def _train_losses(params, data, quick_train, tmp_path, variant: str) -> list[float]:
    Trainer(
        model=params.model,
        train=quick_train(epochs=10),
        runtime=params.runtime.model_copy(update={"device": "cpu", "progress_every": 5}),
        variant_name=variant,
        variant=params.variant(variant),
        seed=0,
        data=data,
        files=RunFiles(tmp_path / variant),
    ).fit()
    with open(tmp_path / variant / "epochs.csv") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_vgg08_learns_while_vgg38_stays_at_chance(params, small_data, quick_train, tmp_path):
    vgg08 = _train_losses(params, small_data, quick_train, tmp_path, "VGG-08")
    vgg38 = _train_losses(params, small_data, quick_train, tmp_path, "VGG-38")
    print(
        f"train loss over 10 epochs: VGG-08 {vgg08[0]:.3f} -> {vgg08[-1]:.3f}, VGG-38 {vgg38[0]:.3f} -> {vgg38[-1]:.3f}"
    )

    assert vgg08[-1] <= vgg08[0] - 0.1
    assert vgg08[-1] <= CHANCE_LOSS - 0.1
    assert all(abs(loss - CHANCE_LOSS) <= 0.02 for loss in vgg38), vgg38
