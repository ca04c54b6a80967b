"""Throughput of the study's grid, side by side in one run: the same small grid (every variant of params.yaml, one
seed, a few thousand real CIFAR-100 images, one epoch, untracked) trained

  (a) sequential   one run after another in this process, with torch's default threads (the train stages alone);
  (b) concurrent   by the grid on a local Ray instance, as the grid stage does (grid.threads_per_run auto: the
                   packing its probe predicts fastest; the probe's time is counted, and training alone shown);
  (c) cluster      by the grid on a Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`): one node of one CPU,
                   then two nodes of one CPU each: the scale-out a team adding machines would see (as the
                   stage does: one run per CPU, the longest first by the probe's times on this machine).

It prints wall time (from the first run's start to the last run's end, Ray's start-up included) and training
images per second, with the ratios (b)/(a) and two nodes / one node.

    python benchmarks/grid_throughput.py [--per-class 20] [--epochs 1] [--archive ../shared/data/...tar.gz]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process of this benchmark binds to 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from vggdepth.config import load_params
from vggdepth.data import load_prepared, prepare
from vggdepth.engine import train_run
from vggdepth.grid import makespan, run_grid

ROOT = Path(__file__).resolve().parents[1]


def small_params(epochs: int, address: str = "local"):
    p = load_params(ROOT / "params.yaml")
    return p.model_copy(
        update={
            "train": p.train.model_copy(update={"epochs": epochs}),
            "runtime": p.runtime.model_copy(update={"device": "cpu", "threads": 0}),
            "grid": p.grid.model_copy(update={"address": address}),
            "seeds": [0],
            "tracking": p.tracking.model_copy(update={"enabled": False}),
        }
    )


def sequential(params, data, runs: Path) -> float:
    started = time.perf_counter()
    for variant in params.variants:
        train_run(params, variant, 0, data, runs / f"{variant}-s0")
    return time.perf_counter() - started


def grid(params, data, data_dir: Path, runs: Path):
    """Wall time of the grid stage's work (Ray's start, the plan's probe, training) and its result."""
    started = time.perf_counter()
    result, _, _ = run_grid(params, data, data_dir, runs)
    if result.failed:
        sys.exit(f"the grid failed: {result.failed}")
    return time.perf_counter() - started, result


def on_cluster(nodes: int, epochs: int, data, data_dir: Path, runs: Path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        return grid(small_params(epochs, cluster.address), data, data_dir, runs)
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20, help="training images per class (x 100 classes)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar-100-python.tar.gz")
    args = parser.parse_args()

    params = small_params(args.epochs)
    with tempfile.TemporaryDirectory(prefix="grid-bench-") as tmp:
        tmp = Path(tmp)
        subset = params.prepare.subset.model_copy(update={"train": args.per_class, "val": 5, "test": 1})
        prepare(args.archive, tmp / "data", params.prepare.model_copy(update={"subset": subset}))
        data = load_prepared(tmp / "data")
        images = len(data.train) * args.epochs * len(params.variants)
        cores = len(os.sched_getaffinity(0))
        print(
            f"{len(params.variants)} runs x {args.epochs} epoch(s) x {len(data.train)} real images "
            f"({images} training images in all) on {cores} cores",
            flush=True,
        )
        a_seconds = sequential(params, data, tmp / "a")
        b, b_result = grid(params, data, tmp / "data", tmp / "b")
        c1, c1_result = on_cluster(1, args.epochs, data, tmp / "data", tmp / "c1")
        c2, _ = on_cluster(2, args.epochs, data, tmp / "data", tmp / "c2")
    rows = [
        ("(a) sequential, one run at a time", a_seconds),
        ("(b) concurrent, local Ray", b),
        ("    of which training", b_result.seconds),
        ("(c) Ray cluster, 1 node x 1 CPU", c1),
        ("(c) Ray cluster, 2 nodes x 1 CPU", c2),
    ]
    print(f"\n| {'configuration':<34} | wall (s) | train img/s |")
    print(f"|{'-' * 36}|---------:|------------:|")
    for name, seconds in rows:
        print(f"| {name:<34} | {seconds:8.1f} | {images / seconds:11.1f} |")
    # The most two nodes can gain on these runs: their times on one node, longest first onto two (a run cannot
    # be split across nodes, so the grid ends with the last long run alone).
    alone = [summary["seconds"] for summary in c1_result.trained.values()]
    bound = sum(alone) / makespan(alone, 2)
    print(
        f"\nconcurrent / sequential: {a_seconds / b:.2f}x (training only: {a_seconds / b_result.seconds:.2f}x)    "
        f"two nodes / one node: {c1 / c2:.2f}x (at most {bound:.2f}x for these runs on two nodes)"
    )


if __name__ == "__main__":
    main()
