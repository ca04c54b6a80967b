"""DVC stage `evaluate@<variant>-<seed>`: test loss and accuracy of the best and the final checkpoint."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.engine import RunFiles
from vggdepth.evaluation import evaluate_run
from vggdepth.tracking import log_evaluation, open_store


@entry_point
def main(
    run: Annotated[Path, typer.Option(help="the run folder written by `train`")],
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    store = open_store(p)  # before any work: an unreachable tracking server stops the stage here
    files = RunFiles(run)
    log_evaluation(store, files, evaluate_run(files, load_prepared(data), p.train))


if __name__ == "__main__":
    typer.run(main)
