"""Does emulated bfloat16 (`vggdepth.bf16_emulation`) compute what PyTorch's bfloat16 autocast computes, and at what
speed? On a real checkpoint and real images, against PyTorch's own bfloat16 kernels (this CPU's, native or not)
and float32.

    python benchmarks/bf16_emulation_check.py [--checkpoint results/<study>/resume/<run>.pt] [--archive PATH]
                                              [--images 100] [--seconds 20]

One training step's forward and backward (train mode, cross-entropy) over the first `--images` images of the
official training set, from the checkpoint's weights, in four ways: float32; PyTorch's bfloat16 autocast on one
thread and on two (the same arithmetic, the float32 sums in another order); emulated bfloat16 on one thread. For
each pair it prints how far apart the logits and the weight gradients are (relative L2 norm of the difference;
the median and the largest over the parameters; the share of logits that are bit-identical). The emulation
sums in float32 and rounds once, as oneDNN's bfloat16 kernels do (tests/test_bf16_emulation.py checks that
exactly); on a CPU without bfloat16 arithmetic "PyTorch's bfloat16" is PyTorch's fallback, which rounds more
often, so there it is a neighbour to compare with rather than the definition: the emulation should be about as
close to it as it is to itself on another thread count, and closer than float32 is. Then each way's speed: full
training steps (with Adam) for `--seconds` each, in images per second, on the threads this process has. Nothing
is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vggdepth import bf16_emulation  # noqa: E402
from vggdepth.batches import DeviceDataset  # noqa: E402
from vggdepth.config import ModelConfig, Variant  # noqa: E402
from vggdepth.data import read_archive  # noqa: E402
from vggdepth.errors import VggdepthError  # noqa: E402
from vggdepth.models import VGG  # noqa: E402

# A complete study's resume points leave the tree (git history keeps them): the newest study's that has some
RESUME_POINTS = "results/*-cpu-*/resume/*.pt"
MEASURED = "git show 1852282^:results/2026-12-01-cpu-0564cca/resume/HIGHLR-BN-38-s0.pt"  # its last point (epoch 98)


def default_checkpoint() -> Path | None:
    points = sorted(ROOT.glob(RESUME_POINTS), key=lambda p: (p.parent.parent.name, p.name), reverse=True)
    return points[0] if points else None


ARCHIVE = ROOT.parent / "shared" / "data" / "cifar-100-python.tar.gz"


def network(state: dict) -> torch.nn.Module:
    net = VGG(ModelConfig(**state["model_config"]), Variant(**state["variant_config"]))
    net.load_state_dict(state["model"])
    return net.to(memory_format=torch.channels_last).train()


def images(archive: Path, count: int, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` official training images, normalised with the run's statistics as its trainer does."""
    train, _, _ = read_archive(archive)
    data = DeviceDataset(train.take(np.arange(count)), state["mean"], state["std"], torch.device("cpu"))
    return data.normalise(data.images), data.labels


def one_pass(state: dict, x: torch.Tensor, y: torch.Tensor, way: str, threads: int) -> tuple[torch.Tensor, dict]:
    """Logits (float32) and every parameter's gradient after one forward and backward pass computed `way`."""
    torch.set_num_threads(threads)
    net = network(state)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=way != "float32", cache_enabled=False):
        logits = net(x)
    F.cross_entropy(logits.float(), y).backward()
    return logits.float().detach(), {name: p.grad.clone() for name, p in net.named_parameters()}


def distance(a: tuple, b: tuple) -> str:
    def rel(u: torch.Tensor, v: torch.Tensor) -> float:
        return ((u - v).norm() / v.norm().clamp_min(1e-30)).item()

    grads = [rel(a[1][name], b[1][name]) for name in b[1]]
    same = (a[0] == b[0]).float().mean().item()
    return (
        f"logits {rel(a[0], b[0]):.1e} ({same:.1%} bit-identical), gradients median {statistics.median(grads):.1e}"
        f" largest {max(grads):.1e}"
    )


def speed(state: dict, x: torch.Tensor, y: torch.Tensor, way: str, seconds: float) -> float:
    net = network(state)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=way != "float32", cache_enabled=False):
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()

    step()  # warm-up
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * len(y) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help=f"default: the newest of {RESUME_POINTS}")
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if hasattr(F.conv2d, "bf16_emulated"):
        raise SystemExit(f"error: the emulation is installed already: unset {bf16_emulation.ENV}")
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
    if args.checkpoint is None:
        raise SystemExit(
            f"error: no study's resume point under results/ ({RESUME_POINTS}); pass --checkpoint, e.g. one from git "
            f"history: {MEASURED} > /tmp/highlr.pt"
        )
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        x, y = images(args.archive, args.images, state)
    except (OSError, KeyError, RuntimeError, VggdepthError) as exc:
        raise SystemExit(f"error: {exc}") from None
    threads = torch.get_num_threads()
    where = "with" if bf16_emulation.native() else "without"
    print(f"{args.checkpoint.name}: {state['variant']} after epoch {state['epoch']}, {args.images} training images")
    print(f"this CPU: {where} bfloat16 arithmetic, {threads} threads")

    ways = {
        "float32": one_pass(state, x, y, "float32", 1),
        "pytorch bf16, 1 thread": one_pass(state, x, y, "bf16", 1),
        "pytorch bf16, 2 threads": one_pass(state, x, y, "bf16", 2),
    }
    bf16_emulation.install(force=True)  # on a CPU with bfloat16 arithmetic too, to compare
    ways["emulated bf16, 1 thread"] = one_pass(state, x, y, "bf16", 1)
    print("\none step's forward and backward, relative distance:")
    pytorch, emulated = ways["pytorch bf16, 1 thread"], ways["emulated bf16, 1 thread"]
    print(f"  emulated vs pytorch bf16 (1 thread):      {distance(emulated, pytorch)}")
    print(f"  pytorch bf16, 2 threads vs 1 thread:      {distance(ways['pytorch bf16, 2 threads'], pytorch)}")
    print(f"  emulated vs float32:                      {distance(emulated, ways['float32'])}")
    print(f"  pytorch bf16 (1 thread) vs float32:       {distance(pytorch, ways['float32'])}")

    torch.set_num_threads(threads)
    print(f"\ntraining steps (Adam), batch {args.images}, {threads} threads, {args.seconds:g} s each, images/s:")
    emulated_speed = speed(state, x, y, "bf16", args.seconds)
    bf16_emulation.uninstall()
    for way, rate in (
        ("float32", speed(state, x, y, "float32", args.seconds)),
        ("emulated bf16", emulated_speed),
        ("pytorch bf16", speed(state, x, y, "bf16", args.seconds)),
    ):
        print(f"  {way:<14} {rate:8.1f}")


if __name__ == "__main__":
    main()
