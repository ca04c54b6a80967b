"""The report's figures: every row of `report.figures`, drawn from the stage outputs. The training curves come
from vggdepth.figures (which the train stage uses too); the evaluation's figures (per class, superclass confusion,
reliability) are here, so the training stages do not depend on the evaluation's code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from vggdepth.figures import (
    accuracy_figure,
    comparison,
    gradient_flow_panels,
    reference_overlay_figure,
    save_figure,
    seeds_figure,
    variant_colors,
)
from vggdepth.metrics import expected_calibration_error, load_predictions, reliability
from vggdepth.outputs import CURVE_COLUMNS, ReportError, read_epochs, read_table, run_of
from vggdepth.runs import CONFUSION, PER_CLASS, PREDICTIONS


def per_class_figure(results: dict, variants: Sequence[str], seed: int, title: str, named: int = 10) -> Figure:
    """Per-class test accuracy (best checkpoint) of `variants[0]` minus `variants[1]`, classes sorted by the
    difference; the `named` biggest losses and gains labelled with their class."""
    a, b = (run_of(results, v, seed).files / PER_CLASS for v in variants)
    columns = ("class", "name", "accuracy_best")
    rows_a, rows_b = (read_table(path, columns, numeric=("class", "accuracy_best")) for path in (a, b))
    if [r["name"] for r in rows_a] != [r["name"] for r in rows_b]:
        raise ReportError(f"{a} and {b} list different classes; re-run their evaluate stages")
    diffs = sorted(
        ((ra["accuracy_best"] - rb["accuracy_best"], ra["name"]) for ra, rb in zip(rows_a, rows_b, strict=True)),
        key=lambda d: d[0],
    )
    values = [d for d, _ in diffs]
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.bar(range(len(values)), values, color=["tab:green" if v > 0 else "tab:red" for v in values], width=0.8)
    ax.axhline(0, color="black", linewidth=0.8)
    # the `named` biggest losses and gains: classes that differ, not the ties around zero
    shown = [i for i in range(min(named, len(values))) if values[i] < 0]
    shown += [i for i in range(max(len(values) - named, len(shown)), len(values)) if values[i] > 0]
    ax.set_xticks(shown, [diffs[i][1] for i in shown], rotation=90, fontsize=8)
    ax.set_xlim(-0.8, len(values) - 0.2)
    ax.set_xlabel(f"the {len(values)} classes, sorted by the difference (up to {named} biggest losses and gains named)")
    ax.set_ylabel(f"test accuracy: {variants[0]} - {variants[1]}")
    mean = sum(values) / len(values)
    better = sum(v > 0 for v in values)
    ax.set_title(
        f"{title}\n{variants[0]} ahead in {better} classes, behind in {sum(v < 0 for v in values)}; "
        f"mean difference {mean:+.3f}"
    )
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def superclass_confusion_figure(results: dict, variant: str, seed: int, title: str) -> Figure:
    """The best checkpoint's confusion over the superclasses, each row (actual superclass) normalised to 1."""
    path = run_of(results, variant, seed).files / CONFUSION
    rows = read_table(path, ("actual", "predicted", "count"), numeric=("count",))
    names = list(dict.fromkeys(r["actual"] for r in rows))
    index = {name: i for i, name in enumerate(names)}
    if len(rows) != len(names) ** 2 or any(r["predicted"] not in index for r in rows):
        raise ReportError(f"{path} is not a square table of superclass pairs; re-run its evaluate stage")
    counts = np.zeros((len(names), len(names)))
    for r in rows:
        counts[index[r["actual"]], index[r["predicted"]]] = r["count"]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(10, 9))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            if shares[i, j] >= 0.05:
                ax.text(
                    j,
                    i,
                    f"{shares[i, j]:.2f}"[1:] if shares[i, j] < 1 else "1",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
    labels = [n.replace("_", " ") for n in names]
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    ax.set_xlabel("predicted superclass (of the predicted class)")
    ax.set_ylabel("actual superclass")
    accuracy = np.trace(counts) / counts.sum()
    ax.set_title(f"{title}\nsuperclass accuracy {accuracy:.3f}; cells: share of the row, shown from 0.05")
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the actual superclass's test images")
    fig.tight_layout()
    return fig


def reliability_figure(
    results: dict, variants: Sequence[str], seed: int, bins: int, title: str, colors: dict[str, str]
) -> Figure:
    """Reliability diagram of the best checkpoints: accuracy against confidence per confidence bin (above: the
    diagonal is perfect calibration), and the share of test images in each bin (below)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    for variant in variants:
        run = run_of(results, variant, seed)
        pred = load_predictions(run.files / PREDICTIONS, run.test["test_images"])["best"]
        accuracy, confidence, counts = reliability(pred, bins)
        ece = expected_calibration_error(pred, bins)
        top.plot(
            confidence, accuracy, marker="o", markersize=4, color=colors[variant], label=f"{variant} (ECE {ece:.3f})"
        )
        bottom.plot(confidence, counts / counts.sum(), marker="o", markersize=3, color=colors[variant])
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy in the bin")
    top.set_title(title)
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel(f"confidence (probability of the predicted class), {bins} equal-width bins")
    bottom.set_ylabel("share of images")
    bottom.set_ylim(0, None)
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def build_figures(params, results: dict, project: Path) -> dict[str, Figure | str]:
    """Every figure of `report.figures`: the Figure, or why it was not drawn."""
    report, seed = params.report, params.report.seed
    colors, classes = variant_colors(list(params.variants)), params.model.num_classes
    built: dict[str, Figure | str] = {}
    for name, spec in report.figures.items():
        waiting = [v for v in spec.variants if v not in results]
        if waiting:  # a partial report: this figure needs runs that have not finished
            built[name] = f"{name}: needs {', '.join(waiting)}, whose runs have not all finished"
            continue
        number = name.split("-", 1)[0]
        label = number.replace("fig", "Figure ") if number.startswith("fig") and number[3:].isdigit() else "Figure"
        if spec.kind == "accuracy":
            title = f"{label}: {comparison(params, spec.variants)}, seed {seed}"
            built[name] = accuracy_figure(results, spec.variants, seed, title, colors, classes)
        elif spec.kind == "gradient_flow":
            title = f"{label}: gradient flow of {' and '.join(spec.variants)}, seed {seed}"
            built[name] = gradient_flow_panels(results, spec.variants, seed, report.gradient_statistic, title)
        elif spec.kind == "seeds":
            seeds = min(len(results[v]) for v in spec.variants)
            title = f"{label}: validation accuracy of each variant over {seeds} seed(s)"
            built[name] = seeds_figure(results, spec.variants, title, colors, classes)
        elif spec.kind == "per_class":
            title = f"{label}: per-class test accuracy, {' minus '.join(spec.variants)}, seed {seed}"
            built[name] = per_class_figure(results, spec.variants, seed, title)
        elif spec.kind == "superclass_confusion":
            title = f"{label}: {spec.variants[0]}'s test confusion over the superclasses, seed {seed}"
            built[name] = superclass_confusion_figure(results, spec.variants[0], seed, title)
        elif spec.kind == "reliability":
            title = f"{label}: calibration on the test set (best checkpoints), seed {seed}"
            bins = params.evaluate.calibration_bins
            built[name] = reliability_figure(results, spec.variants, seed, bins, title, colors)
        else:
            lengths = {len(run_of(results, v, seed).epochs) for v in spec.variants}
            if lengths != {report.reference.epochs} or not set(spec.variants) <= set(report.reference.curves):
                built[name] = (
                    f"{name}: our runs last {sorted(lengths)} epochs, the reference runs "
                    f"{report.reference.epochs}; drawn only when they match"
                )
                continue
            curves = {v: read_epochs(project / report.reference.curves[v], CURVE_COLUMNS) for v in spec.variants}
            title = f"{label}: {', '.join(spec.variants)}, ours (seed {seed}) vs the course's reference framework"
            built[name] = reference_overlay_figure(results, spec.variants, seed, curves, title, colors, classes)
    return built


def report_figures(params, results: dict, project: Path, out: Path) -> list[str]:
    """Save every figure as `<name>.png` under `out`; return the notes on figures not drawn."""
    skipped = []
    for name, figure in build_figures(params, results, project).items():
        if isinstance(figure, str):
            skipped.append(figure)
        else:
            save_figure(figure, out / f"{name}.png")
    return skipped
