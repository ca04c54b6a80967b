"""DVC stage `report`: Table 1, the report's figures and the comparison with its numbers, from the stage outputs;
logged to the pipeline's MLflow parent run (final model registered) before the report is put in place."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.files import ready_to_write
from vggdepth.report import build_report
from vggdepth.tracking.report import log_report
from vggdepth.tracking.store import open_store


@entry_point
def main(
    runs: Annotated[Path, typer.Option(help="folder holding every run's outputs")] = Path("runs"),
    out: Annotated[Path, typer.Option(help="folder for the table, summary, curves and figures")] = Path("report"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    ready_to_write(out)
    store = open_store(p)  # before any work: an unreachable tracking server stops the stage here
    publish = None if store is None else (lambda staging: log_report(store, p, staging, runs))
    build_report(p, runs, out, project=params.parent, publish=publish)


if __name__ == "__main__":
    typer.run(main)
