"""One command for a rented GPU: the training-throughput table, then as much of the full study as the time allows.

Made for a machine that has PyTorch but neither MLflow, DVC nor Ray (the library runs from source, tracking off),
and a fixed time, `--budget-s` counted from the script's start: the table stops starting rows after
`--table-share` of it, no group starts with less than `--start-margin-s` left, a group stops after its last epoch
that fits, and the profile gets at most a quarter of what is left.

1. Prepare CIFAR-100 from `--archive` (its md5 checked against `--md5`), as the prepare stage does.
2. Throughput, training images/s at the study's batch size (augmentation on the device, per-layer gradient
   statistics): VGG-08, VGG-38 and BN-VGG-38 alone, eager (the trainer, as the train stage runs) and on the fast
   path (vggdepth.fused: one run, its step a CUDA graph on a GPU); BN-VGG-38 with k runs fused into one network for
   each k of `--fuse`; then the best k in several processes at once, timed together, for each count of
   `--processes`. A row that fails is reported and the others go on. The fastest row of the fast path sets how the
   study trains; on a GPU the graphed step is first checked against the eager one (`graph_check`), and trains
   eagerly if they differ. A profile of the chosen configuration goes to profile.txt (in a process of its own).
3. The study: params.yaml's variants and seeds in fused groups (runs of one shape: vggdepth.fused.fusion_groups),
   seed 0 of every variant first, at least as many processes at once as seed 0 has groups, a fresh process per
   group. Every run writes the usual run folder (epochs.csv, gradients.csv, train.json, checkpoints) and, once
   finished, its evaluation (test.json, predictions.npz, per_class.csv, superclass_confusion.csv; the superclasses
   read from the archive into labels.json beside the prepared data). If no row of the fast path could be measured,
   each run trains alone, eagerly. A lease can take a share of the study (`--seeds`, `--variants`) when the whole
   does not fit its time, and an earlier lease's table on the same device (`--table-from`) instead of measuring.
4. Into `--out`, after the table and again after every group (so a lease cut short still brings its finished
   runs home): `lease.json` (device, torch, commit, command, the throughput table and its errors, the plan, each
   run's state), `profile.txt` and `results.tar.gz` (those two and every run folder's tables and test.json, no
   checkpoints: a few MB).

Back on a machine with the project, `benchmarks/gpu_results.py` unpacks it under results/ and renders the report
(README "A GPU lease").

    export PYTHONPATH=src   # the library from source: the rented machine has no install of it (gpu_lease.sh sets it)
    python3 benchmarks/gpu_lease.py --archive cifar-100-python.tar.gz --md5 <md5> --out OUT [--budget-s 480]
    # a rehearsal on the CPU, end to end in a few minutes:
    python3 benchmarks/gpu_lease.py ... --device cpu --per-class 2 --epochs 2 --bench-steps 2 --fuse 2 --processes 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vggdepth.config import Params, load_params
from vggdepth.data import PreparedData, load_prepared, prepare
from vggdepth.download import md5sum
from vggdepth.evaluation import evaluate_run
from vggdepth.files import write_json
from vggdepth.grid import GridResult, choose_packing, group_runs, local_resources, plan_runs, run_grid
from vggdepth.labels import Labels, load_labels, write_labels
from vggdepth.outputs import read_epochs
from vggdepth.runs import TABLES as RUN_TABLES
from vggdepth.runs import RunFiles, run_name
from vggdepth.schemas import LeaseRecord, RecordError, read_record
from vggdepth.throughput import Timing, first_batches, speed_of, time_epoch, training_loop

ROOT = Path(__file__).resolve().parents[1]

NETWORKS = "VGG-08,VGG-38,BN-VGG-38"  # the table's networks alone
FUSE_NETWORK = "BN-VGG-38"  # the study's most common network: its fused rows set how the study trains
LABELS = "labels.json"  # beside prepared/: the superclasses, for the evaluation


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


def study_order(params: Params, only: list[str] | None = None) -> list[tuple[str, int]]:
    """Seed 0 of every variant first, then the next seed of every variant, and so on (`only`: these variants)."""
    return [(variant, seed) for seed in params.seeds for variant in params.variants if only is None or variant in only]


def narrow(params: Params, seeds: str | None, variants: str | None) -> tuple[Params, list[str] | None]:
    """The lease's share of the study: `seeds` and `variants` (comma-separated; None: all of params.yaml's). The
    params keep every variant (the report's figures and guard name them) and train `only` the chosen; they keep
    the chosen seeds, the report's seed moved to the first of them if it is not one. Unknown names are refused."""

    def chosen(given: str | None, known: list, kind, what: str) -> list | None:
        if given is None:
            return None
        try:
            picked = [kind(x.strip()) for x in given.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"error: --{what} {given!r}: not a comma-separated list of {what}") from None
        if not picked or (unknown := [x for x in picked if x not in known]):
            named = f"{', '.join(map(str, unknown))} not among them" if picked else "none given"
            raise SystemExit(
                f"error: --{what} {given!r}: params.yaml's {what} are {', '.join(map(str, known))} ({named})"
            )
        return [x for x in known if x in picked]  # in params.yaml's order

    kept = chosen(seeds, params.seeds, int, "seeds")
    only = chosen(variants, list(params.variants), str, "variants")
    if kept is not None:
        report = params.report
        if report.seed not in kept:
            report = report.model_copy(update={"seed": kept[0]})
        params = Params.model_validate({**params.model_dump(mode="json"), "seeds": kept, "report": report.model_dump()})
    return params, only


ERROR_CHARS = 1000  # of each throughput error kept in lease.json (its schema cuts longer ones anyway)


def earlier_table(path: Path, device: str) -> dict | None:
    """The throughput table of an earlier lease's `lease.json` (a file from another machine, read through its
    schema as such), if that lease ran on this kind of device: its rows, their errors, and the commit and torch
    they were measured with; None when it ran on another (the table is measured again)."""
    try:
        record = read_record(path, LeaseRecord, "--table-from takes the lease.json an earlier lease brought home")
    except RecordError as exc:
        raise SystemExit(f"error: --table-from: {exc}") from None
    if not record.throughput:
        raise SystemExit(f"error: --table-from: {path}: no throughput table in it (its lease measured none)")
    if record.device != device:
        return None
    return {
        "throughput": [row.model_dump() for row in record.throughput],
        "throughput_errors": list(record.throughput_errors),
        "from": {"path": str(path), "commit": record.commit, "torch": record.torch},
    }


# ---- throughput ---------------------------------------------------------------------------------------------


def graph_check(params: Params, variant: str, data: PreparedData, workdir: Path, steps: int = 8) -> str | None:
    """On CUDA, the graphed step against the eager one from the same state and batches (2 runs fused, `steps`
    steps an epoch, the graph captured in the first): None when their losses and weights agree to 1e-3 relative
    after two epochs, else what differs. Capture that silently computes something else must not train the study."""
    eager_params = params.model_copy(update={"runtime": params.runtime.model_copy(update={"cuda_graphs": False})})
    small = first_batches(params, variant, data, steps)
    loops = [
        training_loop(p, [(variant, 0), (variant, 1)], small, workdir / name, fused=True)
        for p, name in ((params, "graphed"), (eager_params, "eager"))
    ]
    for loop in loops:
        time_epoch(loop)
    graphed, eager = loops
    if graphed.graph is None:
        return "the step was not captured as a CUDA graph"
    checks = {
        "losses": (graphed.tally.loss, eager.tally.loss),
        "weights": tuple(torch.cat([p.detach().flatten().double() for p in g.net.parameters()]) for g in loops),
    }
    for name, (a, b) in checks.items():
        difference = ((a - b).norm() / b.norm()).item()
        if not difference <= 1e-3:
            return f"graphed and eager {name} differ by {difference:.2e} (relative) after {2 * steps} steps"
    return None


def _profile_worker(params_json: str, variant: str, data_dir: str, k: int, steps: int, target: str) -> None:
    """In a process of its own (a profiler that hangs or crashes takes only it down): a warm-up epoch (and the
    graph's capture) first, then `steps` steps profiled."""
    from torch.profiler import ProfilerActivity, profile
    from tqdm import tqdm

    params = Params.model_validate_json(params_json)
    small = first_batches(params, variant, load_prepared(data_dir), steps)
    with tempfile.TemporaryDirectory() as tmp:
        loop = training_loop(params, [(variant, seed) for seed in range(k)], small, Path(tmp), fused=True)
        time_epoch(loop)
        cuda = loop.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof, tqdm(total=steps, disable=True) as bar:
            loop.train_epoch(2, bar, guard=False)
            if cuda:
                torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
    Path(target).write_text(table)


def profile_fused(params: Params, variant: str, data_dir: Path, k: int, steps: int, target: Path, timeout_s: float):
    """torch.profiler's table of `steps` fused steps of the chosen configuration into `target`, within `timeout_s`."""
    ctx = multiprocessing.get_context("spawn")
    worker = ctx.Process(
        target=_profile_worker,
        args=(params.model_dump_json(), variant, str(data_dir), k, steps, str(target)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        worker.terminate()
        raise TimeoutError(f"the profile took longer than {timeout_s:.0f} s")
    if worker.exitcode != 0 or not target.exists():
        raise RuntimeError(f"the profile's process ended with exit code {worker.exitcode}")


def fused_speed(params: Params, variant: str, data: PreparedData, steps: int, k: int, ready=None) -> Timing:
    """`k` runs of `variant` (seeds 0..k-1) on the fast path (vggdepth.fused: a CUDA graph on a GPU when every batch
    is full), timed over `steps` batches each (vggdepth.throughput)."""
    runs = [(variant, seed) for seed in range(k)]
    with tempfile.TemporaryDirectory() as tmp:
        loop = training_loop(params, runs, first_batches(params, variant, data, steps), Path(tmp), fused=True)
        return time_epoch(loop, ready)


def _throughput_worker(params_json: str, variant: str, data_dir: str, steps: int, k: int, barrier, results) -> None:
    try:
        params = Params.model_validate_json(params_json)
        data = load_prepared(data_dir)
        results.put(asdict(fused_speed(params, variant, data, steps, k, barrier.wait)))
    except BaseException as exc:
        barrier.abort()  # the others stop waiting
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def concurrent_throughput(
    params: Params, variant: str, data_dir: Path, steps: int, k: int, processes: int, timeout_s: float
) -> dict:
    """`processes` processes training at once, each `k` runs fused (as the study's groups do), timed together: all
    their images over the time from the first start to the last end; within `timeout_s`."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes, timeout=timeout_s), ctx.Queue()
    workers = [
        ctx.Process(
            target=_throughput_worker,
            args=(params.model_dump_json(), variant, str(data_dir), steps, k, barrier, results),
            daemon=True,
        )
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    try:
        found = [results.get(timeout=timeout_s) for _ in workers]
    finally:
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.terminate()
    errors = [f["error"] for f in found if "error" in f]
    if errors:
        raise RuntimeError(f"{len(errors)} of {processes} processes failed: {errors[0]}")
    images = sum(f["images"] for f in found)
    span = max(f["ended"] for f in found) - min(f["started"] for f in found)
    return {"speed": images / span, "graphed": all(f["graphed"] for f in found)}


def throughput_table(params: Params, data: PreparedData, data_dir: Path, args, until: float, say) -> tuple[list, list]:
    """The table's rows: each network alone, eager (the trainer) and on the fast path (fused, k=1); BN-VGG-38 with
    k runs fused for each k of --fuse; then the best k in several processes at once, for each count of
    --processes. Each row: network, path, fused (runs per network), processes, per_run and aggregate img/s. A row
    that fails is reported in the errors and the others go on; rows not started by `until` are skipped."""
    rows, errors = [], []

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

    def attempt(what: str, measure) -> None:
        if time.time() > until:
            errors.append(f"{what}: skipped, the table's share of the budget is spent")
            say(errors[-1])
            return
        try:
            measure()
        except Exception as exc:  # one row's failure is a result; the table goes on
            errors.append(f"{what}: {type(exc).__name__}: {exc}"[:ERROR_CHARS])  # a CUDA error can be pages long
            say(f"throughput {what} failed: {errors[-1]}")

    for variant in args.networks.split(","):

        def eager(v=variant) -> None:
            small = first_batches(params, v, data, args.bench_steps)
            row(v, "eager", 1, 1, speed_of(params, [(v, 0)], small, fused=False).speed)

        def fast(v=variant) -> None:
            found = fused_speed(params, v, data, args.bench_steps, 1)
            row(v, _path(found.graphed), 1, 1, found.speed)

        attempt(f"{variant} eager", eager)
        attempt(f"{variant} fast path", fast)
    for k in sorted({int(x) for x in args.fuse.split(",")} - {1}):

        def fused(k=k) -> None:
            found = fused_speed(params, args.fuse_network, data, args.bench_steps, k)
            row(args.fuse_network, _path(found.graphed), k, 1, found.speed)

        attempt(f"{args.fuse_network} {k} fused", fused)
    best = choose(rows, args.fuse_network)
    if best is None:
        return rows, errors
    for processes in sorted({int(x) for x in args.processes.split(",")} - {1}):

        def together(processes=processes) -> None:
            timeout = max(30.0, until - time.time() + 60)
            found = concurrent_throughput(
                params, args.fuse_network, data_dir, args.bench_steps, best[0], processes, timeout
            )
            row(args.fuse_network, _path(found["graphed"]), best[0], processes, found["speed"])

        attempt(f"{args.fuse_network} {best[0]} fused x {processes} processes", together)
    return rows, errors


def _path(graphed: bool) -> str:
    return "fused, CUDA graph" if graphed else "fused, eager"


def choose(rows: list[dict], network: str) -> tuple[int, int] | None:
    """(runs fused per network, processes at once) of the fast path's fastest row of `network`; None without one."""
    fast = [r for r in rows if r["network"] == network and r["path"] != "eager"]
    if not fast:
        return None
    best = max(fast, key=lambda r: r["aggregate"])
    return best["fused"], best["processes"]


# ---- the study ----------------------------------------------------------------------------------------------


def study_params(params: Params, fuse: int, processes: int) -> Params:
    """The study as the grid trains it here: plain processes (no Ray on the machine), `fuse` runs of one shape per
    group (0: the fast path failed: each run alone, eagerly), `processes` groups on the device at once."""
    grid = params.grid.model_copy(
        update={"backend": "processes", "runs_per_group": max(fuse, 1), "groups_per_gpu": processes}
    )
    update = {"grid": grid}
    if not fuse:
        update["runtime"] = params.runtime.model_copy(update={"cuda_graphs": False})
    return params.model_copy(update=update)


def study_groups(params: Params, runs: Path, data: PreparedData, only: list[str] | None) -> list[list[str]]:
    """The groups the grid will train, by run name (`grid.group_runs` of the runs not yet finished)."""
    planned = [r for r in plan_runs(params, runs, data.stats, arrange=False, only=only) if r.stale and not r.problem]
    packing = choose_packing(params, *local_resources(), len(planned))
    return [[r.name for r in g] for g in group_runs(params, planned, packing.group)]


def train_study(
    params: Params,
    data: PreparedData,
    data_dir: Path,
    labels: Labels,
    runs: Path,
    deadline: float,
    margin: float,
    say,
    progress,
    only: list[str] | None = None,
) -> list[dict]:
    """The study through the pipeline's own grid (vggdepth.grid, `backend: processes`) under the deadline: no group
    starts with less than `margin` seconds left, a run stops after its last epoch that fits. Every run that
    finishes is tested at once (vggdepth.evaluation), and `progress(states)` runs after each group, so what is
    done goes home even if the lease is cut short. `only`: the runs of these variants."""
    groups = study_groups(params, runs, data, only)
    say("groups: " + "; ".join(" + ".join(g) for g in groups))
    fused_with = {name: len(g) for g in groups for name in g}
    started = time.time()
    ended: dict[str, dict] = {}  # run name -> its state, fixed when its group ended

    def after_group(result: GridResult) -> None:
        """Each run that has ended since the last call: tested when it finished, its state said and kept."""
        for variant, seed in study_order(params, only):
            name = run_name(variant, seed)
            files = RunFiles.of(runs, variant, seed)
            if name in ended:
                continue
            if name in result.trained:
                summary = result.trained[name]
                evaluate_run(files, data, labels, params.train, params.runtime, params.evaluate).write(files, labels)
                state = {
                    "state": "finished",
                    "epochs": summary["epochs"],
                    "images_per_second": summary["images_per_second"],
                    "val_acc": summary["val_acc"],
                }
            elif name in result.failed:
                state = {"state": f"failed: {result.failed[name]}", "epochs": _epochs_done(files)}
            elif name in result.stopped:
                state = {"state": result.stopped[name], "epochs": _epochs_done(files)}
            else:
                continue
            ended[name] = {
                "run": name,
                "variant": variant,
                "seed": seed,
                "fused_with": fused_with.get(name, 1),
                **state,
                "seconds": time.time() - started,
            }
            say(f"{name}: {state['state']}, {state['epochs']} epochs")
        progress(states())

    def states() -> list[dict]:
        return [ended[name] for name in (run_name(v, s) for v, s in study_order(params, only)) if name in ended]

    result, _, _ = run_grid(
        params,
        data,
        data_dir,
        runs,
        probe=False,
        deadline=deadline,
        start_margin_s=margin,
        after_group=after_group,
        only=only,
    )
    after_group(result)  # runs the deadline kept from starting end without a group of their own
    return states()


def _epochs_done(files: RunFiles) -> int:
    return len(read_epochs(files.epochs_csv)) if files.epochs_csv.exists() else 0


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
            for name in RUN_TABLES:
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
    parser.add_argument("--budget-s", type=float, default=480, help="seconds for everything, from the start")
    parser.add_argument("--table-share", type=float, default=0.3, help="of the budget, at most for the table")
    parser.add_argument("--start-margin-s", type=float, default=45, help="no group starts with less time left")
    parser.add_argument("--max-processes", type=int, default=6, help="groups at once, at most")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--device", default="cuda", help="cuda; cpu for a rehearsal")
    parser.add_argument("--bench-steps", type=int, default=100, help="timed training steps per throughput row")
    parser.add_argument("--networks", default=NETWORKS, help="networks timed alone, eager and on the fast path")
    parser.add_argument("--fuse-network", default=FUSE_NETWORK, help="the network timed fused and in processes")
    parser.add_argument("--fuse", default="3,6,9", help="runs fused into one network to time (BN-VGG-38)")
    parser.add_argument("--processes", default="2,4", help="processes at once to time, each the best --fuse")
    parser.add_argument("--study-fuse", type=int, default=0, help="runs fused per network (0: as measured)")
    parser.add_argument(
        "--study-processes",
        type=int,
        default=0,
        help="groups at once (0: as measured, at least as many as the study has groups, up to --max-processes)",
    )
    parser.add_argument("--profile-steps", type=int, default=20, help="fused steps to profile (0: none)")
    parser.add_argument("--fallback-processes", type=int, default=4, help="runs at once if the fast path fails")
    parser.add_argument("--seeds", help="train only these of params.yaml's seeds (comma-separated; default: all)")
    parser.add_argument("--variants", help="train only these variants (comma-separated; default: all)")
    parser.add_argument(
        "--table-from",
        type=Path,
        help="an earlier lease's lease.json: its throughput table, not measured again, if it ran on this device",
    )
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
    params, only = narrow(params, args.seeds, args.variants)
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
    if only is not None:
        lease["variants"] = only
    say(f"{lease['device']}, torch {lease['torch']}, commit {lease['commit'][:12]}")
    earlier = earlier_table(args.table_from, lease["device"]) if args.table_from else None

    found = md5sum(args.archive)
    if found != args.md5:
        sys.exit(f"error: {args.archive} has md5 {found}, not {args.md5}: a part is missing or damaged")
    data_dir = args.work / "prepared"
    if not (data_dir / "stats.json").exists():
        prepare(args.archive, data_dir, params.prepare)
    if not (args.work / LABELS).exists():
        write_labels(args.archive, args.work / LABELS)
    data = load_prepared(data_dir)
    say(f"prepared: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test images")

    runs = args.work / "runs"

    def progress(states: list[dict] | None = None) -> Path:
        """lease.json and results.tar.gz as they stand: whatever cuts the lease short, what is done goes home."""
        if states is not None:
            lease["runs"] = states
        lease["seconds"] = time.time() - started
        lease["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return pack(runs, lease, args.out)

    try:
        if earlier is not None:
            rows, errors = earlier["throughput"], earlier["throughput_errors"]
            lease["throughput_from"] = earlier["from"]
            measured = f"commit {earlier['from']['commit'][:12]}, torch {earlier['from']['torch']}"
            say(f"throughput: the table of {args.table_from} ({lease['device']}, {measured}), not measured again")
        else:
            if args.table_from:
                say(f"throughput: {args.table_from} was measured on another device; measuring this one's")
            until = started + args.table_share * args.budget_s
            rows, errors = throughput_table(params, data, data_dir, args, until, say)
        lease.update(throughput=rows, throughput_errors=errors)
        print_table(rows)
        best = choose(rows, args.fuse_network)
        if best is None:  # the fast path failed on this machine: a result; the study trains each run alone
            say("no row of the fast path was measured; the study trains each run alone, eagerly")
            fuse, processes = 0, args.fallback_processes
        else:
            fuse, processes = best
            check = graph_check(params, args.fuse_network, data, args.work / "check") if _graphed(rows) else None
            if check is not None:  # a graph that computes something else must not train the study
                lease["graph_check"] = check
                say(f"CUDA graph check failed ({check}): the study trains fused, eagerly")
                params = params.model_copy(update={"runtime": params.runtime.model_copy(update={"cuda_graphs": False})})
        fuse, processes = args.study_fuse or fuse, args.study_processes or processes
        if not args.study_processes:  # every group at once, at least, when the machine allows
            groups = len(study_groups(study_params(params, fuse, processes), runs, data, only))
            processes = max(processes, min(groups, args.max_processes))
        params = study_params(params, fuse, processes)
        plan = {"fuse": fuse, "processes": processes, "start_margin_s": args.start_margin_s}
        lease["plan"] = plan
        progress()
        if args.profile_steps and fuse:
            left = deadline - time.time()
            try:
                profile_fused(
                    params, args.fuse_network, data_dir, fuse, args.profile_steps, args.out / "profile.txt", left / 4
                )
                say(f"profile of {fuse} {args.fuse_network} run(s) fused, {args.profile_steps} steps: profile.txt")
            except Exception as exc:
                lease["profile_error"] = f"{type(exc).__name__}: {exc}"
                say(f"no profile: {lease['profile_error']}")
        how = f"{fuse} fused per network" if fuse else "alone"
        count = len(study_order(params, only))
        say(f"study: {count} runs x {params.train.epochs} epochs, {how}, {processes} process(es)")
        labels = load_labels(args.work / LABELS, data.stats)
        train_study(params, data, data_dir, labels, runs, deadline, args.start_margin_s, say, progress, only)
    finally:
        target = progress()
    finished = sum(r["state"] == "finished" for r in lease.get("runs", []))
    say(f"{finished} of {len(lease.get('runs', []))} runs finished; {target} ({target.stat().st_size / 1e6:.1f} MB)")


def _graphed(rows: list[dict]) -> bool:
    return any(r["path"] == _path(True) for r in rows)


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
