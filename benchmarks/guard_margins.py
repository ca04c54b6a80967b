"""How robust is the CI guard? Train the guard's variants on reduced profiles of the real data for several seeds
and print the margins each claim holds by: entry-layer gradients (the study's mechanism) and validation accuracy.

    python benchmarks/guard_margins.py --profile 30:5:2 --profile 50:10:3 --seeds 0 1 2 [--width 16]

A profile is `train:val:epochs`: images per class in the training and validation splits, and epochs. `--width`
sets the channels of every convolution (`model.width`; default: params.yaml's). Each run trains on the CPU with
`--threads` torch threads and tracking off; nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vggdepth.config import load_params  # noqa: E402
from vggdepth.data import load_prepared, prepare  # noqa: E402
from vggdepth.engine import train_run  # noqa: E402

ENTRY = "entry.conv"


def parse_profile(text: str) -> tuple[int, int, int]:
    train, val, epochs = (int(part) for part in text.split(":"))
    return train, val, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar-100-python.tar.gz")
    parser.add_argument("--profile", action="append", type=parse_profile, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["VGG-08", "VGG-38", "BN-VGG-38"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=None, help="model.width (default: params.yaml's)")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    if args.width is not None:
        params = params.model_copy(update={"model": params.model.model_copy(update={"width": args.width})})
    runtime = params.runtime.model_copy(update={"device": "cpu", "threads": args.threads, "progress_every": 50})
    tracking = params.tracking.model_copy(update={"enabled": False})
    for train_per_class, val_per_class, epochs in args.profile:
        name = f"{train_per_class}:{val_per_class}:{epochs}, width {params.model.width}"
        with tempfile.TemporaryDirectory() as tmp:
            subset = params.prepare.subset.model_copy(
                update={"train": train_per_class, "val": val_per_class, "test": 1}
            )
            prepare(args.archive, Path(tmp) / "data", params.prepare.model_copy(update={"subset": subset}))
            data = load_prepared(Path(tmp) / "data")
            profile = params.model_copy(
                update={
                    "train": params.train.model_copy(update={"epochs": epochs}),
                    "runtime": runtime,
                    "tracking": tracking,
                }
            )
            results: dict[str, list[dict]] = {}
            started = time.perf_counter()
            for variant in args.variants:
                for seed in args.seeds:
                    t0 = time.perf_counter()
                    trainer = train_run(profile, variant, seed, data, Path(tmp) / f"{variant}-s{seed}")
                    summary = trainer.summary()
                    entry = [g.mean_abs for g in trainer.gradients if g.layer == ENTRY]
                    row = {
                        "seed": seed,
                        "val_acc": summary["val_acc"],
                        "val_loss": summary["val_loss"],
                        "train_loss": summary["train_loss"],
                        "entry_min": min(entry),
                        "entry_max": max(entry),
                        "seconds": time.perf_counter() - t0,
                    }
                    results.setdefault(variant, []).append(row)
                    print(
                        f"[{name}] {variant} s{seed}: val acc {row['val_acc']:.4f} loss {row['val_loss']:.4f} | "
                        f"train loss {row['train_loss']:.4f} | entry |grad| {row['entry_min']:.2e}.."
                        f"{row['entry_max']:.2e} | {row['seconds']:.0f} s",
                        flush=True,
                    )
            report(name, len(data.val), results, time.perf_counter() - started)


def report(name: str, val_images: int, results: dict[str, list[dict]], seconds: float) -> None:
    chance = 0.01
    # One binomial standard error of an accuracy near chance on this validation set.
    se = math.sqrt(chance * (1 - chance) / val_images)
    print(f"\n## profile {name}: {val_images} validation images, chance {chance}, 1 s.e. at chance {se:.4f}")
    print(f"{'variant':<12} {'val acc (min/mean/max)':>26} {'val loss (min/max)':>20} {'entry |grad| min..max':>24}")
    for variant, rows in results.items():
        accs = [r["val_acc"] for r in rows]
        losses = [r["val_loss"] for r in rows]
        print(
            f"{variant:<12} {min(accs):>8.4f} {statistics.fmean(accs):>8.4f} {max(accs):>8.4f} "
            f"{min(losses):>10.4f} {max(losses):>9.4f} "
            f"{min(r['entry_min'] for r in rows):>11.2e}..{max(r['entry_max'] for r in rows):.2e}"
        )
    print(f"wall time of the profile: {seconds:.0f} s (threads per run as given)\n", flush=True)


if __name__ == "__main__":
    main()
