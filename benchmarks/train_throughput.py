"""Training throughput of vggdepth's loop against a typical course-code loop, side by side in one run.

For VGG-08, VGG-38 and BN-VGG-38 it measures images per second of training steps:
  ours         the production loop (`Trainer.train_epoch`): uint8 data on the device, batched crops and flips,
               channels-last, no host sync but the progress bar's; in float32 with per-layer gradient capture on
               and off, and in bfloat16 autocast (`train.bf16`, where this CPU computes bfloat16) with capture on;
  baseline     torchvision-style data set with per-image PIL `transforms`, a `DataLoader`, NCHW tensors, and
               `.item()` on loss and accuracy every step (float32).
It also measures this machine's float32 and bfloat16 matrix-multiply throughput (`torch.mm`, 4096 x 4096) as the
ceilings for each precision's training FLOP/s. Configurations are interleaved over several rounds and the median is
reported.

    python benchmarks/train_throughput.py [--threads 2] [--images 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vggdepth.config import load_params
from vggdepth.data import PreparedData, Split
from vggdepth.engine import cpu_computes_bf16
from vggdepth.gradients import GradientRecorder
from vggdepth.models import VGG
from vggdepth.throughput import speed_of, synthetic_data

NETWORKS = ("VGG-08", "VGG-38", "BN-VGG-38")
ROOT = Path(__file__).resolve().parents[1]


def ours(params, variant: str, images: int, grad_stats: bool, bf16: bool) -> float:
    """Images per second of one epoch of the production training loop (vggdepth.throughput: the harness the grid's
    probe and the GPU lease time with), over random pixels."""
    train = params.train.model_copy(update={"grad_stats": grad_stats, "bf16": bf16})
    runtime = params.runtime.model_copy(update={"device": "cpu", "threads": 0})
    params = params.model_copy(update={"train": train, "runtime": runtime})
    steps = -(-images // params.variant(variant).batch_size)
    return speed_of(params, [(variant, 0)], synthetic_data(params, variant, steps), fused=False).speed


class CifarStyleDataset(Dataset):
    """What course code does: one PIL image per item, torchvision transforms per image."""

    def __init__(self, split: Split, mean, std):
        self.images = split.images.transpose(0, 2, 3, 1)  # HWC for PIL
        self.labels = split.labels.astype(np.int64)
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline(params, variant: str, data: PreparedData, workers: int) -> float:
    """Images per second of a typical course-code training epoch."""
    torch.manual_seed(0)
    v = params.variant(variant)
    net = VGG(params.model, v).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=v.lr)
    loader = DataLoader(
        CifarStyleDataset(data.train, data.mean, data.std), batch_size=v.batch_size, shuffle=True, num_workers=workers
    )

    def epoch() -> None:
        total_loss = total_acc = 0.0
        for x, y in loader:
            out = net(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            total_acc += (out.argmax(1) == y).float().mean().item()

    epoch()  # warm-up
    started = time.perf_counter()
    epoch()
    return len(data.train) / (time.perf_counter() - started)


def capture_ms_per_step(params, variant: str, steps: int = 200) -> float:
    """Milliseconds one `GradientRecorder.after_backward` adds to a step, timed directly (no epoch-to-epoch noise)."""
    torch.manual_seed(0)
    net = VGG(params.model, params.variant(variant)).to(memory_format=torch.channels_last)
    x = torch.randn(params.variant(variant).batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(net(x), torch.randint(0, 100, (len(x),))).backward()
    recorder = GradientRecorder(net)
    for _ in range(10):
        recorder.after_backward()
    started = time.perf_counter()
    for _ in range(steps):
        recorder.after_backward()
    return (time.perf_counter() - started) / steps * 1e3


def matmul_gflops(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def training_gflop_per_image(net: nn.Module) -> float:
    """Multiply-adds of every conv and linear layer for one 32x32 image, x2 for FLOP, x3 for forward+backward."""
    macs = []

    def count(module, inputs, output):
        weight = module.weight
        per_output = weight[0].numel()  # in_channels/groups * kh * kw, or in_features
        macs.append(output[0].numel() * per_output)

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return 3 * 2 * sum(macs) / 1e9


KINDS = ("float32, capture on", "float32, capture off", "bf16, capture on", "baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    parser.add_argument("--images", type=int, default=3000, help="images per measured epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes of the baseline")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    data = synthetic_data(params, NETWORKS[0], -(-args.images // params.variant(NETWORKS[0]).batch_size))  # baseline
    configs = [(net, kind) for net in NETWORKS for kind in KINDS]
    results: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    ceilings: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for r in range(args.rounds):
        for dtype, measured in ceilings.items():
            measured.append(matmul_gflops(dtype))
        for net, kind in configs:
            if kind == "baseline":
                ips = baseline(params, net, data, args.workers)
            else:
                ips = ours(params, net, args.images, "capture on" in kind, kind.startswith("bf16"))
            results[(net, kind)].append(ips)
            print(f"  round {r + 1}/{args.rounds} {net:10s} {kind:20s} {ips:7.1f} img/s", flush=True)

    med = {c: statistics.median(v) for c, v in results.items()}
    mm32, mm16 = (statistics.median(ceilings[d]) for d in (torch.float32, torch.bfloat16))
    bf16 = "bfloat16 autocast" if cpu_computes_bf16() else "float32: this CPU has no bfloat16 arithmetic"
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads, {args.images} images per epoch, "
        f"median of {args.rounds} rounds; baseline DataLoader workers: {args.workers}; bf16 rows: {bf16}"
    )
    print(f"matmul ceilings (torch.mm 4096x4096): float32 {mm32:.1f} GFLOP/s, bfloat16 {mm16:.1f} GFLOP/s\n")
    print(
        "| network | float32 (img/s) | bf16 (img/s) | bf16 / float32 | float32 capture off (img/s) | baseline (img/s) "
        "| float32 / baseline | capture cost, end to end | capture cost, timed directly | GFLOP/img "
        "| float32 GFLOP/s (% of its matmul) | bf16 GFLOP/s (% of its matmul) |"
    )
    print("| --- " * 12 + "|")
    for net in NETWORKS:
        on, off, base = med[(net, "float32, capture on")], med[(net, "float32, capture off")], med[(net, "baseline")]
        half = med[(net, "bf16, capture on")]
        gflop = training_gflop_per_image(VGG(params.model, params.variant(net)))
        step_ms = params.variant(net).batch_size / off * 1e3
        direct = capture_ms_per_step(params, net) / step_ms * 100
        print(
            f"| {net} | {on:.1f} | {half:.1f} | {half / on:.2f}x | {off:.1f} | {base:.1f} | {on / base:.2f}x "
            f"| {(off / on - 1) * 100:+.1f}% | {direct:.2f}% | {gflop:.3f} "
            f"| {on * gflop:.1f} ({on * gflop / mm32 * 100:.0f}%) "
            f"| {half * gflop:.1f} ({half * gflop / mm16 * 100:.0f}%) |"
        )
    print(
        "\nCapture cost end to end compares two float32 epochs timed apart and carries their noise; timed directly, "
        "it is GradientRecorder.after_backward alone against a float32 step without capture."
    )


if __name__ == "__main__":
    main()
