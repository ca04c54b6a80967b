"""What MLflow lacks, sent from a run's outputs: `sync_run` completes a run whose server was lost mid-run (epochs,
artefacts, model, test metrics), and imports a run trained without tracking elsewhere (a GPU lease, a CPU study)
from the tables it brought home. Used by `python -m vggdepth sync`, never by a pipeline stage."""

from __future__ import annotations

from vggdepth.checkpoints import foreign, load_checkpoint
from vggdepth.config import Params, recorded_params
from vggdepth.gradients import GradientRow
from vggdepth.outputs import read_epochs, read_gradients
from vggdepth.runs import EpochRecord, RunFiles
from vggdepth.schemas import LeaseRecord, StudyRecord, TestRecord, TrainRecord, read_record
from vggdepth.tracking.callback import complete_run_artifacts, log_tables
from vggdepth.tracking.report import has_gradient_flow, log_gradient_flow
from vggdepth.tracking.results import log_evaluation, send_evaluation
from vggdepth.tracking.store import (
    NODE_TAG,
    PRECISION_TAG,
    PipelineContext,
    Store,
    TrackingError,
    config_params,
    pending_epochs,
    run_id_of,
    store_errors,
    training_tags,
)


def sync_run(params: Params, files: RunFiles) -> list[str]:
    """Send what a run's MLflow run lacks (epochs, artefacts, test metrics) from its outputs; say what was sent.
    A run folder with tables but no checkpoints (a GPU lease's, see `import_run`) is imported from its tables. A
    checkpoint of another run than its folder names sends nothing."""
    if not files.last.exists() and (files.train_json.exists() or files.epochs_csv.exists()):
        return import_run(params, files)
    state = load_checkpoint(files.last)
    if why := foreign(state, files):
        raise TrackingError(f"{files.last} {why}: nothing was sent; restore the folder's own checkpoints first")
    run_id = run_id_of(files, state)
    store = Store(params.tracking)
    with store_errors(store.uri, f"take what {files.root} has to send"):
        return _sync(store, files, state, run_id)


def _sync(store: Store, files: RunFiles, state: dict, run_id: str) -> list[str]:
    gradients = [GradientRow(**r) for r in state["gradients"]]
    history = [EpochRecord(**r) for r in state["history"]]
    sent = []
    for epoch, metrics in pending_epochs(history, gradients, store.logged_epochs(run_id)):
        store.client.log_batch(run_id, metrics=metrics)
        sent.append(f"epoch {epoch}")
    if files.train_json.exists() and complete_run_artifacts(store, run_id, files):
        sent.append("artefacts and model")
    if files.train_json.exists() and not has_gradient_flow(store, run_id):
        log_gradient_flow(store, run_id, gradients, f"{state['variant']} seed {state['seed']}")
        sent.append("gradient-flow figure")
    if files.test_json.exists() and not store.client.get_metric_history(run_id, "test_acc_best"):
        log_evaluation(store, files, read_record(files.test_json, TestRecord).model_dump(), files.root)
        sent.append("test metrics")
    if store.client.get_run(run_id).info.status != "FINISHED" and files.train_json.exists():
        store.client.set_terminated(run_id, "FINISHED")
        sent.append("status FINISHED")
    return sent


# What trained a folder of runs brought home as tables, by the record beside its runs/ folder: a GPU lease
# (benchmarks/gpu_results.py) or a study on this machine's CPU (benchmarks/cpu_study.py).
RECORDS = {"lease.json": ("GPU lease", LeaseRecord), "study.json": ("CPU study", StudyRecord)}


STATE_TAG = "vggdepth.state"  # why an imported run that did not finish ended (its record's words)


def import_run(params: Params, files: RunFiles) -> list[str]:
    """A run trained without tracking and brought back as tables (results/<name>/runs/<run>/: a GPU lease's or a
    CPU study's) becomes a finished MLflow run from them: every epoch with its gradient statistics, the test
    metrics, the tables and the gradient-flow figure (no checkpoints or model: none come back). Its parent run
    stands for the lease or study, tagged with its device, torch version and commit. Importing again sends only
    what is missing. The record and `train.json` are read through their schemas before the store is opened.
    A run the lease stopped before its last epoch (no `train.json`, its epochs and the record's state of it)
    becomes a KILLED run with the epochs it trained, its `vggdepth.state` tag the record's words, so that its
    curves compare with the others' in the UI."""
    folder = files.root.parent.parent
    found = [(folder / name, *kind) for name, kind in RECORDS.items() if (folder / name).exists()]
    if not found:
        raise TrackingError(
            f"{files.root} has no checkpoints, so it can only be imported as the run of a GPU lease or a CPU study, "
            f"with its tables and a {' or '.join(RECORDS)} beside its runs/ folder; {folder} has neither"
        )
    record_path, kind, schema = found[0]
    record = read_record(record_path, schema).model_dump()
    summary = read_record(files.train_json, TrainRecord) if files.train_json.exists() else None
    stopped = None if summary is not None else _recorded_state(record, files.root.name)
    if summary is None:
        if files.run is None:
            raise TrackingError(f"{files.root}: not a run folder's name (<variant>-s<seed>): nothing to import")
        if stopped is None:
            raise TrackingError(
                f"{files.root} has no train.json, so it did not finish, and {record_path} records no state of a "
                f"run of that name: nothing to import"
            )
        if stopped == "finished":
            raise TrackingError(
                f"{record_path} records {files.root.name} as finished, but its train.json is missing: bring the "
                f"folder home again (benchmarks/gpu_results.py); nothing was imported"
            )
    variant, seed = (summary.variant, summary.seed) if summary is not None else files.run
    if record["params"] is not None:  # what the runs trained with, whatever params.yaml says now
        params = recorded_params(record["params"], params, str(record_path))
    elif summary is not None:
        params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": summary.epochs})})
    if (variant, seed) != files.run:
        raise TrackingError(f"{files.train_json} is the summary of {variant} seed {seed}, not of its folder's run")
    history = [EpochRecord(**row) for row in read_epochs(files.epochs_csv)]
    gradients = read_gradients(files.gradients_csv)
    tested = read_record(files.test_json, TestRecord).model_dump() if files.test_json.exists() else None
    source = f"{kind} {folder.name}"
    context = PipelineContext(
        key=f"lease:{folder.name}",
        name=source,
        tags={
            "git_commit": record["commit"],
            "device": record["device"],
            "torch": record["torch"],
            "lease_command": record["command"],
        },
    )
    store = Store(params.tracking)  # opened once the record and the tables have passed their checks
    with store_errors(store.uri, f"import {files.root}"):
        parent = store.parent_run(context)
        found = store.find(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.variant = '{variant}' and tags.seed = '{seed}'"
        )
        sent = []
        if found is None:
            config = {
                "model": params.model.model_dump(),
                "train": params.train.model_dump(),
                "variant": params.variant(variant, field="variant").model_dump(),
                "seed": seed,
            }
            ran = (
                {NODE_TAG: summary.node, "device": summary.device, PRECISION_TAG: summary.precision}
                if summary is not None
                else {STATE_TAG: stopped}  # its device is the record's, as context.tags say
            )
            run_id = store.client.create_run(
                store.experiment_id,
                run_name=f"{variant}-s{seed}",
                tags={**training_tags(parent, variant, seed), **ran, "vggdepth.source": source, **context.tags},
            ).info.run_id
            store.client.log_batch(run_id, params=config_params(config))
            sent.append("run")
        else:
            run_id = found.info.run_id
        epochs_sent = pending_epochs(history, gradients, store.logged_epochs(run_id))
        for _, metrics in epochs_sent:
            store.client.log_batch(run_id, metrics=metrics)
        if epochs_sent:
            sent.append(f"epochs {epochs_sent[0][0]}-{epochs_sent[-1][0]}")
        if not store.client.list_artifacts(run_id):
            if summary is not None:
                log_tables(store, run_id, files)
            else:  # stopped: its epochs and gradients, no summary
                for path in (files.epochs_csv, files.gradients_csv):
                    store.client.log_artifact(run_id, str(path))
            log_gradient_flow(store, run_id, gradients, f"{variant} seed {seed}")
            sent.append("tables")
        if tested is not None and not store.client.get_metric_history(run_id, "test_acc_best"):
            send_evaluation(store, run_id, files, tested, files.root)
            sent.append("test metrics")
        status = "FINISHED" if summary is not None else "KILLED"
        if store.client.get_run(run_id).info.status != status:
            store.client.set_terminated(run_id, status)
            if summary is None:
                sent.append(f"status KILLED ({stopped})")
    return sent


def _recorded_state(record: dict, name: str) -> str | None:
    """What a lease's or study's record says of run `name` (a lease lists its runs, a study maps them)."""
    runs = record.get("runs") or []
    found = runs.get(name) if isinstance(runs, dict) else next((r for r in runs if r.get("run") == name), None)
    return found["state"] if found else None
