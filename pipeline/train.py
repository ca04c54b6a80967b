"""DVC stage `train@<variant>-<seed>`: train one row of Table 1 with one seed, tracked in MLflow; resumes after
a kill."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.engine import RunFiles, Trainer
from vggdepth.tracking import training_callbacks


@entry_point
def main(
    variant: Annotated[str, typer.Option(help="a variant name from params.yaml")],
    seed: Annotated[int, typer.Option(help="training seed")],
    out: Annotated[Path, typer.Option(help="folder for this run's outputs")],
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    row = p.variant(variant, field="--variant")
    callbacks = training_callbacks(p, variant, seed, data)  # before any work: an unreachable server stops here
    Trainer(
        model=p.model,
        train=p.train,
        variant_name=variant,
        variant=row,
        seed=seed,
        data=load_prepared(data),
        files=RunFiles(out),
        callbacks=callbacks,
    ).fit()


if __name__ == "__main__":
    typer.run(main)
