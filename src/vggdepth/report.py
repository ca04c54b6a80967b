"""Table 1 and the figures of the report, rebuilt from the train and evaluate stages' outputs alone."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Collection
from pathlib import Path

from vggdepth.config import Params
from vggdepth.files import atomic_dir, write_csv, write_json
from vggdepth.outputs import CURVE_COLUMNS, ReportError, RunOutputs, collect, read_table, run_of, verdict
from vggdepth.runs import EPOCH_COLUMNS

__all__ = ["ReportError", "build_report", "check_guard", "collect", "table1", "table_markdown"]

log = logging.getLogger(__name__)

METRICS = ("train_acc", "train_loss", "val_acc", "val_loss")
TEST_METRICS = ("test_acc", "test_loss")  # the report has these, so they are compared with it


def evaluation_metrics(params: Params) -> tuple[str, str, str]:
    """The evaluate stage's further test metrics in Table 1 and the summary (the report has none of them)."""
    return params.evaluate.top_k_metric, "test_ece", "test_superclass_acc"


def read_paper_table(path: Path) -> dict[str, dict[str, float]]:
    """The report's own Table 1 (`report.reference.table`), by variant."""
    rows = read_table(path, ("model", *CURVE_COLUMNS), numeric=CURVE_COLUMNS)
    return {row.pop("model"): row for row in rows}


def entry_gradients(runs: list[RunOutputs]) -> tuple[float, float]:
    """(min, max) over the runs' epochs of the entry layer's mean |gradient|: the study's mechanism in two
    numbers (below 1e-10 when gradients vanish, around 1e-3 when they flow)."""
    values = [g.mean_abs for run in runs for g in run.gradients() if g.index == 0]
    if not values:
        raise ReportError(f"{runs[0].files.gradients_csv} has no gradient statistics (train.grad_stats is off?)")
    return min(values), max(values)


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
        row["entry_grad_min"], row["entry_grad_max"] = entry_gradients(runs)
        for metric in METRICS:
            row[metric] = shown.last[metric]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r.last[metric] for r in runs])
        for metric in (*TEST_METRICS, *evaluation_metrics(params)):
            row[metric] = shown.test["best"][metric]
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r.test["best"][metric] for r in runs])
        row["in_paper"] = variant in paper  # Table 1; else a row beyond the report, in a table of its own
        published = dict(paper.get(variant, {}))
        if variant == params.report.final_variant:
            published.update(test_acc=reference.final_test_acc, test_loss=reference.final_test_loss)
        for metric in (*METRICS, *TEST_METRICS):
            row[f"paper_{metric}"] = published.get(metric)
            row[f"diff_{metric}"] = row[metric] - published[metric] if metric in published else None
        rows.append(row)
    return rows


def table_columns(params: Params) -> tuple[str, ...]:
    """The columns of `table1.csv`."""
    shown = (*METRICS, *TEST_METRICS, *evaluation_metrics(params))
    return (
        "variant",
        "parameters",
        "epochs",
        "comparable",
        "in_paper",
        "seeds",
        "entry_grad_min",
        "entry_grad_max",
        *(f"{m}{suffix}" for m in shown for suffix in ("", "_mean", "_std")),
        *(f"{kind}_{m}" for m in (*METRICS, *TEST_METRICS) for kind in ("paper", "diff")),
    )


def _cell(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"


def _result_tables(params: Params, rows: list[dict], title: str) -> list[str]:
    """Markdown: `rows` for seed `report.seed` under `title`, then mean ± std over seeds."""
    ref_epochs, k = params.report.reference.epochs, params.evaluate.top_k
    shown = (*METRICS, *TEST_METRICS, *evaluation_metrics(params)[:2])  # top-k and ECE; the CSV has all three
    headers = f"train acc | train loss | val acc | val loss | test acc | test loss | test top-{k} | test ECE"
    lines = [
        f"### {title}: seed {params.report.seed}, after the last epoch; test of the best-validation checkpoint",
        "",
        f"| variant | parameters | epochs | {headers} |",
        "| --- | ---: | ---: |" + " ---: |" * len(shown),
    ]
    for r in rows:
        epochs = f"{r['epochs']}" if r["comparable"] else f"{r['epochs']} (not {ref_epochs}: not comparable)"
        lines.append(
            f"| {r['variant']} | {r['parameters']:,} | {epochs} | " + " | ".join(_cell(r[m]) for m in shown) + " |"
        )
    lines += [
        "",
        f"### {title}, over {rows[0]['seeds']} seed(s): mean ± std",
        "",
        f"| variant | {headers} |",
        "| --- |" + " ---: |" * len(shown),
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | " + " | ".join(f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}" for m in shown) + " |"
        )
    return lines


def table_markdown(params: Params, rows: list[dict], only: Collection[str] | None = None) -> str:
    """Table 1 (the rows the report has) as the report printed it (seed `report.seed`), then over seeds, then
    against the report; then the rows beyond the report (`in_paper` false) the same way, in a table of their own.
    `only`: the variants of a study narrowed to some rows (the others are named as another study's)."""
    seed, ref_epochs = params.report.seed, params.report.reference.epochs
    table, beyond = [r for r in rows if r["in_paper"]], [r for r in rows if not r["in_paper"]]
    lines = _result_tables(params, table, "Table 1") if table else []
    if table:
        lines += [
            "",
            f"### Against the report (ours seed {seed} / report / difference)",
            "",
            "| variant | train acc | train loss | val acc | val loss | test acc | test loss |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for r in table:
        cells = [
            f"{_cell(r[m])} / {_cell(r['paper_' + m]) or '-'} / {_signed(r['diff_' + m]) or '-'}"
            for m in (*METRICS, *TEST_METRICS)
        ]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    if beyond:
        lines += ["", *_result_tables(params, beyond, "Beyond the report (rows the paper does not have)")]
    waiting = [v for v in params.variants if v not in {r["variant"] for r in rows} and (only is None or v in only)]
    if waiting:
        lines += ["", f"Still training, so not in these tables yet: {', '.join(waiting)}."]
    if only is not None:
        lines += [
            "",
            f"This study trains only {', '.join(v for v in params.variants if v in only)}: the other rows "
            "are another study's.",
        ]
    if not all(r["comparable"] for r in rows):
        lines += [
            "",
            f"Runs shorter than the report's {ref_epochs} epochs are not comparable with its numbers: "
            "the differences above show how far a reduced run is from them, not a reproduction result.",
        ]
    return "\n".join(lines).lstrip("\n") + "\n"


def summary_metrics(params: Params, rows: list[dict]) -> dict:
    """A few numbers per variant, so `dvc exp show` has one column per variant and metric."""
    keys = (
        "val_acc",
        "val_loss",
        "val_acc_mean",
        "test_acc",
        "test_acc_mean",
        *evaluation_metrics(params),
        "epochs",
        "entry_grad_min",
        "entry_grad_max",
    )
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


def build_report(
    params: Params,
    runs: Path,
    out: Path,
    project: Path,
    publish: Callable[[Path], object] | None = None,
    partial: bool = False,
    only: Collection[str] | None = None,
) -> dict:
    """Write Table 1 (Markdown, CSV), the summary metrics, the curves and the figures into `out`, atomically.
    `publish` (MLflow) gets the finished report before it is put in place: when it fails, `out` is unchanged.
    `partial`: over the variants whose every run has finished (a study still training), the others named as
    still to come and the figures that need them left out; `only` (with `partial`): a study narrowed to these
    variants, the others named as another study's."""
    from vggdepth.report_figures import report_figures

    results = collect(params, runs, partial)
    paper = read_paper_table(project / params.report.reference.table)
    rows = table1(params, results, paper)
    with atomic_dir(out) as staging:
        (staging / "table1.md").write_text(table_markdown(params, rows, only))
        columns = table_columns(params)
        write_csv(staging / "table1.csv", columns, [[r[c] for c in columns] for r in rows])
        summary = summary_metrics(params, rows)
        write_json(staging / "summary.json", summary)
        write_curves(results, params.report.seed, staging / "curves.csv")
        for note in report_figures(params, results, project, staging / "figures"):
            log.info("figure skipped: %s", note)
        if publish is not None:
            publish(staging)
    log.info(
        "report written to %s: %d variants, %d figures", out, len(rows), len(list((out / "figures").glob("*.png")))
    )
    return summary


def check_guard(params: Params, summary: dict) -> list[str]:
    """The study's claim on a summary, one line per check starting with PASS or FAIL: the mechanism (the
    vanishing variant's entry-layer gradient below `vanishing_below` in every epoch, the learning variants'
    above `learning_above`), the vanishing variant at chance, and the learning variants ahead of it on
    validation accuracy by `accuracy_margin`."""
    guard = params.report.guard
    chance = math.log(params.model.num_classes)
    vanishing = summary[guard.vanishing]
    lines = [
        verdict(
            vanishing["entry_grad_max"] < guard.vanishing_below,
            f"{guard.vanishing}'s gradients vanish: entry-layer mean |gradient| at most "
            f"{vanishing['entry_grad_max']:.1e} in every epoch < {guard.vanishing_below:.0e}",
        )
    ]
    for name in guard.learning:
        lines.append(
            verdict(
                summary[name]["entry_grad_min"] > guard.learning_above,
                f"{name}'s gradients reach the entry layer: mean |gradient| at least "
                f"{summary[name]['entry_grad_min']:.1e} in every epoch > {guard.learning_above:.0e}",
            )
        )
    gap = abs(vanishing["val_loss"] - chance)
    lines.append(
        verdict(
            gap <= guard.chance_tolerance,
            f"{guard.vanishing} stays at chance: validation loss {vanishing['val_loss']:.4f}, "
            f"ln({params.model.num_classes}) = {chance:.4f}, |difference| {gap:.4f} <= {guard.chance_tolerance}",
        )
    )
    for name in guard.learning:
        lead = summary[name]["val_acc"] - vanishing["val_acc"]
        lines.append(
            verdict(
                lead > guard.accuracy_margin,
                f"{name} beats {guard.vanishing}: validation accuracy {summary[name]['val_acc']:.4f} vs "
                f"{vanishing['val_acc']:.4f}, lead {lead:+.4f} > {guard.accuracy_margin}",
            )
        )
    return lines
