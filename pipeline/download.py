"""DVC stage `download`: fetch the CIFAR-100 archive named by `data` in params.yaml, md5-verified."""

from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.download import fetch_archive


@entry_point
def main(
    out: Annotated[Path, typer.Option(help="where the verified archive is written")],
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    data = load_params(params).data
    fetch_archive(data.url, data.md5, out, timeout_s=data.timeout_s)


if __name__ == "__main__":
    typer.run(main)
