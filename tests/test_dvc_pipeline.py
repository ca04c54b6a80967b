"""The DVC project itself, in a real repository: stages run from dvc.yaml, outputs travel through a DVC remote."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import DVC, dvc_env, tiny_clone
from tests.helpers import run_ok as _run


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, archive_path, archive_md5) -> Path:
    """VGG-08 trains one epoch, untracked."""
    return tiny_clone(tmp_path_factory.mktemp("dvc"), archive_path, archive_md5, epochs=1, tracking=False)


@pytest.mark.slow
def test_stages_run_from_dvc_yaml_and_a_second_repro_does_nothing(tiny_repo):
    _run(DVC, "repro", "evaluate@VGG-08-0", cwd=tiny_repo)

    assert (tiny_repo / "runs" / "VGG-08-s0" / "test.json").exists()
    assert (tiny_repo / "data" / "prepared" / "stats.json").exists()
    again = _run(DVC, "repro", "evaluate@VGG-08-0", cwd=tiny_repo)
    assert "didn't change, skipping" in again
    assert "Running stage" not in again


# Code that draws, reports or syncs: no stage that trains or evaluates runs it, so editing it makes none stale.
PRESENTATION_CODE = (
    "src/vggdepth/figures.py",
    "src/vggdepth/report.py",
    "src/vggdepth/report_figures.py",
    "src/vggdepth/tracking/report.py",
    "src/vggdepth/tracking/sync.py",
)


@pytest.mark.slow
def test_editing_figure_report_or_sync_code_leaves_training_and_evaluation_up_to_date(tiny_repo):
    stages = ["download", "prepare", "labels", "train@VGG-08-0", "evaluate@VGG-08-0"]
    _run(DVC, "repro", *stages, cwd=tiny_repo)
    assert "up to date" in _run(DVC, "status", *stages, cwd=tiny_repo)
    report_deps = {d for d in yaml.safe_load((tiny_repo / "dvc.yaml").read_text())["stages"]["report"]["deps"]}
    for name in PRESENTATION_CODE:
        with (tiny_repo / name).open("a") as f:
            f.write("# an edit: another colour, another sentence\n")
        status = _run(DVC, "status", *stages, cwd=tiny_repo)
        assert "up to date" in status, f"editing {name} made these stale:\n{status}"
        # and the report, which draws and publishes, does see the edit (or never ran the code: sync)
        assert (name in report_deps) == (name != "src/vggdepth/tracking/sync.py"), name
    stale = _run(DVC, "status", "report", cwd=tiny_repo)  # never run here: stale anyway; the edit is in its deps
    assert "report" in stale


@pytest.mark.slow
def test_push_to_a_remote_and_pull_into_a_fresh_clone(tiny_repo, tmp_path):
    _run(DVC, "repro", "train@VGG-08-0", cwd=tiny_repo)
    remote = tmp_path / "remote"
    _run(DVC, "remote", "add", "--default", "storage", str(remote), cwd=tiny_repo)
    _run(DVC, "push", cwd=tiny_repo)
    _run("git", "add", "-A", ".", cwd=tiny_repo)
    _run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "outputs", cwd=tiny_repo)

    fresh = tmp_path / "fresh"
    _run("git", "clone", "--quiet", str(tiny_repo), str(fresh), cwd=tmp_path)
    assert not (fresh / "data" / "prepared").exists()
    _run(DVC, "pull", "--with-deps", "train@VGG-08-0", cwd=fresh)

    for path in (
        "data/prepared/train.npz",
        "data/prepared/stats.json",
        "data/raw/cifar-100-python.tar.gz",
        "runs/VGG-08-s0/checkpoints/best.pt",
        "runs/VGG-08-s0/checkpoints/last.pt",
        "runs/VGG-08-s0/gradients.csv",
    ):
        assert _md5(fresh / path) == _md5(tiny_repo / path), path
    status = _run(DVC, "status", "train@VGG-08-0", cwd=fresh)
    assert "up to date" in status


@pytest.fixture(scope="module")
def tracked_repo(tmp_path_factory, archive_path, archive_md5) -> Path:
    """Two epochs, tracked in the embedded MLflow store under the repository's mlruns/."""
    return tiny_clone(tmp_path_factory.mktemp("dvc-tracked"), archive_path, archive_md5, epochs=2, tracking=True)


def _outputs(repo: Path) -> dict[str, bytes]:
    run = repo / "runs" / "VGG-08-s0"
    files = [run / "epochs.csv", run / "gradients.csv", run / "train.json", run / "test.json"]
    return {str(p.relative_to(repo)): p.read_bytes() for p in [*files, *sorted((run / "checkpoints").iterdir())]}


def _edit_params(repo: Path, edit) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _mlflow_runs(repo: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vggdepth").experiment_id
    runs = client.search_runs([experiment], "attributes.run_name = 'VGG-08-s0'")
    return [
        (r.info.status, sorted(m.step for m in client.get_metric_history(r.info.run_id, "curves/train_loss")))
        for r in runs
    ]


@pytest.mark.slow
def test_rerun_for_any_reason_keeps_the_finished_run(tracked_repo):
    repo = tracked_repo
    _run(DVC, "repro", "evaluate@VGG-08-0", cwd=repo)
    first = _outputs(repo)
    assert _mlflow_runs(repo) == [("FINISHED", [0, 1])]

    # Settings that cannot change a result are not a reason to re-run anything.
    _edit_params(repo, lambda p: p["runtime"].update(threads=1, eval_batch_size=7, progress_every=3))
    _edit_params(repo, lambda p: p["tracking"].update(log_model=False, request_timeout_s=3))
    assert "up to date" in _run(DVC, "status", "train@VGG-08-0", "evaluate@VGG-08-0", cwd=repo)

    # Forced: DVC deletes the outputs, the stage restores them from the finished run's checkpoint. Another
    # evaluation batch size sums the test loss in another order: equal to float rounding, not to the bit.
    _run(DVC, "repro", "--force", "train@VGG-08-0", cwd=repo)
    _run(DVC, "repro", "--force", "evaluate@VGG-08-0", cwd=repo)
    forced = _outputs(repo)
    test_json = "runs/VGG-08-s0/test.json"
    assert {k: v for k, v in forced.items() if k != test_json} == {k: v for k, v in first.items() if k != test_json}
    again, before = json.loads(forced[test_json]), json.loads(first[test_json])
    for kind in ("best", "final"):
        assert again[kind]["test_acc"] == before[kind]["test_acc"]
        assert again[kind]["test_loss"] == pytest.approx(before[kind]["test_loss"], rel=1e-6)
    _edit_params(repo, lambda p: p["runtime"].update(eval_batch_size=500))
    _run(DVC, "repro", "--force", "evaluate@VGG-08-0", cwd=repo)
    assert _outputs(repo) == first

    # An edited output: the stage runs again and writes the original back.
    (repo / "runs" / "VGG-08-s0" / "epochs.csv").write_text("epoch\n0\n")
    _run(DVC, "repro", "train@VGG-08-0", cwd=repo)
    assert _outputs(repo) == first

    # A run that failed on invalid params, then fixed.
    _edit_params(repo, lambda p: p["variants"]["VGG-08"].update(batch_size=0))
    failed = subprocess.run([DVC, "repro", "train@VGG-08-0"], cwd=repo, capture_output=True, text=True, env=dvc_env())
    assert failed.returncode != 0
    assert "variants.VGG-08.batch_size: input should be greater than 0" in failed.stdout + failed.stderr
    _edit_params(repo, lambda p: p["variants"]["VGG-08"].update(batch_size=100))
    _run(DVC, "repro", "evaluate@VGG-08-0", cwd=repo)
    assert _outputs(repo) == first

    assert _mlflow_runs(repo) == [("FINISHED", [0, 1])]  # one run, still finished, every epoch once


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _grid_trained(repo: Path) -> dict[str, int]:
    runs = json.loads((repo / "runs" / "grid.json").read_text())["runs"]
    return {name: run["trained_epochs"] for name, run in runs.items()}


@pytest.mark.slow
def test_repro_trains_the_grid_concurrently_and_dvc_stays_the_source_of_truth(tmp_path, archive_path, archive_md5):
    """Three variants, one seed, one epoch: `dvc repro` trains the runs in the grid stage (on Ray), the train
    stages record them; DVC then knows every output, and changes retrain exactly what they touch. (Tracking in the
    grid: tests/test_grid.py; every variant through the grid: the reduced pipeline of .ci/run.)"""
    repo = tiny_clone(
        tmp_path, archive_path, archive_md5, epochs=1, tracking=False, variants=("VGG-08", "VGG-38", "BN-VGG-38")
    )
    variants = list(yaml.safe_load((repo / "params.yaml").read_text())["variants"])
    first = _run(DVC, "repro", cwd=repo)
    stages = _stages_run(first)
    assert stages.index("grid") < min(stages.index(f"train@{v}-0") for v in variants)
    assert _grid_trained(repo) == {f"{v}-s0": 1 for v in variants}
    for variant in variants:
        assert "(ray node " in json.loads((repo / "runs" / f"{variant}-s0" / "train.json").read_text())["node"]
    assert "Data and pipelines are up to date" in _run(DVC, "status", cwd=repo)
    assert _stages_run(_run(DVC, "repro", cwd=repo)) == []

    # One variant's params: the grid trains its run alone; the other train stages do not run.
    checkpoints = {v: (repo / "runs" / f"{v}-s0" / "checkpoints" / "last.pt").read_bytes() for v in variants}
    _edit_params(repo, lambda p: p["variants"]["VGG-08"].update(lr=2.0e-3))
    stages = _stages_run(_run(DVC, "repro", cwd=repo))
    assert [s for s in stages if s.startswith(("grid", "train@"))] == ["grid", "train@VGG-08-0"]
    assert _grid_trained(repo) == {f"{v}-s0": int(v == "VGG-08") for v in variants}
    for variant in variants[1:]:
        assert (repo / "runs" / f"{variant}-s0" / "checkpoints" / "last.pt").read_bytes() == checkpoints[variant]
    assert "Data and pipelines are up to date" in _run(DVC, "status", cwd=repo)

    # One run by name: trained by its own stage, in-process, without the grid.
    _edit_params(repo, lambda p: p["variants"]["VGG-38"].update(lr=2.0e-3))
    stages = _stages_run(_run(DVC, "repro", "train@VGG-38-0", cwd=repo))
    assert stages == ["train@VGG-38-0"]
    assert "ray node" not in json.loads((repo / "runs" / "VGG-38-s0" / "train.json").read_text())["node"]

    # An experiment with a changed parameter goes through the grid too (VGG-38 is already trained, by its stage).
    _run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-am", "lr", cwd=repo)
    _run(DVC, "exp", "run", "-S", "variants.BN-VGG-38.lr=0.002", cwd=repo)
    assert _grid_trained(repo) == {f"{v}-s0": int(v == "BN-VGG-38") for v in variants}
    assert "Data and pipelines are up to date" in _run(DVC, "status", cwd=repo)
