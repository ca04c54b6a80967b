"""The report stage in MLflow: Table 1, the summary and the figures into the pipeline's parent run, each run's
gradient-flow figure into its own run, and the final variant's best model into the registry."""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path

from vggdepth.config import Params
from vggdepth.gradients import GradientRow
from vggdepth.outputs import read_gradients
from vggdepth.runs import RunFiles
from vggdepth.schemas import TrainRecord, read_record
from vggdepth.tracking.store import TABLE1_ARTIFACT, PipelineContext, Store, TrackingError, run_id_of, store_errors

log = logging.getLogger(__name__)


def log_report(
    store: Store, params: Params, out: Path, runs: Path, context: PipelineContext | None = None
) -> tuple[str, str]:
    """Table 1, the summary and the figures into the pipeline's parent run; the final variant's best model into
    the registry under `report.registered_model`, with `report.alias`. Returns (model name, version).
    `out` may be the report's staging folder: the stage publishes before it puts the report in place."""
    with store_errors(store.uri, "take the report"):
        return _log_report(store, params, out, runs, context)


def _log_report(store: Store, params: Params, out: Path, runs: Path, context: PipelineContext | None):
    import mlflow

    client = store.client
    parent = store.parent_run(context or PipelineContext.detect(params))
    for name in ("table1.md", "table1.csv", "summary.json"):
        client.log_artifact(parent, str(out / name))
    client.log_artifacts(parent, str(out / "figures"), "figures")
    log_table1(store, parent, out / "table1.csv")
    for variant in params.variants:
        for seed in params.seeds:
            _gradient_flow_of(store, RunFiles.of(runs, variant, seed))

    # The final variant's best run over the seeds, by its best validation accuracy.
    final = params.report.final_variant
    best_files = max(
        (RunFiles.of(runs, final, seed) for seed in params.seeds),
        key=lambda f: read_record(f.train_json, TrainRecord).best_val_acc,
    )
    run_id = run_id_of(best_files)
    model_uri = client.get_run(run_id).data.tags.get("vggdepth.model_uri")
    if not model_uri:
        raise TrackingError(f"MLflow run {run_id} ({best_files.root}) has no logged model: set tracking.log_model")
    name, alias = params.report.registered_model, params.report.alias
    tags = {"variant": final, "run": best_files.root.name}
    # A few requests, each within a deadline, and a wait of one deadline for the new version to be ready; the
    # whole within the store's cap for an operation of many requests (Store.call).
    version = store.call(
        "register the model",
        mlflow.register_model,
        model_uri,
        name,
        tags=tags,
        await_registration_for=int(store.deadline_s),
        each_request=True,
    )
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(parent, "vggdepth.registered_model", f"models:/{name}@{alias} (version {version.version})")
    store.stage_done(parent)
    log.info(
        "registered %s of %s as models:/%s@%s (version %s)", model_uri, best_files.root, name, alias, version.version
    )
    return name, version.version


def log_table1(store: Store, parent: str, table1_csv: Path) -> None:
    """Table 1 as an MLflow table on the parent run (the UI shows it as one, and `mlflow.load_table` reads it back):
    one row per variant, not one metric per cell, which would fill the chart view with single-bar charts before
    the runs' curves."""
    log_table(store, parent, table1_csv, TABLE1_ARTIFACT)


def log_table(store: Store, run_id: str, table_csv: Path, artifact: str) -> None:
    """A CSV table as the MLflow table `artifact` of a run. The JSON is written here, in the form
    `mlflow.log_table` writes (pandas' "split" orient, no index), and uploaded over any earlier one, with the tag
    that marks it a table. Not `mlflow.log_table`: it downloads a table that is already there and appends to it, so
    every re-run of a stage on the same parent run would add its rows again (and wait on a download no deadline
    sees)."""
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    with table_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / artifact
        table.write_text(json.dumps({"columns": columns, "data": [[row[c] for c in columns] for row in rows]}))
        store.client.log_artifact(run_id, str(table))
    logged = json.loads(store.client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact, "type": "table"}
    if entry not in logged:
        store.client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


SWEEP_TABLE_ARTIFACT = "sweep_table.json"  # the sweep's table on its parent run, as an MLflow table


def log_sweep(store: Store, params: Params, out: Path, context: PipelineContext, record: dict) -> None:
    """The depth sweep (`out`: its report folder, perhaps still staged; `record`: its `sweep.json`) into its parent
    run: every file, the figures, the table as an MLflow table, the `sweep.*` settings as the run's params and where
    each family stops learning as a tag each (`vggdepth.sweep.stops.<family>`), so the UI compares sweeps."""
    from mlflow.entities import Param

    from vggdepth.tracking.store import flatten

    with store_errors(store.uri, "take the depth sweep"):
        client = store.client
        parent = store.parent_run(context)
        for path in sorted(out.iterdir()):
            if path.is_file():
                client.log_artifact(parent, str(path))
        client.log_artifacts(parent, str(out / "figures"), "figures")
        log_table(store, parent, out / "table.csv", SWEEP_TABLE_ARTIFACT)
        settings = flatten({"sweep": params.sweep.model_dump(mode="json")})
        client.log_batch(parent, params=[Param(k, v) for k, v in settings.items()])
        deepest = max(row["layers"] for row in record["rows"])
        for family, layers in record["stops"].items():
            stops = f"none up to {deepest} layers" if layers is None else f"{layers} layers"
            client.set_tag(parent, f"vggdepth.sweep.stops.{family}", stops)
        store.stage_done(parent)


GRADIENT_FLOW = "gradient_flow.png"


def log_gradient_flow(store: Store, run_id: str, gradients: list[GradientRow], title: str) -> None:
    """A run's gradient-flow figure (mean |gradient| per layer, a line per epoch) as its artefact."""
    from vggdepth.figures import gradient_flow_figure, save_figure

    if gradients:
        with tempfile.TemporaryDirectory() as tmp:
            figure = gradient_flow_figure(gradients, f"{title}: gradient flow")
            store.client.log_artifact(run_id, str(save_figure(figure, Path(tmp) / GRADIENT_FLOW)))


def has_gradient_flow(store: Store, run_id: str) -> bool:
    return any(a.path == GRADIENT_FLOW for a in store.client.list_artifacts(run_id))


def _gradient_flow_of(store: Store, files: RunFiles) -> None:
    """The gradient-flow figure of a run of the report into its MLflow run, unless it has one. A run trained with
    tracking off has no MLflow run: said, and passed over."""
    try:
        run_id = run_id_of(files)
    except TrackingError as exc:
        log.warning("%s: no gradient-flow figure sent (%s)", files.root, exc)
        return
    if has_gradient_flow(store, run_id):
        return
    variant, seed = files.run
    log_gradient_flow(store, run_id, read_gradients(files.gradients_csv), f"{variant} seed {seed}")
