"""DVC stage `train@<variant>-<seed>`: train one row of Table 1 with one seed, tracked in MLflow; resumes after
a kill, and restores the outputs of a finished run from its checkpoint."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.engine import train_run
from vggdepth.tracking.callback import training_callbacks


@entry_point
def main(
    variant: Annotated[str, typer.Option(help="a variant name from params.yaml")],
    seed: Annotated[int, typer.Option(help="training seed")],
    out: Annotated[Path, typer.Option(help="folder for this run's outputs")],
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    p.variant(variant, field="--variant")
    callbacks = training_callbacks(p, variant, seed, data)  # before any work: an unreachable server stops here
    prepared = load_prepared(data)
    train_run(p, variant, seed, prepared, out, callbacks)  # checks that `out` is writable before training


if __name__ == "__main__":
    typer.run(main)
