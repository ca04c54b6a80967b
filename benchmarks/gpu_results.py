"""Back from a GPU lease: unpack its results.tar.gz under results/<name>/ and render Table 1 and the figures from the
runs it holds, here, with no GPU (and no MLflow or DVC needed).

    python benchmarks/gpu_results.py OUT/results.tar.gz [--name 2026-11-28-h100]

results/<name>/ then holds lease.json (device, torch version, commit, command, throughput table, each run's state),
profile.txt, runs/<variant>-s<seed>/ (epochs.csv, gradients.csv, train.json, and the evaluation's test.json,
predictions.npz, per_class.csv, superclass_confusion.csv) and report/ (table1.md,
table1.csv, summary.json, curves.csv, figures/), the report over the seeds whose runs all finished.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vggdepth.config import Params, load_params, recorded_params  # noqa: E402
from vggdepth.files import atomic_dir  # noqa: E402
from vggdepth.report import build_report  # noqa: E402
from vggdepth.runs import TABLES as RUN_TABLES  # noqa: E402


def unpack(archive: Path, dest: Path) -> dict:
    """lease.json, profile.txt and runs/<run>/<table> of `archive` into `dest` (nothing else, no path outside it);
    the lease."""
    with tarfile.open(archive, "r:gz") as tar, atomic_dir(dest) as staging:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            run_table = len(parts) == 3 and parts[0] == "runs" and parts[2] in RUN_TABLES
            wanted = parts in (("lease.json",), ("profile.txt",)) or run_table
            if not member.isfile() or not wanted or ".." in parts:
                raise SystemExit(f"error: {archive} holds {member.name!r}, which a lease's results never hold")
            target = staging.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return json.loads((dest / "lease.json").read_text())


def finished_seeds(params: Params, lease: dict) -> list[int]:
    """The seeds whose every variant finished (trained to train.epochs and tested) in the lease."""
    done = {(r["variant"], r["seed"]) for r in lease["runs"] if r["state"] == "finished"}
    return [s for s in params.seeds if all((v, s) in done for v in params.variants)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="results.tar.gz from benchmarks/gpu_lease.py")
    parser.add_argument("--name", help="folder under results/ (default: the lease's date and device)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args()

    with tarfile.open(args.archive, "r:gz") as tar:
        lease = json.load(tar.extractfile("lease.json"))
    device = re.sub(r"[^a-z0-9]+", "-", lease["device"].lower()).strip("-")
    name = args.name or f"{lease['finished_at'][:10]}-{device}"
    dest = args.results / name
    if dest.exists():
        raise SystemExit(f"error: {dest} exists; choose another --name or remove it")
    lease = unpack(args.archive, dest)
    # as the runs trained, whatever params.yaml says now
    params = recorded_params(lease["params"], load_params(ROOT / "params.yaml"), "lease.json")
    seeds = finished_seeds(params, lease)
    states = [f"  {r['run']}: {r['state']}" for r in lease["runs"]]
    print(f"{dest}: {lease['device']}, torch {lease['torch']}, commit {lease['commit'][:12]}", *states, sep="\n")
    if not seeds:
        print("no seed has every variant finished: no report rendered")
        return
    build_report(params.model_copy(update={"seeds": seeds}), dest / "runs", dest / "report", project=ROOT)
    print((dest / "report" / "table1.md").read_text())


if __name__ == "__main__":
    main()
