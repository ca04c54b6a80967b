"""The evaluate stage's results in MLflow: the test metrics of both checkpoints, `test.json` and the evaluation's
tables, into the training run they belong to."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from vggdepth.runs import EVALUATION_TABLES, RunFiles
from vggdepth.tracking.store import DeadlineError, Store, TrackingError, now_ms, run_id_of, short

log = logging.getLogger(__name__)


def _test_metrics(result: dict):
    from mlflow.entities import Metric

    now = now_ms()
    # test_loss_best, test_acc_best, test_top5_best, test_ece_best, ...: every test metric of both checkpoints
    return [
        Metric(f"{name}_{kind}", float(value), now, 0)
        for kind in ("best", "final")
        for name, value in result[kind].items()
        if name.startswith("test_")
    ]


def send_evaluation(store: Store, run_id: str, files: RunFiles, result: dict, tables: Path | None) -> None:
    """The test metrics, `test.json` as an artefact (written here from `result`: the stage writes its own after),
    and the evaluation's tables from `tables` under `evaluation/`."""
    store.client.log_batch(run_id, metrics=_test_metrics(result))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / files.test_json.name
        copy.write_text(json.dumps(result, indent=2) + "\n")
        store.client.log_artifact(run_id, str(copy))
    for name in EVALUATION_TABLES if tables is not None else ():
        if (tables / name).exists():
            store.client.log_artifact(run_id, str(tables / name), "evaluation")


def log_evaluation(store: Store | None, files: RunFiles, result: dict, tables: Path | None = None) -> None:
    """Test metrics, `test.json` and the tables in `tables` (predictions, per-class, superclass confusion) of the
    evaluate stage, into the training run they belong to; called before the stage puts its outputs in place, so a
    stage that fails here leaves none. A server lost since the stage started costs the log, not the stage (the
    gap is reported, `sync` sends it later); a store that answers but refuses fails the stage, with its reason.
    Every request is bounded (`Store.call`: `Store.deadline_s` a request, an upload `Store.operation_cap_s` in
    all): one past its bound is a server that does not answer, not asked again."""
    if store is None:
        return
    run_id = run_id_of(files)
    try:
        send_evaluation(store, run_id, files, result, tables)
        store.stage_done(run_id)
    except Exception as exc:
        if not isinstance(exc, DeadlineError) and store.answers():
            raise TrackingError(
                f"MLflow at {store.uri} refused the test metrics of {files.root} (run {run_id}): {short(exc)}"
            ) from None
        log.error(
            "could not send the test metrics of %s: MLflow at %s does not answer (%s); the stage's outputs are "
            "complete, send them with `python -m vggdepth sync %s` once it is back",
            files.root,
            store.uri,
            short(exc),
            files.root,
        )
