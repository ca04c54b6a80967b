"""The tensor input pipeline: crops stay inside the padded image, flips flip, a seed fixes every batch."""

from __future__ import annotations

import torch

from vggdepth.batches import DeviceDataset, random_crop, random_flip, training_batches

CPU = torch.device("cpu")


def _numbered_images(n: int) -> torch.Tensor:
    """Images whose pixels say where they are: value = 1 + row * 32 + col (as int32, so no wrap-around)."""
    grid = 1 + torch.arange(32).view(32, 1) * 32 + torch.arange(32).view(1, 32)
    return grid.expand(n, 3, 32, 32).clone().int()


def test_random_crop_is_a_window_of_the_zero_padded_image():
    images = _numbered_images(200)
    out = random_crop(images, 4, torch.Generator().manual_seed(0))

    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets = set()
    for i in range(len(out)):
        # The top-left pixel names the window: it is the padded image's pixel at (dy, dx).
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert len(matches) == 1, f"image {i} is not a 32x32 window inside the padding"
        offsets.add(matches[0])
    assert len(offsets) > 40  # offsets spread over the 81 possible windows
    assert (out == 0).any()  # some windows reach into the zero padding


def test_random_flip_mirrors_about_half_the_images():
    images = _numbered_images(400)
    out = random_flip(images, torch.Generator().manual_seed(0))

    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 150 < sum(flipped) < 250


def _epoch(data: DeviceDataset, augment, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(training_batches(data, 64, augment, torch.Generator().manual_seed(seed)))


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(tiny_data, params):
    data = DeviceDataset(tiny_data.train, tiny_data.mean, tiny_data.std, CPU)
    augment = params.train.augment

    first, again, other = _epoch(data, augment, 3), _epoch(data, augment, 3), _epoch(data, augment, 4)

    assert [len(y) for _, y in first] == [64, 64, 64, 8]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][1], other[0][1])


def test_batches_are_normalised_channels_last_and_cover_the_split_once(tiny_data, params):
    data = DeviceDataset(tiny_data.train, tiny_data.mean, tiny_data.std, CPU)
    no_augment = params.train.augment.model_copy(update={"crop_padding": 0, "flip": False})

    batches = _epoch(data, no_augment, 0)
    x = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])

    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert sorted(labels.tolist()) == sorted(tiny_data.train.labels.tolist())
    # Without augmentation, the per-channel mean over all pixels is about 0 on this sample of the split.
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.15
    assert 0.8 < x.std(dim=(0, 2, 3)).mean() < 1.2
