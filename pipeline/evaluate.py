"""DVC stage `evaluate@<variant>-<seed>`: test loss and accuracy of the best and the final checkpoint."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.engine import RunFiles
from vggdepth.errors import VggdepthError
from vggdepth.evaluation import evaluate_run
from vggdepth.files import ready_to_write, write_json
from vggdepth.tracking import log_evaluation, open_store


@entry_point
def main(
    run: Annotated[Path, typer.Option(help="the run folder written by `train`")],
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    files = RunFiles(run)
    if not files.checkpoints.is_dir():
        raise VggdepthError(f"{files.checkpoints} does not exist: train the run first (the train stage)")
    ready_to_write(files.test_json)
    store = open_store(p)  # before any work: an unreachable tracking server stops the stage here
    result = evaluate_run(files, load_prepared(data), p.train, p.runtime)
    log_evaluation(store, files, result)  # first: a stage that fails here leaves no test.json behind
    write_json(files.test_json, result)


if __name__ == "__main__":
    typer.run(main)
