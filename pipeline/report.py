"""DVC stage `report`: Table 1, the report's figures and the comparison with its numbers, from the stage outputs;
then logged to the pipeline's MLflow parent run, with the final model registered."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.report import build_report
from vggdepth.tracking import log_report, open_store


@entry_point
def main(
    runs: Annotated[Path, typer.Option(help="folder holding every run's outputs")] = Path("runs"),
    out: Annotated[Path, typer.Option(help="folder for the table, summary, curves and figures")] = Path("report"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    store = open_store(p)  # before any work: an unreachable tracking server stops the stage here
    build_report(p, runs, out, project=params.parent)
    if store is not None:
        log_report(store, p, out, runs)


if __name__ == "__main__":
    typer.run(main)
