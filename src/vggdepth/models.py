"""The VGG-style networks of the study (SPEC.md, The network), readable against the spec in one screen.

entry:     conv 3->w (no bias) -> BN -> LeakyReLU                          (BN in every variant)
processing: conv (no bias) -> [BN] -> LeakyReLU -> conv (no bias) -> [BN] -> LeakyReLU   [+ input: residual]
reduction:  conv (bias) -> [BN] -> LeakyReLU -> avgpool 2x2 -> conv (bias) -> [BN] -> LeakyReLU
stage:      N processing blocks, then one reduction block; `stages` of them (32 -> 16 -> 8 -> 4 pixels)
head:       global average pool -> linear w->classes (bias)

Module names are structural (`entry.conv`, `stage0.block1.conv0`, `stage2.reduce.bn1`, `head.linear`): they are
the layer names of every gradient table, plot and metric.
"""

from __future__ import annotations

from torch import Tensor, nn

from vggdepth.config import ModelConfig, Variant


class EntryBlock(nn.Module):
    def __init__(self, width: int, slope: float):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def _conv_units(block: nn.Module, width: int, slope: float, batch_norm: bool, bias: bool, index: int) -> None:
    """Add conv -> [BN] -> LeakyReLU to `block` as `conv{index}`, `bn{index}`, `act{index}`."""
    block.add_module(f"conv{index}", nn.Conv2d(width, width, 3, padding=1, bias=bias))
    if batch_norm:
        block.add_module(f"bn{index}", nn.BatchNorm2d(width))
    block.add_module(f"act{index}", nn.LeakyReLU(slope))


class ProcessingBlock(nn.Sequential):
    def __init__(self, width: int, slope: float, batch_norm: bool, residual: bool = False):
        super().__init__()
        for i in range(2):
            _conv_units(self, width, slope, batch_norm, bias=False, index=i)
        self.residual = residual  # an identity shortcut: no parameters, module names unchanged

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return x + out if self.residual else out


class ReductionBlock(nn.Sequential):
    def __init__(self, width: int, slope: float, batch_norm: bool):
        super().__init__()
        _conv_units(self, width, slope, batch_norm, bias=True, index=0)
        self.add_module("pool", nn.AvgPool2d(2))
        _conv_units(self, width, slope, batch_norm, bias=True, index=1)


class Stage(nn.Sequential):
    def __init__(self, variant: Variant, width: int, slope: float):
        super().__init__()
        bn = variant.batch_norm
        for i in range(variant.blocks_per_stage):
            self.add_module(f"block{i}", ProcessingBlock(width, slope, bn, variant.residual))
        self.add_module("reduce", ReductionBlock(width, slope, bn))  # changes the shape: no shortcut


class Head(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class VGG(nn.Sequential):
    """The network of one Table-1 row, with PyTorch's default initialisation."""

    def __init__(self, model: ModelConfig, variant: Variant):
        super().__init__()
        w, slope = model.width, model.negative_slope
        self.add_module("entry", EntryBlock(w, slope))
        for s in range(model.stages):
            self.add_module(f"stage{s}", Stage(variant, w, slope))
        self.add_module("head", Head(w, model.num_classes))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
