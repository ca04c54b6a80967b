"""DVC stage `labels`: the superclass of every CIFAR-100 class, from the archive, for the evaluation."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.files import ready_to_write
from vggdepth.labels import write_labels


@entry_point
def main(
    archive: Annotated[Path, typer.Option(help="the CIFAR-100 python archive written by `download`")],
    out: Annotated[Path, typer.Option(help="the labels file (JSON) to write")],
) -> None:
    ready_to_write(out)
    labels = write_labels(archive, out)
    typer.echo(f"{out}: {len(labels.classes)} classes in {len(labels.superclasses)} superclasses", err=True)


if __name__ == "__main__":
    typer.run(main)
