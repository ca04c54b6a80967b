"""Batches from a data set held as one uint8 tensor on the training device; augmentation done per batch.

No per-image Python transforms and no worker processes: shuffling, random crops (zero padding) and flips are
tensor operations on the whole batch, driven by one seeded generator whose state goes into checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from vggdepth.config import AugmentConfig
from vggdepth.data import Split


class DeviceDataset:
    """A split's images (N, 3, 32, 32) uint8 and labels on `device`, with the normalisation to apply."""

    def __init__(self, split: Split, mean: list[float], std: list[float], device: torch.device):
        self.images = torch.from_numpy(split.images).to(device)
        self.labels = torch.from_numpy(split.labels).to(device=device, dtype=torch.long)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, pixels: Tensor) -> Tensor:
        """uint8 pixels -> normalised float32 in channels-last layout (what the convolutions prefer)."""
        x = (pixels.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Evaluation batches in order, no augmentation."""
        for start in range(0, len(self), batch_size):
            yield self.normalise(self.images[start : start + batch_size]), self.labels[start : start + batch_size]


def random_crop(pixels: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Each image cut at its own random offset out of itself zero-padded by `padding` on every side."""
    if padding == 0:
        return pixels
    n, _, h, w = pixels.shape
    padded = torch.nn.functional.pad(pixels, (padding,) * 4)  # zero = black, as torchvision's RandomCrop
    dy, dx = (torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=pixels.device)).unbind(0)
    rows = (dy + torch.arange(h, device=pixels.device)).view(n, 1, h, 1)
    cols = (dx + torch.arange(w, device=pixels.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=pixels.device).view(n, 1, 1, 1)
    channels = torch.arange(pixels.shape[1], device=pixels.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def random_flip(pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(len(pixels), generator=generator, device=pixels.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), pixels.flip(3), pixels)


def training_batches(
    data: DeviceDataset, batch_size: int, augment: AugmentConfig, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled, augmented batches; the last batch may be smaller."""
    order = torch.randperm(len(data), generator=generator, device=data.device)
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        pixels = random_crop(data.images[index], augment.crop_padding, generator)
        if augment.flip:
            pixels = random_flip(pixels, generator)
        yield data.normalise(pixels), data.labels[index]
