"""Back from a GPU lease: unpack its results.tar.gz under results/<name>/ and render Table 1 and the figures from the
runs it holds, here, with no GPU (and no MLflow or DVC needed). The archive comes from another machine: it is
untrusted input, checked whole before anything is written (vggdepth.records).

    python benchmarks/gpu_results.py OUT/results.tar.gz [--name 2026-11-28-h100]

results/<name>/ then holds lease.json (device, torch version, commit, command, throughput table, each run's state),
profile.txt, runs/<variant>-s<seed>/ (epochs.csv, gradients.csv, train.json, and the evaluation's test.json,
predictions.npz, per_class.csv, superclass_confusion.csv) and report/ (table1.md,
table1.csv, summary.json, curves.csv, figures/), the report over the seeds whose runs all finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vggdepth.config import Params, load_params, recorded_params  # noqa: E402
from vggdepth.errors import VggdepthError  # noqa: E402
from vggdepth.files import atomic_dir  # noqa: E402
from vggdepth.records import LeaseRecord, read_results, results_folder  # noqa: E402
from vggdepth.report import build_report  # noqa: E402


def finished_seeds(params: Params, lease: LeaseRecord) -> list[int]:
    """The seeds whose every variant finished (trained to train.epochs and tested) in the lease."""
    done = {(r.variant, r.seed) for r in lease.runs if r.state == "finished"}
    return [s for s in params.seeds if all((v, s) in done for v in params.variants)]


def bring_home(archive: Path, results: Path, name: str | None) -> Path:
    """The archive checked whole (vggdepth.records), then unpacked and its report rendered in a staging folder that
    becomes `results/<name>` only when all of it succeeded: a failure anywhere leaves nothing behind."""
    lease, files = read_results(archive)
    dest = results_folder(results, lease, name)
    if dest.exists():
        raise SystemExit(f"error: {dest} exists; choose another --name or remove it")
    # as the runs trained, whatever params.yaml says now
    params = recorded_params(lease.params, load_params(ROOT / "params.yaml"), f"{archive}: lease.json")
    seeds = finished_seeds(params, lease)
    with atomic_dir(dest) as staging:
        for parts, blob in files.items():
            target = staging.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
        if seeds:
            build_report(params.model_copy(update={"seeds": seeds}), staging / "runs", staging / "report", project=ROOT)
    print(f"{dest}: {lease.device}, torch {lease.torch}, commit {lease.commit[:12]}")
    for r in lease.runs:
        print(f"  {r.run}: {r.state[:200]}")
    if seeds:
        print((dest / "report" / "table1.md").read_text())
    else:
        print("no seed has every variant finished: no report rendered")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="results.tar.gz from benchmarks/gpu_lease.py")
    parser.add_argument("--name", help="folder under results/ (default: the lease's date and device)")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    try:
        bring_home(args.archive, args.results, args.name)
    except VggdepthError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
