"""One command for a rented GPU: the training-throughput table, then as much of the full study as the time allows.

Made for a machine that has PyTorch but neither MLflow, DVC nor Ray (the library runs from source, tracking off),
and a fixed time: every phase checks `--budget-s`, counted from the script's start.

1. Prepare CIFAR-100 from `--archive` (its md5 checked against `--md5`), as the prepare stage does.
2. Throughput: training images/s of VGG-08, VGG-38 and BN-VGG-38 at the study's batch size (the production
   training step: augmentation on the device, per-layer gradient statistics), one run alone; on a GPU also the
   same step captured as a CUDA graph (`graphed_throughput`, a first measure of the fast path); then BN-VGG-38
   with k runs at once in separate processes, for each k of `--concurrency`: the aggregate decides how many runs
   the study trains at once (eager: the trainer has no graphed step yet).
3. The study: params.yaml's variants and seeds, seed 0 of every variant first, that many runs at once, each run
   the normal trainer writing the usual run folder (epochs.csv, gradients.csv, train.json, checkpoints) and, once
   finished, its test.json. A run that would overrun the budget stops after its last whole epoch.
4. Into `--out`: `lease.json` (device, torch, commit, command, the throughput table, each run's state) and
   `results.tar.gz` (every run folder's tables and test.json, no checkpoints: a few MB for the trip back).

Back on a machine with the project, `benchmarks/gpu_results.py` unpacks it under results/ and renders the report
(README "A GPU lease").

    python3 benchmarks/gpu_lease.py --archive cifar-100-python.tar.gz --md5 <md5> --out OUT [--budget-s 520]
    # a rehearsal on the CPU, end to end in a few minutes:
    python3 benchmarks/gpu_lease.py ... --device cpu --per-class 2 --epochs 2 --bench-steps 2 --concurrency 1,2
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
from vggdepth.outputs import read_epochs  # noqa: E402

NETWORKS = ("VGG-08", "VGG-38", "BN-VGG-38")
CONCURRENT_NETWORK = "BN-VGG-38"  # the study's most common network: its aggregate sets the runs at once
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


def graphed_throughput(params: Params, variant: str, data: PreparedData, steps: int) -> float:
    """A first measure of the fast path (CUDA only): the training step (forward, loss, backward, gradient
    statistics, Adam) captured once as a CUDA graph and replayed for each batch; the batch pipeline (shuffle, crops,
    flips) stays eager, as in the trainer. Same network, optimizer settings and batch size as the study; it times
    steps and trains no run."""
    import torch.nn.functional as F

    from vggdepth.batches import DeviceDataset, training_batches
    from vggdepth.gradients import GradientRecorder
    from vggdepth.models import VGG

    device = torch.device("cuda")
    cfg = params.variants[variant]
    net = VGG(params.model, cfg).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        net.parameters(),
        lr=torch.tensor(cfg.lr, device=device),  # a tensor, so that a schedule can change it between replays
        betas=tuple(params.train.betas),
        weight_decay=params.train.weight_decay,
        capturable=True,
    )
    recorder = GradientRecorder(net)
    train = DeviceDataset(data.train, data.mean, data.std, device)
    generator = torch.Generator(device=device).manual_seed(0)

    def batches():
        while True:
            for x, y in training_batches(train, cfg.batch_size, params.train.augment, generator):
                if len(y) == cfg.batch_size:  # a graph has one shape
                    yield x, y

    stream = batches()
    x, y = next(stream)
    static_x, static_y = x.clone(), y.clone()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=params.train.bf16):
            loss = F.cross_entropy(net(static_x).float(), static_y)
        loss.backward()
        recorder.after_backward()
        optimizer.step()
        loss_sum.add_(loss.detach())

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, on a side stream, as capture requires
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):  # replays before timing
        graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(stream)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    if not torch.isfinite(loss_sum):
        raise RuntimeError("the graphed steps' loss is not finite")
    return steps * cfg.batch_size / (time.perf_counter() - started)


def _throughput_worker(params_json: str, variant: str, data_dir: str, steps: int, barrier, results) -> None:
    params = Params.model_validate_json(params_json)
    data = load_prepared(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        step_throughput(params, variant, data, 1, Path(tmp) / "warm")  # the process's own warm-up (CUDA context)
        barrier.wait()  # all k start timing together
        results.put(step_throughput(params, variant, data, steps, Path(tmp)))


def concurrent_throughput(params: Params, variant: str, data_dir: Path, steps: int, k: int) -> list[float]:
    """Images/s of each of `k` runs training at once, in separate processes (as the study's runs do)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    workers = [
        ctx.Process(
            target=_throughput_worker,
            args=(params.model_dump_json(), variant, str(data_dir), steps, barrier, results),
        )
        for _ in range(k)
    ]
    for w in workers:
        w.start()
    speeds = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    return speeds


# ---- the study ----------------------------------------------------------------------------------------------

_data: dict[str, PreparedData] = {}


def train_and_test(params_json: str, variant: str, seed: int, data_dir: str, runs: str, deadline: float) -> dict:
    """One run in a worker process: train it (until `deadline`), then test it when finished."""
    params = Params.model_validate_json(params_json)
    files = RunFiles.of(Path(runs), variant, seed)
    state = {"run": files.root.name, "variant": variant, "seed": seed}
    if time.time() >= deadline:
        return {**state, "state": "not started: the budget was spent"}
    if data_dir not in _data:
        _data[data_dir] = load_prepared(data_dir)
    data = _data[data_dir]
    started = time.time()
    try:
        trainer = train_run(params, variant, seed, data, files.root, [Deadline(deadline)])
    except TimeUp as exc:
        return {**state, "state": str(exc), "epochs": _epochs(files), "seconds": time.time() - started}
    except Exception as exc:  # one run's failure is reported; the others go on
        return {**state, "state": f"failed: {type(exc).__name__}: {exc}", "epochs": _epochs(files)}
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


def _epochs(files: RunFiles) -> int:
    return len(read_epochs(files.epochs_csv)) if files.epochs_csv.exists() else 0


def train_study(params: Params, data_dir: Path, runs: Path, at_once: int, deadline: float, say) -> list[dict]:
    order = study_order(params)
    ctx = multiprocessing.get_context("spawn")
    states = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=at_once, mp_context=ctx) as pool:
        futures = [  # submitted in study order: the pool starts them in that order as workers free up
            pool.submit(train_and_test, params.model_dump_json(), v, s, str(data_dir), str(runs), deadline)
            for v, s in order
        ]
        for future in concurrent.futures.as_completed(futures):
            state = future.result()
            states.append(state)
            say(f"{state['run']}: {state['state']}" + (f", {state['epochs']} epochs" if "epochs" in state else ""))
    position = {f"{v}-s{s}": i for i, (v, s) in enumerate(order)}
    return sorted(states, key=lambda st: position[st["run"]])


# ---- the trip back ------------------------------------------------------------------------------------------


def pack(runs: Path, lease: dict, out: Path) -> Path:
    """results.tar.gz: lease.json and every run folder's tables (no checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "lease.json", lease)
    target = out / "results.tar.gz"
    partial = target.with_name(target.name + ".part")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out / "lease.json", arcname="lease.json")
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
    parser.add_argument("--concurrency", default="1,2,4,8", help="runs at once to time (BN-VGG-38)")
    parser.add_argument("--epochs", type=int, default=None, help="rehearsal only: fewer epochs than params.yaml")
    parser.add_argument("--per-class", type=int, default=None, help="rehearsal only: training images per class")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vggdepth-lease")
    args = parser.parse_args()
    deadline = started + args.budget_s

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

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in NETWORKS:
            speed = step_throughput(params, variant, data, args.bench_steps, Path(tmp) / "alone")
            rows.append({"network": variant, "path": "eager", "runs_at_once": 1, "per_run": speed, "aggregate": speed})
            say(f"throughput {variant}: {speed:,.0f} img/s (eager, alone)")
            if torch.device(args.device).type == "cuda":
                try:
                    fast = graphed_throughput(params, variant, data, args.bench_steps)
                except Exception as exc:  # a first try on this machine: its failure is a result, not the lease's end
                    lease.setdefault("fast_path_errors", {})[variant] = f"{type(exc).__name__}: {exc}"
                    say(f"throughput {variant}: the CUDA-graph step failed: {type(exc).__name__}: {exc}")
                else:
                    rows.append(
                        {
                            "network": variant,
                            "path": "CUDA graph",
                            "runs_at_once": 1,
                            "per_run": fast,
                            "aggregate": fast,
                        }
                    )
                    say(f"throughput {variant}: {fast:,.0f} img/s (CUDA graph, alone)")
    for k in (int(x) for x in args.concurrency.split(",")):
        if k < 2:
            continue
        speeds = concurrent_throughput(params, CONCURRENT_NETWORK, data_dir, args.bench_steps, k)
        rows.append(
            {
                "network": CONCURRENT_NETWORK,
                "path": "eager",
                "runs_at_once": k,
                "per_run": sum(speeds) / k,
                "aggregate": sum(speeds),
            }
        )
        say(f"throughput {CONCURRENT_NETWORK}: {k} at once, {sum(speeds):,.0f} img/s in all")
    concurrent_rows = [r for r in rows if r["network"] == CONCURRENT_NETWORK and r["path"] == "eager"]
    at_once = max(concurrent_rows, key=lambda r: r["aggregate"])["runs_at_once"]
    lease["throughput"] = rows
    lease["runs_at_once"] = at_once
    print_table(rows)

    runs = args.work / "runs"
    say(f"study: {len(study_order(params))} runs x {params.train.epochs} epochs, {at_once} at once")
    lease["runs"] = train_study(params, data_dir, runs, at_once, deadline, say)
    lease["seconds"] = time.time() - started
    lease["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    target = pack(runs, lease, args.out)
    finished = sum(r["state"] == "finished" for r in lease["runs"])
    say(f"{finished} of {len(lease['runs'])} runs finished; {target} ({target.stat().st_size / 1e6:.1f} MB)")


def print_table(rows: list[dict]) -> None:
    print("\n| network | path | runs at once | img/s per run | img/s in all |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['network']} | {r['path']} | {r['runs_at_once']} | {r['per_run']:,.0f} | {r['aggregate']:,.0f} |")
    print(flush=True)


if __name__ == "__main__":
    main()
