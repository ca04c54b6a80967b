"""The DVC project itself, in a real repository: stages run from dvc.yaml, outputs travel through a DVC remote."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DVC = str(Path(sys.executable).parent / "dvc")


def _run(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # stages call `python`: this one
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, archive_path, archive_md5) -> Path:
    """A clone of this repository whose params make VGG-08 train one epoch on 200 real images, untracked."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    _run("git", "clone", "--quiet", str(ROOT), str(repo), cwd=repo.parent)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # this checkout's params, committed or not
    params["data"].update(url=str(archive_path), md5=archive_md5)
    params["prepare"]["subset"] = {"train": 2, "val": 1, "test": 1}
    params["train"].update(epochs=1, device="cpu")
    params["seeds"] = [0]
    params["tracking"]["enabled"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("dvc.yaml", "pipeline", "src"):  # this checkout's pipeline, committed or not
        _run("cp", "-r", str(ROOT / name), str(repo), cwd=repo)
    _run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-am", "tiny", cwd=repo)
    return repo


@pytest.mark.slow
def test_stages_run_from_dvc_yaml_and_a_second_repro_does_nothing(tiny_repo):
    _run(DVC, "repro", "evaluate@VGG-08-0", cwd=tiny_repo)

    assert (tiny_repo / "runs" / "VGG-08-s0" / "test.json").exists()
    assert (tiny_repo / "data" / "prepared" / "stats.json").exists()
    again = _run(DVC, "repro", "evaluate@VGG-08-0", cwd=tiny_repo)
    assert "didn't change, skipping" in again
    assert "Running stage" not in again


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
