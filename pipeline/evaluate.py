"""DVC stage `evaluate@<variant>-<seed>`: test loss and accuracy of the best and the final checkpoint."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.engine import RunFiles
from vggdepth.evaluation import evaluate_run


@entry_point
def main(
    run: Annotated[Path, typer.Option(help="the run folder written by `train`")],
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    evaluate_run(RunFiles(run), load_prepared(data), load_params(params).train)


if __name__ == "__main__":
    typer.run(main)
