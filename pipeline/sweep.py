"""DVC stage `sweep`, beyond the report: each network family (plain, batch norm, residual, both) at each depth of
`sweep`, trained briefly on a reduced split through the grid; where each stops learning, in a table and two figures
(README "The depth sweep"), logged to the sweep's own MLflow parent run before they are put in place."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.files import ready_to_write
from vggdepth.sweep import DATA, REPORT, run_sweep, sweep_context
from vggdepth.tracking.report import log_sweep
from vggdepth.tracking.store import open_store


@entry_point
def main(
    out: Annotated[Path, typer.Option(help="the sweep's folder: data/, runs/ and report/")] = Path("sweep"),
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    for folder in (DATA, REPORT):  # writable, and clear of what a killed write left beside it
        ready_to_write(out / folder)
    prepared = load_prepared(data)
    store = open_store(p)  # before any work: an unreachable tracking server stops the stage here
    context = None if store is None else sweep_context(p)
    publish = None if store is None else (lambda staging, record: log_sweep(store, p, staging, context, record))
    run_sweep(p, prepared, out, context, publish)


if __name__ == "__main__":
    typer.run(main)
