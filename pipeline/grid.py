"""DVC stage `grid`: train every run of the study whose checkpoints are not finished, concurrently on Ray (this
machine, or the cluster at $RAY_ADDRESS / grid.address). The `train@<variant>-<seed>` stages after it find their
runs finished and restore their outputs; without it they would train one after another."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.files import ready_to_write
from vggdepth.grid import finish, run_grid
from vggdepth.locks import writing


@entry_point
def main(
    runs: Annotated[Path, typer.Option(help="folder of every run's outputs")] = Path("runs"),
    out: Annotated[Path, typer.Option(help="what the grid did: packing, speed, node of each run")] = Path(
        "runs/grid.json"
    ),
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
    only: Annotated[
        list[str] | None,
        typer.Option(help="train only this variant's runs (repeatable; a study narrowed to some rows); default: all"),
    ] = None,
) -> None:
    p = load_params(params)
    for name in only or ():
        p.variant(name, field="--only")
    with writing(out):  # and run_grid holds every run folder's lock: a second grid is refused at once
        ready_to_write(out)
        prepared = load_prepared(data)
        result, planned, packing = run_grid(p, prepared, data, runs, only=only)
        finish(result, planned, packing, out, len(prepared.train))


if __name__ == "__main__":
    typer.run(main)
