"""`python -m vggdepth ...`: the study's commands for people (the DVC stages live in pipeline/)."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.errors import VggdepthError
from vggdepth.report import check_guard, collect, read_paper_table, table1, table_markdown
from vggdepth.runs import RunFiles
from vggdepth.schemas import SummaryRecord, SweepRecord, read_record
from vggdepth.sweep import check_sweep
from vggdepth.tracking.sync import sync_run

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
@entry_point
def sync(
    runs: Annotated[list[Path], typer.Argument(help="run folders, e.g. runs/VGG-08-s0")],
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    """Send to MLflow what a run could not send while the tracking server was unreachable."""
    p = load_params(params)
    for run in runs:
        sent = sync_run(p, RunFiles(run))
        typer.echo(f"{run}: {'sent ' + ', '.join(sent) if sent else 'MLflow already has everything'}")


@app.command()
@entry_point
def plan(
    runs: Annotated[Path, typer.Option(help="folder holding every run's outputs")] = Path("runs"),
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
    probe: Annotated[bool, typer.Option(help="time a few training steps of each network here")] = True,
) -> None:
    """Before long work: the runs the grid stage would train, how it packs them on this machine (or the cluster
    at $RAY_ADDRESS), and about how long they take, from a short throughput probe. Changes nothing."""
    from vggdepth.data import load_prepared
    from vggdepth.grid import plan as grid_plan

    typer.echo("\n".join(grid_plan(load_params(params), load_prepared(data), runs, probe=probe)))


@app.command()
@entry_point
def report(
    runs: Annotated[Path, typer.Option(help="folder holding every run's outputs")] = Path("runs"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    """Print Table 1 from the train and evaluate stages' outputs (no DVC or MLflow needed)."""
    p = load_params(params)
    rows = table1(p, collect(p, runs), read_paper_table(params.parent / p.report.reference.table))
    typer.echo(table_markdown(p, rows))


@app.command()
@entry_point
def guard(
    summary: Annotated[Path, typer.Option(help="the report stage's summary")] = Path("report/summary.json"),
    sweep: Annotated[
        Path | None, typer.Option(help="the depth sweep's record (sweep/report/sweep.json): check its claim too")
    ] = None,
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    """Check the study's claim on a pipeline run (`report.guard`): entry-layer gradients vanish in VGG-38 and not in
    VGG-08 or BN-VGG-38; VGG-38 stays at chance and both beat it by `accuracy_margin`. With --sweep, the depth
    sweep's too: the plain networks' entry-layer gradient falls with depth, the batch-norm and residual networks'
    does not. Exit 1 when a check fails."""
    p = load_params(params)
    remedy = "run the pipeline (`dvc repro`) to make it"
    rows = read_record(summary, SummaryRecord, remedy).root
    absent = [name for name in (p.report.guard.vanishing, *p.report.guard.learning) if name not in rows]
    if absent:
        raise VggdepthError(f"{summary} has no row of {', '.join(absent)} (report.guard names them); run the pipeline")
    lines = check_guard(p, {name: row.model_dump() for name, row in rows.items()})
    typer.echo("\n".join(lines))  # before the sweep's record is read: a bad one does not hide these
    if sweep is not None:
        more = check_sweep(p, read_record(sweep, SweepRecord, remedy).model_dump())
        typer.echo("\n".join(more))
        lines += more
    if any(line.startswith("FAIL") for line in lines):
        raise typer.Exit(1)


@app.callback()
def main() -> None:
    """vggdepth: vanishing gradients in a 38-layer VGG on CIFAR-100, and the batch-norm fix."""


if __name__ == "__main__":
    app()
