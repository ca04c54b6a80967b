"""DVC stage `evaluate@<variant>-<seed>`: the best and the final checkpoint on the test set: loss, accuracy, top-k,
superclass accuracy, calibration, per-class results and the predictions they come from."""

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from vggdepth.cli import entry_point
from vggdepth.config import load_params
from vggdepth.data import load_prepared
from vggdepth.engine import run_fingerprint
from vggdepth.errors import VggdepthError
from vggdepth.evaluation import evaluate_run
from vggdepth.files import ready_to_write
from vggdepth.labels import load_labels
from vggdepth.locks import writing
from vggdepth.runs import RunFiles
from vggdepth.tracking.results import log_evaluation
from vggdepth.tracking.store import open_store


@entry_point
def main(
    run: Annotated[Path, typer.Option(help="the run folder written by `train`")],
    data: Annotated[Path, typer.Option(help="prepared data folder")] = Path("data/prepared"),
    labels: Annotated[Path, typer.Option(help="superclass labels written by `labels`")] = Path("data/labels.json"),
    params: Annotated[Path, typer.Option(help="parameters file")] = Path("params.yaml"),
) -> None:
    p = load_params(params)
    files = RunFiles(run)
    if not files.checkpoints.is_dir():
        raise VggdepthError(f"{files.checkpoints} does not exist: train the run first (the train stage)")
    with writing(run):  # the one writer of the run folder: a train or evaluate of it running now refuses this one
        ready_to_write(files.test_json)
        store = open_store(p)  # before any work: an unreachable tracking server stops the stage here
        prepared = load_prepared(data)
        known = load_labels(labels, prepared.stats)
        expected = None  # the run params.yaml describes, when the folder is one of its runs
        if files.run is not None and files.run[0] in p.variants:
            variant, seed = files.run
            expected = run_fingerprint(p.model, p.train, p.variants[variant], seed, prepared.stats)
        evaluation = evaluate_run(files, prepared, known, p.train, p.runtime, p.evaluate, fingerprint=expected)
        # MLflow first: a stage that fails there leaves no test.json behind
        evaluation.write(files, known, publish=partial(log_evaluation, store, files, evaluation.result))


if __name__ == "__main__":
    typer.run(main)
