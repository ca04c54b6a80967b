"""MLflow tracking against a real server and the embedded SQLite store: runs, params, per-epoch and per-layer
metrics, artefacts, the model, data lineage, resume, and a server that goes away mid-run."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import ROOT, KillAfter, MlflowServer, free_port, run_stage, write_yaml
from tests.helpers import cpu_trainer
from vggdepth.batches import DeviceDataset
from vggdepth.checkpoints import load_checkpoint, load_network
from vggdepth.engine import Trainer
from vggdepth.gradients import weight_tensors
from vggdepth.models import VGG
from vggdepth.runs import Callback, RunFiles
from vggdepth.tracking.callback import MlflowCallback, training_callbacks
from vggdepth.tracking.store import PipelineContext, Store, TrackingError, flatten
from vggdepth.tracking.sync import sync_run

VARIANT = "VGG-08"


@pytest.fixture
def tracking_cfg(params):
    """Fail fast in tests: no retries against a stopped server; no sampling thread."""
    return params.tracking.model_copy(update={"request_retries": 0, "request_timeout_s": 5, "system_metrics": False})


@pytest.fixture(params=["server", "embedded"])
def store(request, tracking_cfg, tmp_path, monkeypatch):
    """A real tracking server on 127.0.0.1, or the embedded default under a temporary project root."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if request.param == "server":
        return Store(tracking_cfg, uri=request.getfixturevalue("mlflow_server").uri)
    return Store(tracking_cfg, root=tmp_path / "project")


def _context(params, out: Path) -> PipelineContext:
    """This checkout's provenance, with a parent of its own per test (the server outlives single tests)."""
    detected = PipelineContext.detect(params, cwd=ROOT)
    return PipelineContext(key=f"test:{out}", name=f"test {out.parent.name}", tags=detected.tags)


def _fit(
    params, data, quick_train, store, out: Path, *, epochs=2, before=(), data_dir=Path("data/prepared")
) -> Trainer:
    tracker = MlflowCallback(store, _context(params, out), "train@VGG-08-0", data_dir)
    trainer = cpu_trainer(params, data, quick_train(epochs=epochs), out, [*before, tracker], VARIANT)
    trainer.fit()
    return trainer


def _run_id(out: Path) -> str:
    return load_checkpoint(out / "checkpoints" / "last.pt")["extra"]["mlflow_run_id"]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_training_run_is_fully_tracked(store, params, tiny_data, tiny_data_dir, quick_train, archive_md5, tmp_path):
    trainer = _fit(params, tiny_data, quick_train, store, tmp_path / "run", data_dir=tiny_data_dir)
    client = store.client
    run = client.get_run(_run_id(tmp_path / "run"))
    # The experiment opens as a model-training one, not in the UI's GenAI mode.
    experiment_tags = client.get_experiment(store.experiment_id).tags
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment_tags["mlflow.note.content"].startswith("CIFAR-100, VGG-style networks of Table 1")

    assert run.info.run_name == "VGG-08-s0"
    assert run.info.status == "FINISHED"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tags = run.data.tags
    assert (tags["variant"], tags["seed"], tags["data_md5"]) == (VARIANT, "0", archive_md5)
    assert (tags["git_commit"], tags["dvc_stage"]) == (commit, "train@VGG-08-0")
    assert tags["git_dirty"] in ("true", "false")
    assert tags["precision"] == trainer.precision == json.loads(trainer.files.train_json.read_text())["precision"]
    parent = client.get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags["vggdepth.kind"] == "pipeline"
    # The parent describes itself and spans its stages: it ends no earlier than its child.
    assert parent.data.tags["mlflow.note.content"].startswith(f"The pipeline run {parent.info.run_name}: the parent")
    assert parent.info.status == "FINISHED" and parent.info.end_time >= run.info.end_time > parent.info.start_time

    # Params are the full resolved config.
    assert run.data.params == flatten(trainer.run.config)
    assert run.data.params["variant.lr"] == "0.001" and run.data.params["train.epochs"] == "2"

    # Every per-epoch metric at step=epoch, with the values of the DVC output.
    with open(tmp_path / "run" / "epochs.csv") as f:
        epochs = list(csv.DictReader(f))
    history = client.get_metric_history(run.info.run_id, "curves/train_loss")
    assert [(m.step, m.value) for m in history] == [(int(r["epoch"]), float(r["train_loss"])) for r in epochs]
    for key in ("curves/train_acc", "curves/val_loss", "curves/val_acc", "curves/lr", "curves/epoch_seconds"):
        assert _steps(client, run.info.run_id, key) == [0, 1], key
    for layer, _ in weight_tensors(VGG(params.model, params.variant(VARIANT))):
        for stat in ("grad_mean_abs", "grad_last_mean_abs", "grad_l2", "weight_l2"):
            assert _steps(client, run.info.run_id, f"{stat}/{layer}") == [0, 1], (stat, layer)
        for stat in ("grad_mean_abs", "grad_last_mean_abs"):  # also on a log10 scale, for the UI's linear axes
            plain = client.get_metric_history(run.info.run_id, f"{stat}/{layer}")
            logged = client.get_metric_history(run.info.run_id, f"log10_{stat}/{layer}")
            assert [(m.step, m.value) for m in logged] == [(m.step, math.log10(m.value)) for m in plain], layer

    # Artefacts: tables and checkpoints (the gradient-flow figure comes with the report stage: test_report).
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"epochs.csv", "gradients.csv", "train.json", "checkpoints"} <= listed
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    }

    # The model takes raw uint8 images as a user has them (N x 32 x 32 x 3, or N x 3 x 32 x 32), normalises them
    # with the run's statistics and gives the checkpoint's class probabilities, by class name.
    model = mlflow.pyfunc.load_model(tags["vggdepth.model_uri"])
    reference = load_network(load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt"), torch.device("cpu"))
    images, _ = next(DeviceDataset(tiny_data.test, tiny_data.mean, tiny_data.std, torch.device("cpu")).batches(50))
    with torch.no_grad():
        expected = torch.softmax(reference(images).double(), dim=1).numpy()
    raw = tiny_data.test.images[:50]  # N x 3 x 32 x 32 uint8
    for layout in (raw.transpose(0, 2, 3, 1), raw):
        answer = model.predict(np.ascontiguousarray(layout))
        assert list(answer.columns) == list(tiny_data.classes)
        np.testing.assert_allclose(answer.to_numpy(), expected, rtol=0, atol=1e-6)
    assert isinstance(model.unwrap_python_model().net, VGG)  # the network itself, for those who want it
    # Loading it unpickles nothing: the model is code (served_model.py), the weights a weights-only checkpoint.
    folder = Path(mlflow.artifacts.download_artifacts(tags["vggdepth.model_uri"], dst_path=str(tmp_path / "model")))
    assert not [p.name for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert (folder / "artifacts" / "best.pt").is_file()
    # It sits in the run's experiment, named after the run, and nothing went to experiment Default.
    (logged,) = client.search_logged_models([store.experiment_id])
    assert (logged.name, logged.source_run_id) == ("VGG-08-s0", run.info.run_id)
    assert tags["vggdepth.model_uri"] == f"models:/{logged.model_id}"
    assert not client.search_logged_models(["0"])
    # Its signature and input example say what it takes: the first two real test images, uint8, N x 32 x 32 x 3.
    logged_model = mlflow.models.Model.load(tags["vggdepth.model_uri"])
    example = logged_model.load_input_example(tags["vggdepth.model_uri"])
    np.testing.assert_array_equal(example, raw[:2].transpose(0, 2, 3, 1))
    assert example.dtype == np.uint8
    (spec,) = logged_model.signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype(np.uint8), (-1, -1, -1, -1))
    assert logged_model.signature.outputs.input_names() == list(tiny_data.classes)
    with pytest.raises(Exception, match=r"images must be N x 32 x 32 x 3 or N x 3 x 32 x 32 uint8, got shape"):
        model.predict(np.zeros((2, 32, 3, 32), dtype=np.uint8))

    # Data lineage: the archive's md5 as digest, the split as context.
    inputs = {
        (d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {(f"cifar-100-{s}", archive_md5, s) for s in ("train", "val", "test")}


def test_resumed_run_continues_its_mlflow_run_with_one_value_per_epoch(store, params, tiny_data, quick_train, tmp_path):
    out = tmp_path / "run"
    # Killed after epoch 1's checkpoint but before the tracker saw epoch 1 (the kill comes first in line).
    with pytest.raises(KeyboardInterrupt):
        _fit(params, tiny_data, quick_train, store, out, epochs=3, before=[KillAfter(2)])
    run_id = _run_id(out)
    assert store.client.get_run(run_id).info.status == "KILLED"
    assert _steps(store.client, run_id, "curves/train_loss") == [0]

    _fit(params, tiny_data, quick_train, store, out, epochs=3)

    assert _run_id(out) == run_id
    parent = store.client.get_run(run_id).data.tags["mlflow.parentRunId"]
    query = f"attributes.run_name = 'VGG-08-s0' and tags.`mlflow.parentRunId` = '{parent}'"
    runs = store.client.search_runs([store.experiment_id], query)
    assert [r.info.run_id for r in runs] == [run_id]
    assert _steps(store.client, run_id, "curves/train_loss") == [0, 1, 2]
    assert _steps(store.client, run_id, "grad_mean_abs/entry.conv") == [0, 1, 2]
    assert store.client.get_run(run_id).info.status == "FINISHED"


def test_a_run_the_store_refuses_to_start_is_closed_failed_not_left_running(
    store, params, tiny_data, quick_train, tmp_path, monkeypatch
):
    """The store creates the run, then refuses its params: the stage fails naming the store, and the run it
    created is FAILED with why, not RUNNING for ever in the UI (a retry takes it up again, as any unfinished one)."""
    out = tmp_path / "run"

    def refused(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("the store refused the params")

    monkeypatch.setattr(store.client.unbounded, "log_batch", refused)
    with pytest.raises(TrackingError, match=f"record the params and inputs of {VARIANT}-s0"):
        _fit(params, tiny_data, quick_train, store, out, epochs=1)
    assert not (out / "checkpoints" / "last.pt").exists()
    parent = store.client.search_runs([store.experiment_id], f"attributes.run_name = 'test {out.parent.name}'")
    query = f"attributes.run_name = '{VARIANT}-s0' and tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'"
    (run,) = store.client.search_runs([store.experiment_id], query)
    assert run.info.status == "FAILED"
    assert "the store refused the params" in run.data.tags["vggdepth.error"]

    monkeypatch.undo()
    _fit(params, tiny_data, quick_train, store, out, epochs=1)
    assert _run_id(out) == run.info.run_id
    assert store.client.get_run(run.info.run_id).info.status == "FINISHED"


class _Outage(Callback):
    """Stops the tracking server after epoch `stop_after` and starts it again after epoch `restart_after`."""

    def __init__(self, server: MlflowServer, stop_after: int, restart_after: int | None):
        self.server, self.stop_after, self.restart_after = server, stop_after, restart_after

    def on_epoch_end(self, run, record, gradients):
        if record.epoch == self.stop_after:
            self.server.stop()
        if record.epoch == self.restart_after:
            self.server.start()


@pytest.fixture
def own_server(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    yield server
    server.stop()


def test_server_lost_mid_run_loses_no_epoch(own_server, tracking_cfg, params, tiny_data, quick_train, tmp_path, caplog):
    store = Store(tracking_cfg, uri=own_server.uri)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="vggdepth.tracking"):
        # The outage callback runs before the tracker: epochs 0-2 are logged while the server is down.
        _fit(params, tiny_data, quick_train, store, out, epochs=4, before=[_Outage(own_server, 0, 2)])

    run_id = _run_id(out)
    assert "stopped answering at epoch 0" in caplog.text
    assert "answers again: sent the epochs queued since epoch 0" in caplog.text
    assert _steps(store.client, run_id, "curves/train_loss") == [0, 1, 2, 3]
    assert _steps(store.client, run_id, "grad_l2/head.linear") == [0, 1, 2, 3]
    with open(out / "epochs.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert store.client.get_run(run_id).info.status == "FINISHED"


def test_server_down_until_the_end_reports_what_was_not_sent_and_sync_sends_it(
    own_server, tracking_cfg, params, tiny_data, quick_train, tmp_path, caplog, monkeypatch
):
    store = Store(tracking_cfg, uri=own_server.uri)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="vggdepth.tracking"):
        _fit(params, tiny_data, quick_train, store, out, epochs=3, before=[_Outage(own_server, 0, None)])

    # Training completed: every DVC output is there.
    assert {p.name for p in out.iterdir()} >= {"epochs.csv", "gradients.csv", "train.json", "checkpoints"}
    run_id = _run_id(out)
    assert f"MLflow run {run_id} is missing epochs [0, 1, 2]" in caplog.text
    assert f"python -m vggdepth sync {out}" in caplog.text

    own_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own_server.uri)
    sent = sync_run(params.model_copy(update={"tracking": tracking_cfg}), RunFiles(out))

    assert sent == ["epoch 0", "epoch 1", "epoch 2", "artefacts and model", "gradient-flow figure", "status FINISHED"]
    assert _steps(store.client, run_id, "curves/train_loss") == [0, 1, 2]
    assert "checkpoints" in {a.path for a in store.client.list_artifacts(run_id)}
    assert store.client.get_run(run_id).info.status == "FINISHED"
    assert sync_run(params.model_copy(update={"tracking": tracking_cfg}), RunFiles(out)) == []


def test_unreachable_server_stops_the_stage_before_any_work(params, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match=f"the MLflow tracking server at {uri} cannot be used"):
        training_callbacks(params, VARIANT, 0, Path("data/prepared"))


def test_train_stage_with_unreachable_server_fails_with_the_uri_and_writes_nothing(raw_params, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    params_file = write_yaml(tmp_path / "params.yaml", raw_params)
    args = ["--variant", VARIANT, "--seed", "0", "--out", str(out), "--params", str(params_file)]
    result = run_stage("train", *args, "--data", str(tmp_path / "no-data"), env={**_env(), "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1
    assert f"error: the MLflow tracking server at {uri} cannot be used" in result.stderr
    assert not out.exists()


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def test_embedded_store_is_absolute_under_the_dvc_root(tracking_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.chdir(tmp_path)  # a DVC experiment's temporary copy would be the working directory

    store = Store(tracking_cfg)

    assert store.uri == f"sqlite:///{tmp_path / 'repo' / 'mlruns' / 'mlflow.db'}"
    artifact_root = store.client.get_experiment(store.experiment_id).artifact_location
    assert artifact_root == (tmp_path / "repo" / "mlruns" / "artifacts").as_uri()
