"""`python -m vggdepth ...`: the study's commands for people (the DVC stages live in pipeline/)."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.engine import RunFiles
from vggdepth.tracking import sync_run

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
@entry_point
def sync(
    runs: Annotated[list[Path], typer.Argument(help="run folders, e.g. runs/VGG-08-s0")],
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    """Send to MLflow what a run could not send while the tracking server was unreachable."""
    p = load_params(params)
    for run in runs:
        sent = sync_run(p, RunFiles(run))
        typer.echo(f"{run}: {'sent ' + ', '.join(sent) if sent else 'MLflow already has everything'}")


@app.callback()
def main() -> None:
    """vggdepth: vanishing gradients in a 38-layer VGG on CIFAR-100, and the batch-norm fix."""


if __name__ == "__main__":
    app()
