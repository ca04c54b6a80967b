"""Per-layer gradient statistics, the heart of the study (SPEC.md, Gradient statistics).

For every weight tensor (conv and linear weights, batch-norm scales; no biases) and every epoch:
`mean_abs` (mean |gradient| averaged over the epoch's steps), `last_mean_abs` (of the epoch's last step, the
reference figures' statistic), `grad_l2` (gradient L2 norm averaged over the steps) and `weight_l2` (at the end
of the epoch). Norms are taken with one fused call per step and accumulated on the device; the host reads them
once per epoch, so capture costs no synchronisation inside the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

COLUMNS = ("epoch", "layer", "index", "numel", "mean_abs", "last_mean_abs", "grad_l2", "weight_l2")


def weight_tensors(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(layer name, weight) for every weight tensor, biases excluded, in network order."""
    return [(name.removesuffix(".weight"), p) for name, p in net.named_parameters() if name.endswith(".weight")]


@dataclass(frozen=True)
class GradientRow:
    epoch: int
    layer: str
    index: int
    numel: int
    mean_abs: float
    last_mean_abs: float
    grad_l2: float
    weight_l2: float


class GradientRecorder:
    """Accumulates the statistics of every weight gradient over an epoch; call `after_backward` each step."""

    def __init__(self, net: nn.Module):
        named = weight_tensors(net)
        self.layers = [name for name, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        self.numel = torch.tensor([p.numel() for p in self.params], dtype=torch.float64, device=device)
        self._zero = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.l1_sum = self._zero.clone()
        self.l2_sum = self._zero.clone()
        self.last_l1 = self._zero.clone()
        self.steps = 0

    @torch.no_grad()
    def after_backward(self) -> None:
        grads = [p.grad for p in self.params]
        # A layer whose gradient underflowed to None would break the fused norm: count it as exactly zero.
        if any(g is None for g in grads):
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]
        l1 = torch.stack(torch._foreach_norm(grads, 1)).double()
        l2 = torch.stack(torch._foreach_norm(grads, 2)).double()
        self.l1_sum += l1
        self.l2_sum += l2
        self.last_l1 = l1
        self.steps += 1

    @torch.no_grad()
    def epoch_rows(self, epoch: int) -> list[GradientRow]:
        """The epoch's statistics, read back from the device once; then start a new epoch."""
        if self.steps == 0:
            raise RuntimeError("no training step was recorded in this epoch")
        weight_l2 = torch.stack(torch._foreach_norm([p.detach() for p in self.params], 2)).double()
        table = torch.stack(
            [self.l1_sum / self.numel / self.steps, self.last_l1 / self.numel, self.l2_sum / self.steps, weight_l2]
        ).cpu()
        numel = self.numel.cpu().long().tolist()
        rows = [
            GradientRow(epoch, layer, i, numel[i], *(float(v) for v in table[:, i]))
            for i, layer in enumerate(self.layers)
        ]
        self.reset()
        return rows
