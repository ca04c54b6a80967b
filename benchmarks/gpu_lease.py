"""One command for a rented GPU: the training-throughput table, then as much of the full study as the time allows.

Made for a machine that has PyTorch but neither MLflow, DVC nor Ray (the library runs from source, tracking off),
and a fixed time: every phase checks `--budget-s`, counted from the script's start.

1. Prepare CIFAR-100 from `--archive` (its md5 checked against `--md5`), as the prepare stage does.
2. Throughput, training images/s at the study's batch size (augmentation on the device, per-layer gradient
   statistics): VGG-08, VGG-38 and BN-VGG-38 alone, eager (the trainer, as the train stage runs) and on the fast
   path (vggdepth.fused: one run, its step a CUDA graph on a GPU); BN-VGG-38 with k runs fused into one network for
   each k of `--fuse`; then the best k in several processes at once, for each count of `--processes`. The fastest
   row of the fast path sets how the study trains. A profile of that configuration goes to profile.txt.
3. The study: params.yaml's variants and seeds in fused groups (runs of one shape: vggdepth.fused.fusion_groups),
   seed 0 of every variant first, that many processes at once. Every run writes the usual run folder (epochs.csv,
   gradients.csv, train.json, checkpoints) and, once finished, its test.json. A group that would overrun the budget
   stops after its last whole epoch. If the fast path failed in step 2, each run trains alone on the eager path.
4. Into `--out`: `lease.json` (device, torch, commit, command, the throughput table, each run's state),
   `profile.txt` and `results.tar.gz` (every run folder's tables and test.json, no checkpoints: a few MB).

Back on a machine with the project, `benchmarks/gpu_results.py` unpacks it under results/ and renders the report
(README "A GPU lease").

    python3 benchmarks/gpu_lease.py --archive cifar-100-python.tar.gz --md5 <md5> --out OUT [--budget-s 520]
    # a rehearsal on the CPU, end to end in a few minutes:
    python3 benchmarks/gpu_lease.py ... --device cpu --per-class 2 --epochs 2 --bench-steps 2 --fuse 2 --processes 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the library from source: the machine has no install of it

from vggdepth.config import Params, load_params  # noqa: E402
from vggdepth.data import PreparedData, load_prepared, prepare  # noqa: E402
from vggdepth.download import md5sum  # noqa: E402
from vggdepth.engine import Callback, RunFiles, Trainer, train_run  # noqa: E402
from vggdepth.evaluation import evaluate_run  # noqa: E402
from vggdepth.files import write_json  # noqa: E402
from vggdepth.fused import FusedTrainer, fusion_groups, train_fused  # noqa: E402
from vggdepth.outputs import read_epochs  # noqa: E402

NETWORKS = "VGG-08,VGG-38,BN-VGG-38"  # the table's networks alone
FUSE_NETWORK = "BN-VGG-38"  # the study's most common network: its fused rows set how the study trains
TABLES = ("epochs.csv", "gradients.csv", "train.json", "test.json")


class TimeUp(Exception):
    """The lease's budget would not hold one more epoch of this run."""


class Deadline(Callback):
    """Stops a run after an epoch when the next one, as long as the last, would end past `deadline` (epoch time)."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_epoch_end(self, run, record, gradients) -> None:
        if time.time() + record.seconds > self.deadline:
            raise TimeUp(f"{run.variant} seed {run.seed}: stopped after epoch {record.epoch}, the budget is spent")


def lease_params(path: Path, device: str, epochs: int | None, per_class: int | None) -> Params:
    """params.yaml as the study has it, on `device`, untracked; shorter or smaller only for a rehearsal."""
    p = load_params(path)
    train = p.train if epochs is None else p.train.model_copy(update={"epochs": epochs})
    prep = p.prepare
    if per_class is not None:
        subset = prep.subset.model_copy(update={"train": per_class, "val": max(1, per_class // 2), "test": 1})
        prep = prep.model_copy(update={"subset": subset})
    return p.model_copy(
        update={
            "train": train,
            "prepare": prep,
            "runtime": p.runtime.model_copy(update={"device": device, "threads": 0}),
            "tracking": p.tracking.model_copy(update={"enabled": False}),
        }
    )


def study_order(params: Params) -> list[tuple[str, int]]:
    """Seed 0 of every variant first, then the next seed of every variant, and so on."""
    return [(variant, seed) for seed in params.seeds for variant in params.variants]


# ---- throughput ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_throughput(params: Params, variant: str, data: PreparedData, steps: int, workdir: Path) -> float:
    """Training images/s of the production step (Trainer.train_epoch) over `steps` batches, after one warm-up
    pass over the same batches."""
    batch = params.variants[variant].batch_size
    n = min(len(data.train), steps * batch)
    train = data.train.take(np.arange(n))
    trainer = Trainer(
        model=params.model,
        train=params.train,
        runtime=params.runtime,
        variant_name=variant,
        variant=params.variants[variant],
        seed=0,
        data=PreparedData(train=train, val=data.val, test=data.test, stats=data.stats),
        files=RunFiles(workdir / variant),
    )
    from tqdm import tqdm

    with tqdm(total=steps, disable=True) as bar:
        trainer.train_epoch(0, bar)  # allocations, cuDNN's choice of kernels
        _sync(trainer.device)
        started = time.perf_counter()
        trainer.train_epoch(1, bar)
        _sync(trainer.device)
    return n / (time.perf_counter() - started)


def fused_throughput(
    params: Params, variant: str, data: PreparedData, steps: int, k: int, workdir: Path
) -> tuple[float, bool]:
    """Training images/s, all runs together, of `k` runs of `variant` fused into one network (FusedTrainer's step, the
    study's: a CUDA graph on a GPU when every batch is full), over `steps` batches each after one warm-up pass (which
    captures the graph); and whether the step was graphed."""
    batch = params.variants[variant].batch_size
    n = min(len(data.train), steps * batch)
    small = PreparedData(train=data.train.take(np.arange(n)), val=data.val, test=data.test, stats=data.stats)
    group = FusedTrainer(
        [
            Trainer(
                model=params.model,
                train=params.train,
                runtime=params.runtime,
                variant_name=variant,
                variant=params.variants[variant],
                seed=seed,
                data=small,
                files=RunFiles(workdir / f"{variant}-fused{k}-s{seed}"),
            )
            for seed in range(k)
        ]
    )
    from tqdm import tqdm

    with tqdm(total=steps, disable=True) as bar:
        group.train_epoch(0, bar)
        _sync(group.device)
        started = time.perf_counter()
        group.train_epoch(1, bar)
        _sync(group.device)
    return k * n / (time.perf_counter() - started), group.graph is not None


def profile_fused(params: Params, variant: str, data: PreparedData, k: int, steps: int, workdir: Path) -> str:
    """torch.profiler's table of `steps` fused steps (after warm-up and capture): where the time of the chosen
    configuration goes (kernels, launches, host)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(params.runtime.device if params.runtime.device != "auto" else "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fused_throughput(params, variant, data, steps, k, workdir)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


def _throughput_worker(params_json: str, variant: str, data_dir: str, steps: int, k: int, barrier, results) -> None:
    params = Params.model_validate_json(params_json)
    data = load_prepared(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fused_throughput(params, variant, data, 1, k, Path(tmp) / "warm")  # the process's own warm-up (CUDA context)
        barrier.wait()  # all processes start timing together
        results.put(fused_throughput(params, variant, data, steps, k, Path(tmp))[0])


def concurrent_throughput(
    params: Params, variant: str, data_dir: Path, steps: int, k: int, processes: int
) -> list[float]:
    """Images/s of each of `processes` processes training at once, each `k` runs fused (as the study's groups do)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(
            target=_throughput_worker,
            args=(params.model_dump_json(), variant, str(data_dir), steps, k, barrier, results),
        )
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    speeds = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    return speeds


def throughput_table(params: Params, data: PreparedData, data_dir: Path, args, say) -> list[dict]:
    """The table's rows: each network alone, eager (the trainer) and on the fast path (fused, k=1); BN-VGG-38 with
    k runs fused for each k of --fuse; then the best k in several processes at once, for each count of
    --processes. Each row: network, path, fused (runs per network), processes, per_run and aggregate img/s."""
    rows = []

    def row(network: str, path: str, fused: int, processes: int, aggregate: float) -> None:
        runs = fused * processes
        rows.append(
            {
                "network": network,
                "path": path,
                "fused": fused,
                "processes": processes,
                "runs_at_once": runs,
                "per_run": aggregate / runs,
                "aggregate": aggregate,
            }
        )
        say(f"throughput {network}: {path}, {fused} fused x {processes} process(es): {aggregate:,.0f} img/s in all")

    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.networks.split(","):
            row(variant, "eager", 1, 1, step_throughput(params, variant, data, args.bench_steps, Path(tmp) / "alone"))
            speed, graphed = fused_throughput(params, variant, data, args.bench_steps, 1, Path(tmp) / "fast")
            row(variant, _path(graphed), 1, 1, speed)
        for k in sorted({int(x) for x in args.fuse.split(",")} - {1}):
            speed, graphed = fused_throughput(params, args.fuse_network, data, args.bench_steps, k, Path(tmp) / "k")
            row(args.fuse_network, _path(graphed), k, 1, speed)
    best_k, _ = choose(rows, args.fuse_network)
    for processes in sorted({int(x) for x in args.processes.split(",")} - {1}):
        speeds = concurrent_throughput(params, args.fuse_network, data_dir, args.bench_steps, best_k, processes)
        row(args.fuse_network, _path(graphed), best_k, processes, sum(speeds))
    return rows


def _path(graphed: bool) -> str:
    return "fused, CUDA graph" if graphed else "fused, eager"


def choose(rows: list[dict], network: str) -> tuple[int, int]:
    """(runs fused per network, processes at once) of the fast path's fastest row of `network`."""
    fast = [r for r in rows if r["network"] == network and r["path"] != "eager"]
    best = max(fast, key=lambda r: r["aggregate"])
    return best["fused"], best["processes"]


# ---- the study ----------------------------------------------------------------------------------------------

_data: dict[str, PreparedData] = {}


def train_and_test(
    params_json: str, group: list[tuple[str, int]], fused: bool, data_dir: str, runs: str, deadline: float
) -> list[dict]:
    """One group in a worker process, fused (or one run alone, the trainer's eager path, when the fast path failed):
    train it (until `deadline`), then test each run that finished."""
    params = Params.model_validate_json(params_json)
    states = [{"run": f"{v}-s{s}", "variant": v, "seed": s} for v, s in group]
    if time.time() >= deadline:
        return [{**state, "state": "not started: the budget was spent"} for state in states]
    if data_dir not in _data:
        _data[data_dir] = load_prepared(data_dir)
    data = _data[data_dir]
    started = time.time()
    if not fused:
        return [_alone(params, *group[0], data, Path(runs), deadline, states[0])]
    try:
        trainer = train_fused(params, group, data, Path(runs), lambda v, s: [Deadline(deadline)])
    except Exception as exc:  # the group's failure is reported; the other groups go on
        return [{**st, "state": f"failed: {type(exc).__name__}: {exc}"} for st in states]
    seconds = time.time() - started
    for state, run, outcome in zip(states, trainer.trainers, trainer.outcome, strict=True):
        state["seconds"] = seconds
        state["epochs"] = len(run.history)
        state["fused_with"] = len(group)
        if isinstance(outcome, TimeUp):
            state["state"] = str(outcome)
        elif isinstance(outcome, BaseException):
            state["state"] = f"failed: {type(outcome).__name__}: {outcome}"
        else:
            write_json(run.files.test_json, evaluate_run(run.files, data, params.train, params.runtime))
            state.update(state="finished", images_per_second=outcome["images_per_second"], val_acc=outcome["val_acc"])
    return states


def study_groups(params: Params, fuse: int) -> list[list[tuple[str, int]]]:
    """The study's runs in fused groups of at most `fuse`: seed 0 of every variant first, then the other seeds."""
    order = study_order(params)
    first = [run for run in order if run[1] == params.seeds[0]]
    rest = [run for run in order if run[1] != params.seeds[0]]
    return fusion_groups(params, first, fuse) + fusion_groups(params, rest, fuse)


def train_study(
    params: Params, data_dir: Path, runs: Path, fuse: int, processes: int, deadline: float, say
) -> list[dict]:
    groups = study_groups(params, max(fuse, 1))
    say("groups: " + "; ".join(" + ".join(f"{v}-s{s}" for v, s in g) for g in groups))
    ctx = multiprocessing.get_context("spawn")
    states = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
        futures = [  # submitted in order: the pool starts them in that order as workers free up
            pool.submit(train_and_test, params.model_dump_json(), g, fuse > 0, str(data_dir), str(runs), deadline)
            for g in groups
        ]
        for future in concurrent.futures.as_completed(futures):
            for state in future.result():
                states.append(state)
                epochs = f", {state['epochs']} epochs" if "epochs" in state else ""
                say(f"{state['run']}: {state['state']}{epochs}")
    position = {f"{v}-s{s}": i for i, (v, s) in enumerate(study_order(params))}
    return sorted(states, key=lambda st: position[st["run"]])


def _alone(
    params: Params, variant: str, seed: int, data: PreparedData, runs: Path, deadline: float, state: dict
) -> dict:
    """One run trained alone by the trainer, as the stage does: the lease's fallback."""
    started = time.time()
    files = RunFiles.of(runs, variant, seed)
    try:
        trainer = train_run(params, variant, seed, data, files.root, [Deadline(deadline)])
    except TimeUp as exc:
        return {
            **state,
            "state": str(exc),
            "epochs": len(read_epochs(files.epochs_csv)),
            "seconds": time.time() - started,
        }
    except Exception as exc:
        return {**state, "state": f"failed: {type(exc).__name__}: {exc}"}
    write_json(files.test_json, evaluate_run(files, data, params.train, params.runtime))
    summary = trainer.summary()
    return {
        **state,
        "state": "finished",
        "epochs": summary["epochs"],
        "seconds": time.time() - started,
        "images_per_second": summary["images_per_second"],
        "val_acc": summary["val_acc"],
    }


# ---- the trip back ------------------------------------------------------------------------------------------


def pack(runs: Path, lease: dict, out: Path) -> Path:
    """results.tar.gz: lease.json and every run folder's tables (no checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "lease.json", lease)
    target = out / "results.tar.gz"
    partial = target.with_name(target.name + ".part")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out / "lease.json", arcname="lease.json")
        if (out / "profile.txt").exists():
            tar.add(out / "profile.txt", arcname="profile.txt")
        for folder in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.exists() else []:
            for name in TABLES:
                if (folder / name).exists():
                    tar.add(folder / name, arcname=f"runs/{folder.name}/{name}")
    partial.replace(target)
    return target


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="cifar-100-python.tar.gz")
    parser.add_argument("--md5", required=True, help="the archive's md5 (checked before anything else)")
    parser.add_argument("--out", type=Path, required=True, help="where lease.json and results.tar.gz go")
    parser.add_argument("--budget-s", type=float, default=520, help="seconds for everything, from the start")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--device", default="cuda", help="cuda; cpu for a rehearsal")
    parser.add_argument("--bench-steps", type=int, default=100, help="timed training steps per throughput row")
    parser.add_argument("--networks", default=NETWORKS, help="networks timed alone, eager and on the fast path")
    parser.add_argument("--fuse-network", default=FUSE_NETWORK, help="the network timed fused and in processes")
    parser.add_argument("--fuse", default="3,6,9", help="runs fused into one network to time (BN-VGG-38)")
    parser.add_argument("--processes", default="2,4", help="processes at once to time, each the best --fuse")
    parser.add_argument("--study-fuse", type=int, default=0, help="runs fused per network (0: as measured)")
    parser.add_argument("--study-processes", type=int, default=0, help="processes at once (0: as measured)")
    parser.add_argument("--profile-steps", type=int, default=20, help="fused steps to profile (0: none)")
    parser.add_argument("--fallback-processes", type=int, default=4, help="runs at once if the fast path fails")
    parser.add_argument("--epochs", type=int, default=None, help="rehearsal only: fewer epochs than params.yaml")
    parser.add_argument("--per-class", type=int, default=None, help="rehearsal only: training images per class")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vggdepth-lease")
    args = parser.parse_args()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(f"[{time.time() - started:6.1f} s] {line}", flush=True)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU")
    params = lease_params(args.params, args.device, args.epochs, args.per_class)
    lease = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "commit": _commit(),
        "device": device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "budget_s": args.budget_s,
        "epochs": params.train.epochs,
        "params": params.model_dump(mode="json"),  # what the runs trained with, for the report and MLflow back home
    }
    say(f"{lease['device']}, torch {lease['torch']}, commit {lease['commit'][:12]}")

    found = md5sum(args.archive)
    if found != args.md5:
        sys.exit(f"error: {args.archive} has md5 {found}, not {args.md5}: a part is missing or damaged")
    data_dir = args.work / "prepared"
    if not (data_dir / "stats.json").exists():
        prepare(args.archive, data_dir, params.prepare)
    data = load_prepared(data_dir)
    say(f"prepared: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test images")

    try:
        rows = throughput_table(params, data, data_dir, args, say)
    except Exception as exc:  # the fast path failed on this machine: a result, and the study trains runs alone
        lease["fast_path_error"] = f"{type(exc).__name__}: {exc}"
        say(f"the fast path failed ({lease['fast_path_error']}); the study trains each run alone, eagerly")
        rows, (fuse, processes) = [], (0, args.fallback_processes)
    else:
        fuse, processes = choose(rows, args.fuse_network)
        fuse, processes = args.study_fuse or fuse, args.study_processes or processes
        print_table(rows)
        if args.profile_steps:
            with tempfile.TemporaryDirectory() as tmp:
                table = profile_fused(params, args.fuse_network, data, fuse, args.profile_steps, Path(tmp))
            (args.out / "profile.txt").write_text(table)
            say(f"profile of {fuse} {args.fuse_network} run(s) fused, {args.profile_steps} steps: profile.txt")
    lease.update(throughput=rows, fuse=fuse, processes=processes)

    runs = args.work / "runs"
    how = f"{fuse} fused per network" if fuse else "alone"
    say(f"study: {len(study_order(params))} runs x {params.train.epochs} epochs, {how}, {processes} process(es)")
    lease["runs"] = train_study(params, data_dir, runs, fuse, processes, deadline, say)
    lease["seconds"] = time.time() - started
    lease["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    target = pack(runs, lease, args.out)
    finished = sum(r["state"] == "finished" for r in lease["runs"])
    say(f"{finished} of {len(lease['runs'])} runs finished; {target} ({target.stat().st_size / 1e6:.1f} MB)")


def print_table(rows: list[dict]) -> None:
    print("\n| network | path | runs fused | processes | img/s per run | img/s in all |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['network']} | {r['path']} | {r['fused']} | {r['processes']} | {r['per_run']:,.0f} "
            f"| {r['aggregate']:,.0f} |"
        )
    print(flush=True)


if __name__ == "__main__":
    main()
