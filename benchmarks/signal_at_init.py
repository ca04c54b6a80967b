"""Where a plain 38-layer network loses its input: the forward signal and the gradient, layer by layer, at
initialisation, on real training images.

    python benchmarks/signal_at_init.py [--variants VGG-08 VGG-38 BN-VGG-38 RC-VGG-38] [--seeds 0 1 2]
                                        [--float64 | --bfloat16]

For each variant and seed (`torch.manual_seed(seed)`, then PyTorch's default initialisation, as a run begins), one
forward and one backward pass (cross-entropy, train mode) over one training image of each class. For every
convolution and the head's linear layer, in order from input to output, it prints:
  spread      how much the layer's input differs from image to image: the standard deviation over the images of
              each input unit, averaged over the units (what the layer can learn from);
  |input|     the mean absolute value of the input, image-dependent or not;
  |dL/dout|   the mean absolute gradient of the loss with respect to the layer's output;
  |dL/dW|     the mean absolute gradient of its weight (the statistic of the gradient-flow figures);
and, per seed, the logits' spread over the images relative to their mean absolute value: 0 means every image gets
the same output. Only the first seed's layers are printed; each seed gets its summary line. In float32 (as the
study's float32 runs train; channels-last, as its trainer lays tensors out) unless `--float64`, which shows what
float32 rounds away, or `--bfloat16`, the CPU study's bfloat16 autocast (`train.bf16`). Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vggdepth.batches import DeviceDataset  # noqa: E402
from vggdepth.config import ConfigError, load_params  # noqa: E402
from vggdepth.data import load_prepared, prepare  # noqa: E402
from vggdepth.models import VGG  # noqa: E402


def spread(x: torch.Tensor) -> float:
    """Standard deviation over the batch (dimension 0) of each unit, averaged over the units."""
    return x.detach().double().std(dim=0).mean().item()


def relative_spread(logits: torch.Tensor) -> float:
    """How much the logits differ from image to image, relative to their size: 0 when every image gets the same."""
    return spread(logits) / logits.detach().abs().mean().item()


def signal(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    """One forward and backward pass; per convolution and linear layer, in call order: its name, the input's spread
    and mean |value|, the mean |gradient| of its output and of its weight. Also the logits."""
    rows: dict[str, dict] = {}
    hooks = []

    def record(name):
        def hook(module, inputs, output):
            (given,) = inputs
            rows[name] = {"layer": name, "spread": spread(given), "input": given.detach().abs().mean().item()}
            output.register_hook(lambda grad: rows[name].update(dout=grad.abs().mean().item()))

        return hook

    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        logits = net(x)
        nn.functional.cross_entropy(logits, y).backward()
    finally:
        for hook in hooks:
            hook.remove()
    for name, row in rows.items():
        row["dweight"] = net.get_submodule(name).weight.grad.abs().mean().item()
    return list(rows.values()), logits.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar-100-python.tar.gz")
    parser.add_argument("--variants", nargs="+", default=["VGG-08", "VGG-38", "BN-VGG-38", "RC-VGG-38"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--float64", action="store_true", help="network and images in float64 instead of float32")
    precision.add_argument("--bfloat16", action="store_true", help="in bfloat16 autocast, as train.bf16 trains")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    for variant in args.variants:
        try:
            params.variant(variant)
        except ConfigError as exc:
            parser.error(str(exc))  # names the variants params.yaml has
    if not args.archive.is_file():
        parser.error(f"--archive: no CIFAR-100 archive at {args.archive}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        subset = params.prepare.subset.model_copy(update={"train": 1, "val": 1, "test": 1})
        prepare(args.archive, Path(tmp) / "data", params.prepare.model_copy(update={"subset": subset}))
        data = load_prepared(Path(tmp) / "data")
    images = DeviceDataset(data.train, data.mean, data.std, torch.device("cpu"))
    dtype = torch.float64 if args.float64 else torch.float32
    x = images.normalise(images.images).to(dtype)
    y = images.labels
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bfloat16)
    computed = "bfloat16 autocast" if args.bfloat16 else str(dtype)[6:]
    print(f"{len(y)} real training images (one per class), normalised; {computed}, train mode\n")
    for variant in args.variants:
        for n, seed in enumerate(args.seeds):
            torch.manual_seed(seed)
            net = VGG(params.model, params.variant(variant)).to(dtype, memory_format=torch.channels_last).train()
            with autocast:
                rows, logits = signal(net, x, y)
            if n == 0:
                print(f"{variant}, seed {seed}")
                print(f"  {'layer':<22} {'spread':>9} {'|input|':>9} {'|dL/dout|':>9} {'|dL/dW|':>9}")
                for row in rows:
                    print(
                        f"  {row['layer']:<22} {row['spread']:9.1e} {row['input']:9.1e} {row['dout']:9.1e} "
                        f"{row['dweight']:9.1e}"
                    )
            print(
                f"  {variant} seed {seed}: logits' spread over images {spread(logits):.1e}, mean |logit| "
                f"{logits.abs().mean().item():.1e}, relative {relative_spread(logits):.1e}"
            )
        print()


if __name__ == "__main__":
    main()
