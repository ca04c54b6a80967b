"""DVC stage `prepare`: split, reduce and normalise CIFAR-100 into compact uint8 arrays."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import prepare


@entry_point
def main(
    archive: Annotated[Path, typer.Option(help="the CIFAR-100 python archive written by `download`")],
    out: Annotated[Path, typer.Option(help="folder for train/val/test .npz and stats.json")],
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    prepare(archive, out, load_params(params).prepare)


if __name__ == "__main__":
    typer.run(main)
