"""The report stage: Table 1 values from the stage outputs, mean/std over seeds, the report's numbers, every
figure's series, and the registered model, built from a tiny real study (every variant, two seeds, one epoch)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection

from tests.conftest import ROOT, write_yaml
from tests.helpers import run_guard
from vggdepth.batches import DeviceDataset
from vggdepth.checkpoints import load_checkpoint, load_network
from vggdepth.engine import Trainer
from vggdepth.evaluation import evaluate_run
from vggdepth.figures import save_figure
from vggdepth.report import ReportError, build_report, collect
from vggdepth.report_figures import build_figures
from vggdepth.runs import RunFiles
from vggdepth.tracking.callback import MlflowCallback
from vggdepth.tracking.report import log_report
from vggdepth.tracking.results import log_evaluation
from vggdepth.tracking.store import PipelineContext, Store

SEEDS = [0, 1]


@pytest.fixture(autouse=True)
def _close_figures():
    """Tests that inspect figures keep them open; close them after each test, so none piles up for the next."""
    yield
    plt.close("all")


@pytest.fixture(scope="session")
def study(params, tiny_data, tiny_data_dir, labels, tmp_path_factory):
    """Real train and evaluate outputs of every variant for two seeds (1 epoch, 200 images), tracked in an
    embedded MLflow store under a temporary project root."""
    root = tmp_path_factory.mktemp("study")
    p = params.model_copy(
        update={
            "seeds": SEEDS,
            "train": params.train.model_copy(update={"epochs": 1}),
            "runtime": params.runtime.model_copy(update={"device": "cpu"}),
            "tracking": params.tracking.model_copy(update={"system_metrics": False}),
        }
    )
    store = Store(p.tracking, uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", root=root)
    context = PipelineContext(key="test:study", name="test study", tags={"git_commit": "test"})
    for variant in p.variants:
        for seed in SEEDS:
            files = RunFiles.of(root / "runs", variant, seed)
            tracker = MlflowCallback(store, context, f"train@{variant}-{seed}", tiny_data_dir)
            Trainer(
                model=p.model,
                train=p.train,
                runtime=p.runtime,
                variant_name=variant,
                variant=p.variant(variant),
                seed=seed,
                data=tiny_data,
                files=files,
                callbacks=[tracker],
            ).fit()
            evaluation = evaluate_run(files, tiny_data, labels, p.train, p.runtime, p.evaluate)
            evaluation.write(files, labels, publish=partial(log_evaluation, store, files, evaluation.result))
    return {"params": p, "root": root, "runs": root / "runs", "store": store, "context": context}


@pytest.fixture(scope="session")
def built(study):
    out = study["root"] / "report"
    summary = build_report(study["params"], study["runs"], out, project=ROOT)
    with open(out / "table1.csv") as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    return {"out": out, "summary": summary, "rows": rows}


def _epochs(study, variant, seed) -> list[dict]:
    with open(study["runs"] / f"{variant}-s{seed}" / "epochs.csv") as f:
        return list(csv.DictReader(f))


def _test(study, variant, seed) -> dict:
    return json.loads((study["runs"] / f"{variant}-s{seed}" / "test.json").read_text())


def test_table_holds_the_metrics_files_values(study, built):
    rows = built["rows"]
    assert list(rows) == list(study["params"].variants)
    for variant, row in rows.items():
        last = _epochs(study, variant, 0)[-1]
        for metric in ("train_acc", "train_loss", "val_acc", "val_loss"):
            assert float(row[metric]) == float(last[metric]), (variant, metric)
        for metric in ("test_acc", "test_top5", "test_ece", "test_superclass_acc"):
            assert float(row[metric]) == _test(study, variant, 0)["best"][metric], (variant, metric)
        assert (row["epochs"], row["comparable"], row["seeds"]) == ("1", "False", "2")
    assert rows["VGG-08"]["parameters"] == "59716"
    assert rows["BN-VGG-38"]["parameters"] == "338500"


def test_mean_and_std_are_over_seeds(study, built):
    for variant, row in built["rows"].items():
        vals = [float(_epochs(study, variant, s)[-1]["val_acc"]) for s in SEEDS]
        tests = [_test(study, variant, s)["best"]["test_loss"] for s in SEEDS]
        assert float(row["val_acc_mean"]) == pytest.approx(statistics.fmean(vals), abs=1e-12)
        assert float(row["val_acc_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
        assert float(row["test_loss_mean"]) == pytest.approx(statistics.fmean(tests), abs=1e-12)
        assert float(row["test_loss_std"]) == pytest.approx(statistics.stdev(tests), abs=1e-12)


def test_paper_columns_match_the_published_table(built):
    with open(ROOT / "reference" / "paper-table1.csv") as f:
        paper = {row["model"]: row for row in csv.DictReader(f)}
    assert {v for v, row in built["rows"].items() if row["in_paper"] == "True"} == set(paper)
    for variant, row in built["rows"].items():
        if variant not in paper:  # a row beyond the report: nothing to compare with
            assert row["paper_val_acc"] == row["diff_val_acc"] == "" and row["in_paper"] == "False"
            continue
        for metric in ("train_acc", "train_loss", "val_acc", "val_loss"):
            assert float(row[f"paper_{metric}"]) == float(paper[variant][metric])
            assert float(row[f"diff_{metric}"]) == pytest.approx(float(row[metric]) - float(paper[variant][metric]))
    final = built["rows"]["WR50-HIGHLR-BN-38"]
    assert (float(final["paper_test_acc"]), float(final["paper_test_loss"])) == (0.501, 1.859)
    assert built["rows"]["VGG-08"]["paper_test_acc"] == ""  # the report tested only its final model


def test_table1_holds_the_reports_rows_and_a_second_table_the_rows_beyond_it(built):
    """Table 1 keeps the report's six rows (and only they are compared with it); the residual rows, which the
    paper does not have, come in a table of their own, seed 0 and over seeds."""
    text = (built["out"] / "table1.md").read_text()
    table1, beyond = text.split("### Beyond the report (rows the paper does not have): seed 0")
    against = table1[table1.index("### Against the report") :]
    for variant in ("VGG-08", "VGG-38", "BN-VGG-38", "HIGHLR-BN-38", "WR50-HIGHLR-BN-38", "MBS50-BN-38"):
        assert f"| {variant} |" in table1 and f"| {variant} |" in against and f"| {variant} |" not in beyond
    for variant in ("RC-VGG-38", "BN-RC-VGG-38"):
        assert f"| {variant} |" not in table1
        assert beyond.count(f"| {variant} |") == 2  # seed 0, and over seeds


def test_curves_hold_every_variants_epochs_of_the_shown_seed(study, built):
    with open(built["out"] / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == list(study["params"].variants)  # one epoch each
    for row in rows:
        assert row["seed"] == "0"
        assert float(row["val_acc"]) == float(_epochs(study, row["variant"], 0)[int(row["epoch"])]["val_acc"])


def test_markdown_marks_short_runs_as_not_comparable(built):
    text = (built["out"] / "table1.md").read_text()
    assert "| VGG-08 | 59,716 | 1 (not 100: not comparable) |" in text
    assert "not comparable with its numbers" in text
    assert "0.501 /" in text  # the report's test accuracy of its final model is beside ours


def test_summary_has_one_entry_per_variant_and_metric(built, study):
    summary = json.loads((built["out"] / "summary.json").read_text())
    assert list(summary) == list(study["params"].variants)
    assert set(summary["VGG-38"]) == {
        "val_acc",
        "val_loss",
        "val_acc_mean",
        "test_acc",
        "test_acc_mean",
        "test_top5",
        "test_ece",
        "test_superclass_acc",
        "epochs",
        "entry_grad_min",
        "entry_grad_max",
    }
    # what the evaluation adds, from the run's test.json (best checkpoint, seed 0)
    best = _test(study, "VGG-08", 0)["best"]
    assert summary["VGG-08"]["test_top5"] == best["test_top5"] >= best["test_acc"]
    assert summary["VGG-08"]["test_ece"] == best["test_ece"]
    # The guard's mechanism, from the real gradient tables: VGG-38's entry layer gets nothing, VGG-08's does.
    assert summary["VGG-38"]["entry_grad_max"] < 1e-10 < 1e-6 < summary["VGG-08"]["entry_grad_min"]


def test_every_figure_is_written(built, study):
    figures = sorted(p.name for p in (built["out"] / "figures").iterdir())
    expected = sorted(
        f"{name}.png" for name, spec in study["params"].report.figures.items() if spec.kind != "reference_overlay"
    )
    assert figures == expected
    assert all((built["out"] / "figures" / name).stat().st_size > 10_000 for name in figures)


def test_figures_carry_the_expected_series(study, tmp_path):
    p = study["params"]
    figures = build_figures(p, collect(p, study["runs"]), ROOT)

    (ax,) = figures["fig1-accuracy-vgg08-vs-vgg38"].axes
    assert [line.get_label() for line in ax.get_lines()] == [
        "VGG-08 train",
        "VGG-08 validation",
        "VGG-38 train",
        "VGG-38 validation",
        "chance (1%)",
    ]
    assert list(ax.get_lines()[-1].get_ydata()) == [0.01, 0.01]
    assert ax.get_title() == "Figure 1: 8 layers vs 38 layers (VGG-08 vs VGG-38), seed 0"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "accuracy")
    val = _epochs(study, "VGG-38", 0)
    assert list(ax.get_lines()[3].get_ydata()) == [float(r["val_acc"]) for r in val]

    left, right = figures["fig2-gradient-flow-vgg08-vs-vgg38"].axes
    assert left.get_yscale() == "log" and right.get_yscale() == "log"
    assert len(left.get_xticklabels()) == 9 and len(right.get_xticklabels()) == 39
    assert [t.get_text() for t in left.get_xticklabels()] == [
        "entry.c",
        "entry.bn",
        "s0.r.c0",
        "s0.r.c1",
        "s1.r.c0",
        "s1.r.c1",
        "s2.r.c0",
        "s2.r.c1",
        "head",
    ]
    assert [line.get_label() for line in left.get_lines() if not line.get_label().startswith("_")] == ["epoch 0"]
    marks = [text.get_text() for text in left.texts]  # where each stage begins
    assert marks == ["entry", "stage0", "stage1", "stage2", "head"]
    assert len(left.get_lines()) == 1 + 4  # one line per epoch, a dotted line between stages

    grid = [a for a in figures["fig3-val-accuracy-over-seeds"].axes if a.get_visible()]
    assert [a.get_title() for a in grid] == p.report.figures["fig3-val-accuracy-over-seeds"].variants
    for a in grid:
        assert sum(isinstance(c, PolyCollection) for c in a.collections) == 1  # the min-max band
        assert [line.get_label() for line in a.get_lines()] == ["mean of 2 seeds", "chance (1%)"]
    # One colour per variant in every figure: BN-VGG-38's in figures 3, 4 and 5 alike.
    bn_colour = grid[p.report.figures["fig3-val-accuracy-over-seeds"].variants.index("BN-VGG-38")].get_lines()[0]
    bn_colour = bn_colour.get_color()
    for name in ("fig4-lr-7.5e-3-vs-1e-3", "fig5-warm-restart-vs-none"):
        (a,) = figures[name].axes
        assert {line.get_color() for line in a.get_lines() if line.get_label().startswith("BN-VGG-38 ")} == {bn_colour}
    assert figures["fig4-lr-7.5e-3-vs-1e-3"].axes[0].get_title() == (
        "Figure 4: learning rate 7.5e-3 vs 1e-3 (HIGHLR-BN-38 vs BN-VGG-38), seed 0"
    )
    # A title longer than the figure is wide wraps (whole words, names unbroken) rather than widen the image.
    title = figures["fig5-warm-restart-vs-none"].axes[0].get_title()
    assert title.splitlines() == [
        "Figure 5: learning rate 7.5e-3 vs 1e-3; warm restarts every 50 epochs vs cosine",
        "over 100 epochs (WR50-HIGHLR-BN-38 vs BN-VGG-38), seed 0",
    ]
    widths = {}
    for name in ("fig4-lr-7.5e-3-vs-1e-3", "fig5-warm-restart-vs-none"):
        save_figure(figures[name], tmp_path / f"{name}.png")
        widths[name] = plt.imread(tmp_path / f"{name}.png").shape[1]
    assert widths["fig5-warm-restart-vs-none"] < 1.1 * widths["fig4-lr-7.5e-3-vs-1e-3"], widths

    (bn,) = figures["fig6-gradient-flow-bn-vgg38"].axes
    assert len(bn.get_xticklabels()) == 75
    assert [line.get_label() for line in figures["fig5-warm-restart-vs-none"].axes[0].get_lines()] == [
        "WR50-HIGHLR-BN-38 train",
        "WR50-HIGHLR-BN-38 validation",
        "BN-VGG-38 train",
        "BN-VGG-38 validation",
        "chance (1%)",
    ]
    assert "drawn only when they match" in figures["reference-overlay-vgg08-vgg38"]

    # Figures 10 and 11, beyond the report: the residual rows named beside the plain ones they extend.
    plain, shortcut = figures["fig10-gradient-flow-residual"].axes[:2]
    assert (plain.get_title(), shortcut.get_title()) == ("VGG-38 (seed 0)", "RC-VGG-38 (seed 0)")
    (ax,) = figures["fig11-accuracy-residual"].axes
    rows = ("VGG-38", "RC-VGG-38", "BN-VGG-38", "BN-RC-VGG-38")
    assert [line.get_label() for line in ax.get_lines()] == [
        *(f"{v} {kind}" for v in rows for kind in ("train", "validation")),
        "chance (1%)",
    ]

    # Figure 7: per-class accuracy differences, sorted, from the two runs' per_class.csv; the extremes named.
    (ax,) = figures["fig7-per-class-final-vs-vgg08"].axes
    heights = [bar.get_height() for bar in ax.patches]
    accuracy = {}
    for v in ("WR50-HIGHLR-BN-38", "VGG-08"):
        with open(study["runs"] / f"{v}-s0" / "per_class.csv") as f:
            accuracy[v] = {r["name"]: float(r["accuracy_best"]) for r in csv.DictReader(f)}
    differences = sorted(accuracy["WR50-HIGHLR-BN-38"][c] - accuracy["VGG-08"][c] for c in accuracy["VGG-08"])
    assert heights == pytest.approx(differences) and len(heights) == 100
    named = [t.get_text() for t in ax.get_xticklabels()]
    gap = {c: accuracy["WR50-HIGHLR-BN-38"][c] - accuracy["VGG-08"][c] for c in accuracy["VGG-08"]}
    losses, gains = sum(d < 0 for d in differences), sum(d > 0 for d in differences)
    assert len(named) == min(losses, 10) + min(gains, 10)  # classes that differ only, at most 10 a side
    assert all(gap[c] != 0 for c in named)
    if losses:
        assert gap[named[0]] == pytest.approx(differences[0])

    # Figure 8: the superclass matrix, rows normalised, labelled with the archive's superclass names.
    (ax, _colorbar) = figures["fig8-superclass-confusion-final"].axes
    shares = ax.get_images()[0].get_array()
    assert shares.shape == (20, 20)
    assert np.allclose(shares.sum(axis=1), 1)  # every superclass has test images, so every row sums to 1
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["aquatic mammals", "fish"]

    # Figure 9: one reliability curve per variant (ECE in its label) and the diagonal.
    top, _bottom = figures["fig9-reliability"].axes
    labels = [line.get_label() for line in top.get_lines()]
    assert labels[0] == "perfectly calibrated"
    for variant, label in zip(("BN-VGG-38", "HIGHLR-BN-38", "WR50-HIGHLR-BN-38"), labels[1:], strict=True):
        assert label == f"{variant} (ECE {_test(study, variant, 0)['best']['test_ece']:.3f})"


def test_reference_overlay_is_drawn_for_runs_as_long_as_the_reference(study):
    p = study["params"]
    results = collect(p, study["runs"])
    reference = p.report.reference.model_copy(update={"epochs": 1})
    figures = build_figures(
        p.model_copy(update={"report": p.report.model_copy(update={"reference": reference})}), results, ROOT
    )
    (ax,) = figures["reference-overlay-vgg08-vgg38"].axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert "VGG-08 (reference) validation" in labels and "VGG-38 (ours) train" in labels
    reference_line = next(line for line in ax.get_lines() if line.get_label() == "VGG-08 (reference) validation")
    assert len(reference_line.get_ydata()) == 101  # the shipped reference curve, resume row included


@pytest.fixture(scope="module")
def registered(study, built):
    """The report's final model registered (`report.registered_model` @ `report.alias`): (name, version)."""
    return log_report(study["store"], study["params"], built["out"], study["runs"], study["context"])


def _best_run(study) -> RunFiles:
    """The final variant's run the report registers: the seed of the best validation accuracy."""
    final = study["params"].report.final_variant
    return max(
        (RunFiles(study["runs"] / f"{final}-s{s}") for s in SEEDS),
        key=lambda f: json.loads(f.train_json.read_text())["best_val_acc"],
    )


def test_final_model_is_registered_and_loads_by_alias(study, built, registered, tiny_data):
    p = study["params"]
    name, version = registered

    model = mlflow.pyfunc.load_model(f"models:/{name}@{p.report.alias}")
    checkpoint = load_checkpoint(_best_run(study).best)
    images, _ = next(DeviceDataset(tiny_data.test, tiny_data.mean, tiny_data.std, torch.device("cpu")).batches(64))
    with torch.no_grad():
        expected = torch.softmax(load_network(checkpoint, torch.device("cpu"))(images).double(), dim=1).numpy()
    answer = model.predict(np.ascontiguousarray(tiny_data.test.images[:64].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(answer.to_numpy(), expected, rtol=0, atol=1e-6)
    assert answer.shape == (64, 100) and list(answer.columns) == list(tiny_data.classes)
    assert study["store"].client.get_model_version_by_alias(name, p.report.alias).version == version
    parent = study["store"].parent_run(study["context"])
    artefacts = {a.path for a in study["store"].client.list_artifacts(parent)}
    assert {"table1.json", "table1.md", "table1.csv", "summary.json", "figures"} <= artefacts
    logged_figures = {a.path for a in study["store"].client.list_artifacts(parent, "figures")}
    for figure in ("fig7-per-class-final-vs-vgg08", "fig8-superclass-confusion-final", "fig9-reliability"):
        assert f"figures/{figure}.png" in logged_figures
    # Table 1 as an MLflow table with the CSV's rows, and no per-cell metrics on the parent.
    table = mlflow.load_table("table1.json", run_ids=[parent])
    with (built["out"] / "table1.csv").open() as f:
        expected = list(csv.DictReader(f))
    assert table.astype(str).to_dict("records") == expected
    assert not study["store"].client.get_run(parent).data.metrics
    # Every run of the report gets its gradient-flow figure in its own MLflow run, once.
    client = study["store"].client
    for variant in p.variants:
        for seed in SEEDS:
            run_id = load_checkpoint(RunFiles.of(study["runs"], variant, seed).last)["extra"]["mlflow_run_id"]
            assert [a.path for a in client.list_artifacts(run_id) if a.path.endswith(".png")] == ["gradient_flow.png"]
    log_report(study["store"], p, built["out"], study["runs"], study["context"])
    assert [a.path for a in client.list_artifacts(run_id) if a.path.endswith(".png")] == ["gradient_flow.png"]


def test_the_registered_model_served_over_http_answers_raw_images_as_the_evaluate_stage_did(
    study, registered, tiny_data, tmp_path
):
    """`mlflow models serve -m models:/<registered>@champion --env-manager local` on 127.0.0.1, as the README tells a
    user to run it; real test images posted as raw uint8 N x 32 x 32 x 3; the answer, one probability per class
    name, agrees with the evaluate stage's predictions.npz for those images (which it computed under the run's
    precision, bfloat16 on a CPU that has it: hence the tolerance)."""
    import os
    import signal
    import urllib.request

    from tests.conftest import free_port
    from vggdepth.metrics import load_predictions

    p = study["params"]
    name, _ = registered
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": study["store"].uri}
    command = ["mlflow", "models", "serve", "-m", f"models:/{name}@{p.report.alias}", "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        images = tiny_data.test.images[:20].transpose(0, 2, 3, 1)  # as a user has them: N x 32 x 32 x 3 uint8
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        for _ in range(240):  # the server loads the model from the registry first
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve ended: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())["predictions"]
                break
            except (ConnectionError, urllib.error.URLError):
                import time

                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow models serve never answered: {(tmp_path / 'serve.log').read_text()[-3000:]}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    served = np.array([[row[c] for c in tiny_data.classes] for row in answer])
    assert served.shape == (20, 100) and set(answer[0]) == set(tiny_data.classes)
    np.testing.assert_allclose(served.sum(axis=1), 1, atol=1e-9)
    evaluated = load_predictions(_best_run(study).root / "predictions.npz", len(tiny_data.test))["best"]
    top, top_prob = evaluated.top[:20], evaluated.top_prob[:20]
    np.testing.assert_allclose(np.take_along_axis(served, top, axis=1), top_prob, rtol=0.02, atol=1e-4)
    # The class the evaluate stage found most probable is the served one, up to bfloat16's rounding in near ties.
    assert (np.take_along_axis(served, top[:, :1], axis=1)[:, 0] >= 0.98 * served.max(axis=1)).all()
    clear = top_prob[:, 0] - top_prob[:, 1] > 0.02 * top_prob[:, 0]
    assert (served.argmax(axis=1) == top[:, 0])[clear].all()


def test_report_command_prints_table1(study, tmp_path):
    params_file = write_yaml(tmp_path / "params.yaml", json.loads(study["params"].model_dump_json()))
    (tmp_path / "reference").symlink_to(ROOT / "reference")
    result = subprocess.run(
        [sys.executable, "-m", "vggdepth", "report", "--runs", str(study["runs"]), "--params", str(params_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("### Table 1: seed 0")
    assert "| MBS50-BN-38 | 338,500 |" in result.stdout
    assert "| test acc | test loss | test top-5 | test ECE |" in result.stdout
    best = _test(study, "MBS50-BN-38", 0)["best"]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| MBS50-BN-38 | 338,500 |"))
    assert row.endswith(f"| {best['test_top5']:.3f} | {best['test_ece']:.3f} |")


def test_report_names_missing_runs(study, tmp_path):
    p = study["params"].model_copy(update={"seeds": [0, 1, 2]})
    with pytest.raises(ReportError, match=r"missing: .*VGG-08-s2/epochs.csv"):
        build_report(p, study["runs"], tmp_path / "report", project=ROOT)
    assert not (tmp_path / "report").exists()


def test_a_partial_report_covers_the_finished_variants_and_names_the_rest(study, tmp_path):
    """A study still training: VGG-08 and VGG-38 have both seeds, BN-VGG-38 only seed 0, the rest nothing."""
    runs = tmp_path / "runs"
    for name in ("VGG-08-s0", "VGG-08-s1", "VGG-38-s0", "VGG-38-s1", "BN-VGG-38-s0"):
        shutil.copytree(study["runs"] / name, runs / name, ignore=shutil.ignore_patterns("checkpoints"))

    build_report(study["params"], runs, tmp_path / "report", project=ROOT, partial=True)

    with open(tmp_path / "report" / "table1.csv") as f:
        assert [row["variant"] for row in csv.DictReader(f)] == ["VGG-08", "VGG-38"]
    table = (tmp_path / "report" / "table1.md").read_text()
    waiting = "BN-VGG-38, HIGHLR-BN-38, WR50-HIGHLR-BN-38, MBS50-BN-38, RC-VGG-38, BN-RC-VGG-38"
    assert f"Still training, so not in these tables yet: {waiting}." in table
    drawn = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert drawn == ["fig1-accuracy-vgg08-vs-vgg38.png", "fig2-gradient-flow-vgg08-vs-vgg38.png"]
    assert set(json.loads((tmp_path / "report" / "summary.json").read_text())) == {"VGG-08", "VGG-38"}
    with pytest.raises(ReportError, match=r"missing: .*BN-VGG-38-s1/epochs.csv"):
        build_report(study["params"], runs, tmp_path / "strict", project=ROOT)
    shutil.rmtree(runs)
    runs.mkdir()
    with pytest.raises(ReportError, match="missing"):  # nothing finished: nothing to render
        build_report(study["params"], runs, tmp_path / "none", project=ROOT, partial=True)


def test_guard_passes_when_the_mechanism_and_the_accuracy_claim_hold(params, tmp_path):
    result = run_guard(params, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    margin = params.report.guard.accuracy_margin
    assert result.stdout.splitlines() == [
        "PASS: VGG-38's gradients vanish: entry-layer mean |gradient| at most 3.0e-18 in every epoch < 1e-10",
        "PASS: VGG-08's gradients reach the entry layer: mean |gradient| at least 4.0e-04 in every epoch > 1e-06",
        "PASS: BN-VGG-38's gradients reach the entry layer: mean |gradient| at least 2.0e-05 in every epoch > 1e-06",
        "PASS: VGG-38 stays at chance: validation loss 4.6100, ln(100) = 4.6052, |difference| 0.0048 <= 0.05",
        f"PASS: VGG-08 beats VGG-38: validation accuracy 0.2000 vs 0.0100, lead +0.1900 > {margin}",
        f"PASS: BN-VGG-38 beats VGG-38: validation accuracy 0.2000 vs 0.0100, lead +0.1900 > {margin}",
    ]


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        (
            {"VGG_38": {"entry_grad_max": 2e-8}},
            "FAIL: VGG-38's gradients vanish: entry-layer mean |gradient| at most 2.0e-08",
        ),
        ({"BN_VGG_38": {"entry_grad_min": 3e-9}}, "FAIL: BN-VGG-38's gradients reach the entry layer"),
        ({"VGG_38": {"val_loss": 4.0}}, "FAIL: VGG-38 stays at chance: validation loss 4.0000"),
        ({"BN_VGG_38": {"val_acc": 0.01}}, "FAIL: BN-VGG-38 beats VGG-38: validation accuracy 0.0100 vs 0.0100"),
    ],
)
def test_guard_fails_when_the_claim_breaks(params, tmp_path, changes, failed):
    result = run_guard(params, tmp_path, **changes)
    assert result.returncode == 1
    assert failed in result.stdout
    assert sum(line.startswith("FAIL") for line in result.stdout.splitlines()) == 1


def test_guard_without_a_summary_says_what_to_do(params, tmp_path):
    params_file = write_yaml(tmp_path / "params.yaml", json.loads(params.model_dump_json()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vggdepth",
            "guard",
            "--summary",
            str(tmp_path / "none.json"),
            "--params",
            str(params_file),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'none.json'} is missing; run the pipeline (`dvc repro`) to make it\n"


def test_dvc_plots_show_renders_every_chart_offline(study, built, tmp_path):
    """`dvc plots show` with the project's plots (dvc.yaml), templates and page (.dvc/), on this study's curves and
    one run's epochs.csv: one page that loads nothing from the network (the vega libraries are inlined), with every
    chart and the scale each needs."""
    import shutil

    import yaml

    dvc = str(Path(sys.executable).parent / "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots", dirs_exist_ok=True)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / "report").mkdir()
    shutil.copy(built["out"] / "curves.csv", repo / "report" / "curves.csv")
    project = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (run_plot,) = project["stages"]["train"]["plots"]
    ((_, props),) = run_plot.items()
    epochs = "runs/VGG-38-s0/epochs.csv"
    (repo / "runs" / "VGG-38-s0").mkdir(parents=True)
    shutil.copy(study["runs"] / "VGG-38-s0" / "epochs.csv", repo / epochs)
    plots = [*project["plots"], {epochs: {k: v for k, v in props.items() if k != "cache"}}]
    evaluated = {}  # the evaluate stage's plots of one run: superclass confusion, per-class accuracy
    for entry in project["stages"]["evaluate"]["plots"]:
        ((path, props),) = entry.items()
        path = path.replace("${item.variant}-s${item.seed}", "VGG-08-s0")
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(study["runs"] / "VGG-08-s0" / Path(path).name, repo / path)
        plots.append({path: {k: v for k, v in props.items() if k != "cache"}})
        evaluated[Path(path).name] = path
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))

    shown = subprocess.run([dvc, "plots", "show", "-o", "shown"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    page = (repo / "shown" / "index.html").read_text()
    assert "<script src" not in page and "cdn.jsdelivr" not in page  # nothing fetched: it renders offline
    assert "vega-embed 6.18.2" in page and "vegaEmbed(" in page
    for entry in project["plots"]:
        (title,) = entry
        assert title in page, title
    decoder, marker = json.JSONDecoder(), "var spec = "
    specs = [decoder.raw_decode(part)[0] for part in page.split("<body>", 1)[1].split(marker)[1:]]
    by_title = {s["title"]["text"] if isinstance(s["title"], dict) else s["title"]: s for s in specs}
    assert by_title["validation loss per epoch"]["encoding"]["y"]["scale"]["type"] == "log"
    lr = by_title["learning rate per epoch"]
    assert lr["encoding"]["y"]["scale"]["type"] == "log" and lr["encoding"]["shape"]["field"] == "variant"
    assert {row["variant"] for row in lr["data"]["values"]} == set(study["params"].variants)
    run = by_title[epochs]
    assert run["encoding"]["y"]["axis"]["format"] == ".3f" and run["encoding"]["y"]["scale"]["domainMin"] == 0
    confusion = by_title[evaluated["superclass_confusion.csv"]]
    assert confusion["spec"]["transform"][0]["aggregate"] == [{"op": "sum", "field": "count", "as": "images"}]
    assert len(confusion["data"]["values"]) == 400  # 20 x 20 superclass pairs, not one row per image
    assert sum(int(v["count"]) for v in confusion["data"]["values"]) == _test(study, "VGG-08", 0)["test_images"]
    per_class = by_title[evaluated["per_class.csv"]]
    assert len(per_class["data"]["values"]) == 100
    assert {per_class["encoding"]["x"]["field"], per_class["encoding"]["y"]["field"]} == {"accuracy_best", "name"}


def test_evaluation_reaches_each_runs_mlflow_run(study):
    """Every test metric of both checkpoints is a run metric (what the compare view and `dvc metrics` show), and
    the evaluation's tables are the run's artefacts."""
    store = study["store"]
    parent = store.parent_run(study["context"])
    query = f"attributes.run_name = 'HIGHLR-BN-38-s1' and tags.`mlflow.parentRunId` = '{parent}'"
    (run,) = store.client.search_runs([store.experiment_id], query)
    result = _test(study, "HIGHLR-BN-38", 1)
    for kind in ("best", "final"):
        for name in (
            "test_loss",
            "test_acc",
            "test_top5",
            "test_superclass_acc",
            "test_macro_f1",
            "test_ece",
            "test_nll",
        ):
            assert run.data.metrics[f"{name}_{kind}"] == pytest.approx(result[kind][name]), (name, kind)
    tables = {a.path for a in store.client.list_artifacts(run.info.run_id, "evaluation")}
    assert tables == {f"evaluation/{n}" for n in ("predictions.npz", "per_class.csv", "superclass_confusion.csv")}
