"""Table 1 and the figures of the report, rebuilt from the train and evaluate stages' outputs alone."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from vggdepth.config import Params
from vggdepth.engine import EPOCH_COLUMNS, RunFiles
from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_dir, write_csv, write_json
from vggdepth.gradients import GradientRow

log = logging.getLogger(__name__)

METRICS = ("train_acc", "train_loss", "val_acc", "val_loss")
TEST_METRICS = ("test_acc", "test_loss")


class ReportError(VggdepthError):
    """The runs needed for the report are missing or incomplete."""


@dataclass(frozen=True)
class RunOutputs:
    """What the train and evaluate stages left for one (variant, seed)."""

    variant: str
    seed: int
    files: RunFiles
    epochs: list[dict[str, float]]
    train: dict
    test: dict

    @property
    def last(self) -> dict[str, float]:
        return self.epochs[-1]

    def gradients(self) -> list[GradientRow]:
        with open(self.files.gradients_csv) as f:
            return [
                GradientRow(
                    int(r["epoch"]),
                    r["layer"],
                    int(r["index"]),
                    int(r["numel"]),
                    float(r["mean_abs"]),
                    float(r["last_mean_abs"]),
                    float(r["grad_l2"]),
                    float(r["weight_l2"]),
                )
                for r in csv.DictReader(f)
            ]


def run_of(results: dict[str, list[RunOutputs]], variant: str, seed: int) -> RunOutputs:
    """The run of `variant` with `seed` among collected results."""
    return next(r for r in results[variant] if r.seed == seed)


def read_epochs(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def collect(params: Params, runs: Path) -> dict[str, list[RunOutputs]]:
    """Every variant's runs, one per seed, in params order; a clear error naming what is missing."""
    found: dict[str, list[RunOutputs]] = {}
    missing = []
    for variant in params.variants:
        found[variant] = []
        for seed in params.seeds:
            files = RunFiles.of(runs, variant, seed)
            needed = (files.epochs_csv, files.train_json, files.test_json, files.gradients_csv)
            absent = [p for p in needed if not p.exists()]
            if absent:
                missing += [str(p) for p in absent]
                continue
            found[variant].append(
                RunOutputs(
                    variant,
                    seed,
                    files,
                    read_epochs(files.epochs_csv),
                    json.loads(files.train_json.read_text()),
                    json.loads(files.test_json.read_text()),
                )
            )
    if missing:
        raise ReportError(
            f"the report needs every run's outputs; missing: {', '.join(missing)}. Run `dvc repro` to make them."
        )
    return found


def read_paper_table(path: Path) -> dict[str, dict[str, float]]:
    with open(path) as f:
        return {row["model"]: {k: float(v) for k, v in row.items() if k != "model"} for row in csv.DictReader(f)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table1(params: Params, results: dict[str, list[RunOutputs]], paper: dict[str, dict[str, float]]) -> list[dict]:
    """One row per variant: seed `report.seed` after its last epoch, mean and std over seeds, test metrics of the
    best-validation checkpoint, and the report's numbers with our difference."""
    reference = params.report.reference
    rows = []
    for variant, runs in results.items():
        shown = run_of(results, variant, params.report.seed)
        epochs = len(shown.epochs)
        row: dict = {
            "variant": variant,
            "parameters": shown.train["parameters"],
            "epochs": epochs,
            "comparable": epochs == reference.epochs,
            "seeds": len(runs),
        }
        for metric in METRICS:
            row[metric] = shown.last[metric]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r.last[metric] for r in runs])
        for metric in TEST_METRICS:
            row[metric] = shown.test["best"][metric]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r.test["best"][metric] for r in runs])
        published = dict(paper.get(variant, {}))
        if variant == params.report.final_variant:
            published.update(test_acc=reference.final_test_acc, test_loss=reference.final_test_loss)
        for metric in (*METRICS, *TEST_METRICS):
            row[f"paper_{metric}"] = published.get(metric)
            row[f"diff_{metric}"] = row[metric] - published[metric] if metric in published else None
        rows.append(row)
    return rows


TABLE_COLUMNS = (
    "variant",
    "parameters",
    "epochs",
    "comparable",
    "seeds",
    *(f"{m}{suffix}" for m in (*METRICS, *TEST_METRICS) for suffix in ("", "_mean", "_std")),
    *(f"{kind}_{m}" for m in (*METRICS, *TEST_METRICS) for kind in ("paper", "diff")),
)


def _cell(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"


def table_markdown(params: Params, rows: list[dict]) -> str:
    """Table 1 as the report printed it (seed `report.seed`), then over seeds, then against the report."""
    seed, ref_epochs = params.report.seed, params.report.reference.epochs
    lines = [
        f"### Table 1: seed {seed}, after the last epoch; test of the best-validation checkpoint",
        "",
        "| variant | parameters | epochs | train acc | train loss | val acc | val loss | test acc | test loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        epochs = f"{r['epochs']}" if r["comparable"] else f"{r['epochs']} (not {ref_epochs}: not comparable)"
        lines.append(
            f"| {r['variant']} | {r['parameters']:,} | {epochs} | "
            + " | ".join(_cell(r[m]) for m in (*METRICS, *TEST_METRICS))
            + " |"
        )
    lines += [
        "",
        f"### Over {rows[0]['seeds']} seed(s): mean ± std",
        "",
        "| variant | train acc | train loss | val acc | val loss | test acc | test loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | "
            + " | ".join(f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}" for m in (*METRICS, *TEST_METRICS))
            + " |"
        )
    lines += [
        "",
        f"### Against the report (ours seed {seed} / report / difference)",
        "",
        "| variant | train acc | train loss | val acc | val loss | test acc | test loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = [
            f"{_cell(r[m])} / {_cell(r['paper_' + m]) or '-'} / {_signed(r['diff_' + m]) or '-'}"
            for m in (*METRICS, *TEST_METRICS)
        ]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    if not all(r["comparable"] for r in rows):
        lines += [
            "",
            f"Runs shorter than the report's {ref_epochs} epochs are not comparable with its numbers: "
            "the differences above show how far a reduced run is from them, not a reproduction result.",
        ]
    return "\n".join(lines) + "\n"


def summary_metrics(rows: list[dict]) -> dict:
    """A few numbers per variant, so `dvc exp show` has one column per variant and metric."""
    keys = ("val_acc", "val_loss", "val_acc_mean", "test_acc", "test_acc_mean", "epochs")
    return {r["variant"]: {k: r[k] for k in keys} for r in rows}


def write_curves(results: dict[str, list[RunOutputs]], seed: int, path: Path) -> None:
    """Every variant's per-epoch curves of the shown seed in one long table, for `dvc plots` (one line per
    variant through the `by_variant` template)."""
    write_csv(
        path,
        ("variant", "seed", *EPOCH_COLUMNS),
        [
            [variant, seed, *(row[c] for c in EPOCH_COLUMNS)]
            for variant, runs in results.items()
            for row in run_of(results, variant, seed).epochs
        ],
    )


def build_report(params: Params, runs: Path, out: Path, project: Path) -> dict:
    """Write Table 1 (Markdown, CSV), the summary metrics, the curves and the figures into `out`, atomically."""
    from vggdepth.figures import report_figures

    results = collect(params, runs)
    paper = read_paper_table(project / params.report.reference.table)
    rows = table1(params, results, paper)
    with atomic_dir(out) as staging:
        (staging / "table1.md").write_text(table_markdown(params, rows))
        write_csv(staging / "table1.csv", TABLE_COLUMNS, [[r[c] for c in TABLE_COLUMNS] for r in rows])
        summary = summary_metrics(rows)
        write_json(staging / "summary.json", summary)
        write_curves(results, params.report.seed, staging / "curves.csv")
        for note in report_figures(params, results, project, staging / "figures"):
            log.info("figure skipped: %s", note)
    log.info(
        "report written to %s: %d variants, %d figures", out, len(rows), len(list((out / "figures").glob("*.png")))
    )
    return summary


def check_guard(params: Params, summary: dict) -> list[str]:
    """The study's claim on a summary: the vanishing variant at chance, the fixed one above it.
    Returns one line per check, each starting with PASS or FAIL."""
    guard = params.report.guard
    chance = math.log(params.model.num_classes)
    vanishing, fixed = summary[guard.vanishing], summary[guard.fixed]
    gap = abs(vanishing["val_loss"] - chance)
    return [
        f"{'PASS' if gap <= guard.chance_tolerance else 'FAIL'}: {guard.vanishing} stays at chance: validation "
        f"loss {vanishing['val_loss']:.4f}, ln({params.model.num_classes}) = {chance:.4f}, "
        f"|difference| {gap:.4f} <= {guard.chance_tolerance}",
        f"{'PASS' if fixed['val_acc'] > vanishing['val_acc'] else 'FAIL'}: {guard.fixed} beats {guard.vanishing}: "
        f"validation accuracy {fixed['val_acc']:.4f} > {vanishing['val_acc']:.4f}",
    ]
