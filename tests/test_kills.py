"""Fault injection: every stage killed with SIGKILL at a chosen moment (found with inotify, not with sleeps),
then run again: it must end with the outputs of an undisturbed run and leave nothing behind."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT, prepare_subset
from tests.helpers import IN_CREATE, Watch, project_env, same_run
from vggdepth.labels import write_labels
from vggdepth.runs import RunFiles

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(archive_path, archive_md5, params, tmp_path_factory):
    """A project folder: params for 200/100/100 real images and 3 epochs, prepared data, the reference files."""
    root = tmp_path_factory.mktemp("kills")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(url=str(archive_path), md5=archive_md5)
    raw["prepare"]["subset"] = {"train": 2, "val": 1, "test": 1}
    raw["train"]["epochs"] = 3
    raw["runtime"].update(device="cpu", progress_every=1)
    raw["seeds"] = [0]
    raw["tracking"].update(enabled=False, system_metrics=False)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    prepare_subset(archive_path, root / "data" / "prepared", params, train=2, val=1, test=1)
    write_labels(archive_path, root / "data" / "labels.json")
    shutil.copytree(ROOT / "reference", root / "reference")
    return root


def _copy(project: Path, dest: Path, tracking: bool = False) -> Path:
    shutil.copytree(project, dest)
    if tracking:
        raw = yaml.safe_load((dest / "params.yaml").read_text())
        raw["tracking"]["enabled"] = True
        (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def _command(root: Path, stage: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline" / f"{stage}.py"), *args, "--params", str(root / "params.yaml")]


def _run(root: Path, stage: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(root, stage, *args), cwd=root, env=project_env(root), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _kill_when(root: Path, stage: str, args: tuple[str, ...], moment: Callable[[subprocess.Popen], None]) -> None:
    """Start a stage, wait for `moment`, SIGKILL it, and check it really died there."""
    process = subprocess.Popen(
        _command(root, stage, *args), cwd=root, env=project_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        moment(process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the stage ended before it could be killed"


def _leftovers(root: Path, theirs: tuple[Path, ...] = ()) -> list[str]:
    """Temporary files and staging folders anywhere under `root`, but a user's own (`theirs`)."""
    return [
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if "mlruns" not in p.parts
        and (p.name.endswith(".part") or (p.is_dir() and p.name.count(".") >= 2))
        and not any(p == mine or mine in p.parents for mine in theirs)
    ]


def _theirs(folder: Path, output: str) -> tuple[Path, ...]:
    """A user's own files beside an output, named like its temporary ones but not by its writers: a backup folder,
    a `.part` file of their own, and names one character off the writers' pattern. Clean-up must keep every one."""
    made = (
        folder / f".{output}.backup-before-upgrade",
        folder / f".{output}.notes.part",
        folder / f".{output}.vggdepth-tmp-mine",
        folder / f".{output}.vggdepth-tmp-abcd12345.part",
        folder / f".{output}.old",
    )
    for path in made:
        if path.suffix == ".part" or path.name.endswith(".old"):
            path.write_text("mine\n")
        else:
            path.mkdir()
            (path / "keep.txt").write_text("mine\n")
    return made


def _kept(made: tuple[Path, ...]) -> bool:
    return all((p / "keep.txt").read_text() == "mine\n" if p.is_dir() else p.read_text() == "mine\n" for p in made)


TRAIN_ARGS = ("--variant", "BN-VGG-38", "--seed", "0", "--data", "data/prepared", "--out", "runs/BN-VGG-38-s0")


@pytest.fixture(scope="module")
def undisturbed(project, tmp_path_factory) -> Path:
    """The same project run from start to end without a fault: train, evaluate, report."""
    root = _copy(project, tmp_path_factory.mktemp("undisturbed") / "p")
    for variant in yaml.safe_load((root / "params.yaml").read_text())["variants"]:
        _run(
            root, "train", "--variant", variant, "--seed", "0", "--data", "data/prepared", "--out", f"runs/{variant}-s0"
        )
        _run(root, "evaluate", "--run", f"runs/{variant}-s0", "--data", "data/prepared")
    _run(root, "report", "--runs", "runs", "--out", "report")
    return root


def _mid_epoch(root: Path) -> Callable[[subprocess.Popen], None]:
    def moment(process):
        watch = Watch(root / "runs" / "BN-VGG-38-s0")
        watch.wait(lambda name: name == "epochs.csv")  # epoch 0 is done, epoch 1 has begun
        watch.close()

    return moment


def _during_checkpoint_write(root: Path) -> Callable[[subprocess.Popen], None]:
    """Stop the stage the moment it starts writing last.pt after epoch 1 or 2 (when previous.pt exists) and keep
    it stopped if the write is still unfinished; the kill then lands inside the write."""
    folder = root / "runs" / "BN-VGG-38-s0" / "checkpoints"

    def moment(process):
        watch = Watch(folder, IN_CREATE)
        watch.wait(lambda name: name.startswith(".last.pt."))  # end of epoch 0: nothing to fall back to yet
        for _ in range(2):
            watch.wait(lambda name: name.startswith(".last.pt."))
            process.send_signal(signal.SIGSTOP)
            if list(folder.glob(".last.pt.*.part")):
                watch.close()
                return
            process.send_signal(signal.SIGCONT)  # the write won the race: try at the next epoch
        watch.close()
        raise AssertionError("no checkpoint write could be caught unfinished")

    return moment


@pytest.mark.parametrize("when", ["mid-epoch", "checkpoint-write"])
def test_train_killed_resumes_to_the_undisturbed_run(project, undisturbed, tmp_path, when):
    root = _copy(project, tmp_path / "p", tracking=True)
    moment = _mid_epoch(root) if when == "mid-epoch" else _during_checkpoint_write(root)

    _kill_when(root, "train", TRAIN_ARGS, moment)
    if when == "checkpoint-write":
        assert list((root / "runs" / "BN-VGG-38-s0" / "checkpoints").glob(".last.pt.*.part"))  # killed mid-write
    _run(root, "train", *TRAIN_ARGS)

    same_run(RunFiles(root / "runs" / "BN-VGG-38-s0"), RunFiles(undisturbed / "runs" / "BN-VGG-38-s0"))
    assert _leftovers(root) == []
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("vggdepth").experiment_id], "attributes.run_name = 'BN-VGG-38-s0'"
    )
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run, continued, closed
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "curves/train_loss")) == [0, 1, 2]


def test_download_killed_mid_transfer_completes_on_rerun(project, archive_path, archive_md5, tmp_path):
    root = _copy(project, tmp_path / "p")
    dest = root / "data" / "raw" / "cifar-100-python.tar.gz"

    def moment(process):
        watch = Watch(dest.parent, IN_CREATE)
        part = dest.parent / watch.wait(lambda name: name.endswith(".part"))
        watch.close()
        while part.exists() and part.stat().st_size < 20 << 20:  # 20 MB of 161 in
            time.sleep(0.002)

    _kill_when(root, "download", ("--out", str(dest)), moment)
    assert list(dest.parent.glob(".*.part")) and not dest.exists()
    _run(root, "download", "--out", str(dest))

    assert dest.stat().st_size == archive_path.stat().st_size
    assert _leftovers(root) == []


def test_prepare_killed_mid_write_gives_the_same_data_on_rerun(project, archive_path, tmp_path):
    root = _copy(project, tmp_path / "p")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["prepare"]["subset"]["train"] = None  # all 47,500 training images: a write long enough to kill inside
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out, reference = root / "data" / "prepared", root / "reference-prepared"
    _run(root, "prepare", "--archive", str(archive_path), "--out", str(reference))

    def moment(process):
        watch = Watch(out.parent, IN_CREATE)
        staging = out.parent / watch.wait(lambda name: name.startswith(".prepared."))
        watch.close()
        part = staging / "train.npz"
        while process.poll() is None and not (part.exists() and part.stat().st_size > 20 << 20):
            time.sleep(0.001)  # 20 MB of the 146 MB of training images written

    _kill_when(root, "prepare", ("--archive", str(archive_path), "--out", str(out)), moment)
    assert list(out.parent.glob(".prepared.vggdepth-tmp-*"))
    theirs = _theirs(out.parent, "prepared")
    _run(root, "prepare", "--archive", str(archive_path), "--out", str(out))
    assert _kept(theirs)  # the killed writer's staging folder is gone (below), the user's look-alikes are not

    import numpy as np

    for name in ("train", "val", "test"):
        with np.load(out / f"{name}.npz") as got, np.load(reference / f"{name}.npz") as want:
            for key in ("images", "labels", "index"):
                assert np.array_equal(got[key], want[key]), (name, key)
    assert (out / "stats.json").read_text() == (reference / "stats.json").read_text()
    assert _leftovers(root, theirs) == []


def test_evaluate_killed_writes_the_same_test_json_on_rerun(project, undisturbed, tmp_path):
    root = _copy(project, tmp_path / "p")
    shutil.copytree(undisturbed / "runs", root / "runs")
    test_json = root / "runs" / "VGG-38-s0" / "test.json"
    for name in ("test.json", "predictions.npz", "per_class.csv", "superclass_confusion.csv"):
        (test_json.parent / name).unlink()
    args = ("--run", "runs/VGG-38-s0", "--data", "data/prepared")

    def moment(process):
        for line in process.stderr:  # the best checkpoint is evaluated, the final one not yet
            if b"best checkpoint (epoch" in line:
                return

    _kill_when(root, "evaluate", args, moment)
    assert not test_json.exists()
    _run(root, "evaluate", *args)

    assert test_json.read_text() == (undisturbed / "runs" / "VGG-38-s0" / "test.json").read_text()
    for name in ("per_class.csv", "superclass_confusion.csv"):
        assert (test_json.parent / name).read_text() == (undisturbed / "runs" / "VGG-38-s0" / name).read_text()
    with (
        np.load(test_json.parent / "predictions.npz") as got,
        np.load(undisturbed / "runs/VGG-38-s0/predictions.npz") as want,
    ):
        assert sorted(got.files) == sorted(want.files)
        assert all(np.array_equal(got[key], want[key]) for key in got.files)
    assert _leftovers(root) == []


def test_report_killed_mid_write_gives_the_same_report_on_rerun(project, undisturbed, tmp_path):
    root = _copy(project, tmp_path / "p")
    shutil.copytree(undisturbed / "runs", root / "runs")

    def moment(process):
        watch = Watch(root, IN_CREATE)
        staging = root / watch.wait(lambda name: name.startswith(".report."))
        watch.close()
        inner = Watch(staging / "figures", IN_CREATE)
        inner.wait(lambda name: name.startswith(".fig2"))  # tables written, figures half done
        inner.close()

    _kill_when(root, "report", ("--runs", "runs", "--out", "report"), moment)
    assert not (root / "report").exists()
    theirs = _theirs(root, "report")  # in the repository's root, beside report/
    _run(root, "report", "--runs", "runs", "--out", "report")
    assert _kept(theirs)

    for name in ("table1.md", "table1.csv", "summary.json", "curves.csv"):
        assert (root / "report" / name).read_text() == (undisturbed / "report" / name).read_text(), name
    figures = sorted(p.name for p in (root / "report" / "figures").iterdir())
    assert figures == sorted(p.name for p in (undisturbed / "report" / "figures").iterdir())
    assert _leftovers(root, theirs) == []
