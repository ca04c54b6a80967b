"""The depth sweep on real images, through the grid on real Ray, tracked by a real MLflow server on 127.0.0.1: its
table, figures and record; the claim `guard --sweep` checks; its own parent run; a re-run that trains nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT, prepare_subset
from tests.helpers import project_env, run_guard, write_yaml
from vggdepth.config import ConfigError, Params, load_params
from vggdepth.data import load_prepared
from vggdepth.outputs import read_epochs
from vggdepth.schemas import RecordError, SweepRecord, read_record
from vggdepth.sweep import (
    SweepError,
    chance_limit,
    check_sweep,
    family_depths,
    points,
    sweep_data,
    sweep_params,
)

pytestmark = pytest.mark.slow

EXPERIMENT = "sweep-test"
FAMILIES, BLOCKS = ["plain", "residual"], [0, 1, 4]  # 8, 14 and 32 layers


@pytest.fixture(scope="module")
def project(archive_path, archive_md5, params, tmp_path_factory) -> Path:
    """The sweep of two families at three depths, one epoch on 20 real images a class, validated on 10 a class."""
    root = tmp_path_factory.mktemp("sweep") / "p"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(url=str(archive_path), md5=archive_md5)
    raw["prepare"]["subset"] = {"train": 20, "val": 10, "test": 1}
    raw["runtime"].update(device="cpu")
    raw["tracking"].update(enabled=True, system_metrics=False, experiment=EXPERIMENT)
    raw["sweep"].update(families=FAMILIES, blocks_per_stage=BLOCKS, epochs=1, subset={"train": 20, "val": 10})
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    prepare_subset(archive_path, root / "data" / "prepared", params, train=20, val=10, test=1)
    return root


def sweep_stage(root: Path, uri: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "pipeline" / "sweep.py"), "--params", str(root / "params.yaml")]
    return subprocess.run(
        command, cwd=root, env=project_env(root, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def swept(project, mlflow_server) -> tuple[Path, subprocess.CompletedProcess]:
    result = sweep_stage(project, mlflow_server.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    return project, result


def record(root: Path) -> dict:
    return json.loads((root / "sweep" / "report" / "sweep.json").read_text())


def test_the_sweep_writes_its_table_figures_and_record(swept):
    root, _ = swept
    report = root / "sweep" / "report"
    assert sorted(p.name for p in (report / "figures").iterdir()) == [
        "entry-gradient-vs-depth.png",
        "val-accuracy-vs-depth.png",
    ]
    rows = record(root)["rows"]
    assert [(r["family"], r["layers"]) for r in rows] == [(f, n) for f in FAMILIES for n in (8, 14, 32)]
    # What each network measured is what its run folder holds
    for row in rows:
        run = root / "sweep" / "runs" / f"{row['family']}-{row['layers']:03d}-s0"
        assert json.loads((run / "train.json").read_text())["val_acc"] == row["val_acc"]
    # With no processing block, a residual network is the plain one: the same seed trains the same numbers
    plain, residual = rows[0], rows[3]
    assert {k: v for k, v in plain.items() if k != "family"} == {k: v for k, v in residual.items() if k != "family"}
    table = (report / "table.md").read_text()
    assert "| plain | 32 | " in table and "| residual | 32 | " in table
    assert read_record(report / "sweep.json", SweepRecord).rows[0].family == "plain"


def test_the_claim_holds_plain_gradients_fall_with_depth_residual_ones_do_not(swept, params):
    root, _ = swept
    p = load_params(root / "params.yaml")
    rows = record(root)["rows"]
    plain = [r["entry_grad"] for r in rows if r["family"] == "plain"]
    residual = [r["entry_grad"] for r in rows if r["family"] == "residual"]
    assert plain[0] > plain[1] > plain[2] and plain[2] < p.sweep.vanishing_below
    assert min(residual) > p.sweep.learning_above
    assert [line.split(":")[0] for line in check_sweep(p, record(root))] == ["PASS", "PASS"]
    # The deep plain network stops learning because its gradient vanished, and the table says so
    deep = rows[2]
    assert not deep["learns"] and f"entry gradient {deep['entry_grad']:.1e} < 1e-10" in deep["why"]
    assert record(root)["vanished"] == {"plain": 14 if plain[1] < p.sweep.vanishing_below else 32, "residual": None}
    assert "| residual | " in (root / "sweep" / "report" / "table.md").read_text()


def test_at_chance_means_within_the_standard_error_of_one_in_a_hundred(swept):
    root, _ = swept
    data = record(root)
    assert data["val_images"] == 1000
    assert data["chance_limit"] == pytest.approx(0.01 + 3 * math.sqrt(0.01 * 0.99 / 1000))
    assert chance_limit(100, 1000, 3) == pytest.approx(0.019439, abs=1e-6)
    assert chance_limit(100, 5000, 2) == pytest.approx(0.012814, abs=1e-6)


def test_a_finite_loss_however_large_is_a_measurement_the_sweep_records(project, tmp_path):
    """A 104-layer batch-norm network at a high learning rate ends its epoch with a validation loss far above a million
    (eval mode's running statistics are far from its batches'): finite, so a result, not a damaged file."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    raw["sweep"].update(families=["bn"], blocks_per_stage=[16], lr=5e-2)
    root = tmp_path / "p"
    root.mkdir()
    write_yaml(root / "params.yaml", raw)
    (root / "data").symlink_to(project / "data")
    result = sweep_stage(root, f"sqlite:///{tmp_path / 'unused.db'}")
    last = read_epochs(root / "sweep" / "runs" / "bn-104-s0" / "epochs.csv")[-1]
    assert last["val_loss"] > 1e6  # the case this test is about (measured: 2.6e11)
    assert result.returncode == 0, result.stderr[-3000:]
    row = record(root)["rows"][0]
    assert row["val_loss"] == pytest.approx(last["val_loss"], rel=1e-9) and not row["learns"]


# The default profile's record, measured on this machine (README "A depth sweep"): residual networks learn at 20 and
# 56 layers between 14 and 32 that do not, and 104 does not.
MEASURED = ROOT / "results" / "2026-12-02-sweep-1dc4a38" / "sweep.json"


def test_a_family_stops_learning_from_the_depth_on_which_every_deeper_network_does():
    measured = json.loads(MEASURED.read_text())
    families = ["plain", "bn", "residual", "bn-residual"]
    depths = family_depths(measured["rows"], families, 1e-10, measured["chance_limit"])
    assert depths == {
        "stops": {"plain": 20, "bn": 56, "residual": 104, "bn-residual": None},
        "vanished": {"plain": 20, "bn": None, "residual": None, "bn-residual": None},
        "at_chance": {"plain": 20, "bn": 56, "residual": 104, "bn-residual": None},
    }


def test_a_gradient_that_rises_again_after_an_exact_zero_does_not_fall_with_depth(params):
    rows = [
        {"family": "plain", "layers": n, "entry_grad": g, "val_acc": 0.01, "val_loss": 4.6, "learns": False}
        for n, g in ((8, 3e-3), (20, 0.0), (56, 0.0), (104, 1e-20))
    ]
    assert check_sweep(params, {"rows": rows[:3]})[0].startswith("PASS")  # zero, then zero: still vanished
    assert check_sweep(params, {"rows": rows})[0].startswith("FAIL")  # zero, then 1e-20: it rose


def test_make_reduced_runs_the_small_sweep_ci_guards():
    # CI runs this suite under `make test`: a parent make's MAKELEVEL and MAKEFLAGS would make this one print
    # "Leaving directory" lines, so it runs as if called from a shell, and the command is found by what it runs.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "reduced", "DATA=/tmp/archive.tar.gz"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [line for line in dry.splitlines() if "dvc exp run" in line]
    assert len(commands) == 1, dry
    command = commands[0]
    for override in ("'sweep.families=[plain,residual]'", "'sweep.blocks_per_stage=[0,2,8]'", "sweep.epochs=1"):
        assert override in command, command


def test_the_sweep_is_its_own_parent_run_in_mlflow(swept, mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vggdepth.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("depth sweep, ")
    parent = parents[0]
    training = {r.info.run_name: r for r in runs if r.data.tags.get("vggdepth.kind") == "training"}
    assert sorted(training) == sorted(f"{f}-{n:03d}-s0" for f in FAMILIES for n in (8, 14, 32))
    for run in training.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["dvc_stage"] == "sweep"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "grad_mean_abs/entry.conv")] == [0]
    stops = record(swept[0])["stops"]
    assert parent.data.tags["vggdepth.sweep.stops.plain"] == f"{stops['plain']} layers"
    assert parent.data.params["sweep.families"] == json.dumps(FAMILIES)
    assert parent.data.tags["mlflow.note.content"].startswith(f"The {parent.info.run_name}: the parent of one training")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "table.csv", "sweep.json", "sweep_table.json", "figures"} <= artifacts


def test_a_second_sweep_trains_nothing_and_tracks_nothing_twice(swept, mlflow_server):
    root, _ = swept
    before = record(root)
    result = sweep_stage(root, mlflow_server.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every run is trained to train.epochs; nothing to do" in result.stderr
    assert record(root) == before
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert len(client.search_runs([experiment.experiment_id])) == 1 + len(FAMILIES) * len(BLOCKS)


def test_settings_changed_and_changed_back_report_the_runs_of_these_settings(project, tmp_path):
    """A -> B -> A: back at A, the grid brings A's checkpoints back from `superseded/` and trains nothing; the
    tables, which B overwrote, are A's again."""
    root = tmp_path / "p"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("sweep", "mlruns"))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    raw["sweep"].update(families=["plain"], blocks_per_stage=[0])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert sweep_stage(root, "").returncode == 0
    first = record(root)
    raw["sweep"]["lr"] = 3e-3
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert sweep_stage(root, "").returncode == 0
    assert record(root)["rows"][0]["val_loss"] != first["rows"][0]["val_loss"]
    raw["sweep"]["lr"] = 1e-3
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    again = sweep_stage(root, "")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr
    assert record(root) == first


def test_guard_checks_the_sweep_and_fails_when_its_claim_breaks(swept, params, tmp_path):
    root, _ = swept
    path = root / "sweep" / "report" / "sweep.json"
    result = run_guard(params, tmp_path, sweep=path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2].startswith("PASS: plain networks' entry-layer gradient falls with depth, below 1e-10")
    assert lines[-1].startswith("PASS: residual networks' entry-layer gradient stays above 1e-06 at every depth")

    broken = record(root)
    broken["rows"][5]["entry_grad"] = 1e-12  # a residual network whose gradient vanished after all
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    result = run_guard(params, tmp_path, sweep=tmp_path / "broken.json")
    assert result.returncode == 1
    assert "FAIL: residual networks' entry-layer gradient stays above 1e-06 at every depth" in result.stdout

    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{**broken["rows"][0], "entry_grad": "small"}]}))
    result = run_guard(params, tmp_path, sweep=tmp_path / "bad.json")
    assert result.returncode == 1
    assert "bad.json: rows.0.entry_grad: input should be a valid number (found 'small')" in result.stderr


def test_a_plain_family_at_one_depth_is_no_evidence(swept):
    root, _ = swept
    p = load_params(root / "params.yaml")
    one = {"rows": [r for r in record(root)["rows"] if r["family"] == "plain"][-1:]}
    assert check_sweep(p, one)[0].startswith("FAIL") and "(one depth: nothing to compare)" in check_sweep(p, one)[0]
    without_plain = {"rows": [r for r in record(root)["rows"] if r["family"] == "residual"]}
    assert check_sweep(p, without_plain)[0] == (
        "FAIL: the sweep has no plain networks: nothing shows where gradients vanish with depth"
    )


def test_the_sweep_asks_for_no_more_images_than_were_prepared(project):
    p = load_params(project / "params.yaml")
    prepared = load_prepared(project / "data" / "prepared")
    too_many = p.model_copy(
        update={"sweep": p.sweep.model_copy(update={"subset": p.sweep.subset.model_copy(update={"train": 21})})}
    )
    with pytest.raises(ConfigError, match=r"sweep.subset.train: 21 images per class asked, but the prepared train "):
        sweep_data(prepared, too_many)
    data = sweep_data(prepared, p)
    assert data.stats["sizes"] == {"train": 2000, "val": 1000, "test": 100}


def test_sweep_networks_are_variants_beside_the_studys_and_may_not_share_a_name(params):
    derived = sweep_params(params)
    assert set(params.variants) < set(derived.variants)
    deepest = derived.variants[points(params)[-1].variant]
    assert (deepest.blocks_per_stage, deepest.batch_norm, deepest.residual) == (16, True, True)
    assert derived.train.epochs == params.sweep.epochs and derived.seeds == [params.sweep.seed]
    assert not derived.tracking.log_model
    raw = json.loads(params.model_dump_json())
    raw["variants"]["plain-008"] = raw["variants"]["VGG-08"]
    with pytest.raises(SweepError, match="variants: plain-008 is also the name of a sweep network"):
        sweep_params(Params.model_validate(raw))
    raw = json.loads(params.model_dump_json())
    raw["sweep"]["families"] = ["plain", "plain"]
    with pytest.raises(ValueError, match=r"sweep.families: each value must appear once"):
        Params.model_validate(raw)


def test_a_damaged_sweep_record_is_refused_by_name(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"rows": [{"family": "wide", "layers": 8}]}))
    with pytest.raises(RecordError, match=r"sweep.json: rows.0.family: input should be 'plain', 'bn', 'residual'"):
        read_record(path, SweepRecord)
    measured = {"family": "plain", "layers": 8, "entry_grad": 1e-3, "val_acc": 0.2, "val_loss": 4.0, "learns": True}
    blank = dict.fromkeys(("entry_grad", "val_acc", "val_loss"))
    for row, message in (
        ({**measured, "entry_grad": None}, "rows.0: entry_grad missing: only a diverged network has no measurement"),
        ({**measured, "diverged": True, "learns": False}, "rows.0: a diverged network has no measurement"),
        ({**measured, **blank, "diverged": True}, "rows.0: a diverged network has no measurement and does not learn"),
    ):
        path.write_text(json.dumps({"rows": [row]}))
        with pytest.raises(RecordError, match=message):
            read_record(path, SweepRecord)
    path.write_text(json.dumps({"rows": [measured, {**measured, **blank, "diverged": True, "learns": False}]}))
    assert [row.diverged for row in read_record(path, SweepRecord).rows] == [False, True]


def test_a_network_that_diverges_is_a_row_of_the_sweep_not_its_failure(project, tmp_path):
    """At Adam lr 10 the 14-layer residual network's loss becomes NaN in its first epoch (measured: step 2), while
    the others end theirs with finite, if huge, numbers: the sweep records it as diverged, without numbers, and goes
    on; the guard cannot judge its family and says so; a re-run trains it again and records the same."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    raw["sweep"].update(families=["plain", "residual"], blocks_per_stage=[0, 1], lr=10.0)
    root = tmp_path / "p"
    root.mkdir()
    write_yaml(root / "params.yaml", raw)
    (root / "data").symlink_to(project / "data")
    result = sweep_stage(root, f"sqlite:///{tmp_path / 'unused.db'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "grid: residual-014-s0 FAILED: residual-014 seed 0: the training loss became NaN or infinite" in (
        result.stdout + result.stderr
    )
    assert "sweep: residual-014-s0 diverged, recorded as not learning" in result.stderr
    rows = {(r["family"], r["layers"]): r for r in record(root)["rows"]}
    diverged = rows["residual", 14]
    assert diverged["diverged"] and not diverged["learns"]
    assert [diverged[k] for k in ("entry_grad", "val_acc", "val_loss", "train_acc")] == [None] * 4
    assert diverged["why"].startswith("diverged: the training loss became NaN or infinite at epoch 0, step ")
    assert diverged["parameters"] == rows["plain", 14]["parameters"]  # the same network without its shortcuts' use
    for key, row in rows.items():  # every other one measured, from its run's own tables
        if key != ("residual", 14):
            run = root / "sweep" / "runs" / f"{key[0]}-{key[1]:03d}-s0"
            assert not row["diverged"] and json.loads((run / "train.json").read_text())["val_acc"] == row["val_acc"]
    assert record(root)["stops"]["residual"] == 8  # a diverged network has stopped learning too
    table = (root / "sweep" / "report" / "table.md").read_text()
    assert f"| residual | 14 | {diverged['parameters']:,} | — | — | — | — | no: {diverged['why']} |" in table
    unmeasured = "none up to 14 (not measured at 14: diverged)"  # neither reason can be claimed where nothing was
    assert f"| residual | 8 layers | {unmeasured} | {unmeasured} | none |" in table
    assert read_record(root / "sweep" / "report" / "sweep.json", SweepRecord).rows[3].diverged
    lines = check_sweep(load_params(root / "params.yaml"), record(root))
    assert lines[1] == (
        "FAIL: residual networks diverged at 14 layers (a NaN or infinite loss): no gradient measured there, so "
        "nothing to judge; lower sweep.lr or leave those depths out"
    )
    again = sweep_stage(root, f"sqlite:///{tmp_path / 'unused.db'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 4 runs to train" in again.stdout + again.stderr  # only the diverged one: it diverges again
    assert record(root)["rows"] == list(rows.values())
