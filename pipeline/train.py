"""DVC stage `train@<variant>-<seed>`: train one row of Table 1 with one seed, tracked in MLflow; resumes after
a kill, and restores the outputs of a finished run from its checkpoint. The one writer of its run folder
(vggdepth.locks); SIGTERM, or DVC ending, stops it after keeping its last checkpoint (vggdepth.signals)."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.checkpoints import CheckpointError, load_checkpoint
from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.engine import train_run
from vggdepth.locks import writing
from vggdepth.runs import RunFiles
from vggdepth.signals import keeping
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
    with writing(out), keeping(lambda: kept(out, p.train.epochs)):  # a second writer of `out` is refused here
        callbacks = training_callbacks(p, variant, seed, data)  # before any work: an unreachable server stops here
        prepared = load_prepared(data)
        train_run(p, variant, seed, prepared, out, callbacks)  # checks that `out` is writable before training


def kept(out: Path, epochs: int) -> str:
    """What an interrupted run keeps, and how it goes on: the newest checkpoint it resumes from."""
    files = RunFiles(out)
    for path in (files.last, files.previous):
        try:
            epoch = load_checkpoint(path)["epoch"]
        except CheckpointError:
            continue
        return f"{out} keeps its checkpoint after epoch {epoch} of {epochs} ({path}); run the stage again to resume"
    return f"{out} has no finished epoch yet; run the stage again to start the run"


if __name__ == "__main__":
    typer.run(main)
