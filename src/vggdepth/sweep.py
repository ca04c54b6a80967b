"""The depth sweep, beyond the report: plain, batch-norm, residual and batch-norm + residual networks at a range of
depths, each trained briefly on a reduced split through the grid, to find the depth at which each family stops
learning (README "The depth sweep").

A network "stops learning" when, after the sweep's epochs, its entry layer's mean |gradient| (the last epoch's)
is below `sweep.vanishing_below` (the gradient has vanished), or its validation accuracy is within
`sweep.chance_sigmas` standard errors of chance, 1/classes (it has learnt nothing measurable). A family stops
learning at the shallowest depth from which on that holds for every deeper network too: one network near the
chance line between two that learn does not decide it. A network whose loss becomes NaN or infinite has diverged:
it stops learning too, a result of its settings (it would diverge again), and its row says so without numbers.

Its folder (`sweep/` in dvc.yaml): `data/` (the reduced split, prepared data's format), `runs/<family>-<layers>-s
<seed>/` (run folders, as the study's), and `report/` (table.md, table.csv, sweep.json, figures/).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vggdepth.config import FAMILIES, ConfigError, Params, Variant
from vggdepth.data import PreparedData, take_per_class, write_prepared
from vggdepth.errors import VggdepthError
from vggdepth.files import atomic_dir, write_csv, write_json
from vggdepth.outputs import read_epochs, read_gradients, read_train, verdict
from vggdepth.runs import RunFiles

log = logging.getLogger(__name__)

DATA, RUNS, REPORT = "data", "runs", "report"
RECORD = "sweep.json"
FIGURES = {"gradient": "entry-gradient-vs-depth.png", "accuracy": "val-accuracy-vs-depth.png"}
COLUMNS = (
    "family",
    "layers",
    "blocks_per_stage",
    "parameters",
    "entry_grad",
    "val_acc",
    "val_loss",
    "train_acc",
    "learns",
    "diverged",
    "why",
)
# What a diverged network's row leaves empty, and how the table shows each.
MEASURES = {"entry_grad": ".1e", "val_acc": ".4f", "val_loss": ".4g", "train_acc": ".4f"}


class SweepError(VggdepthError):
    """The depth sweep cannot run, or some of its runs failed."""


@dataclass(frozen=True)
class Point:
    """One network of the sweep: a family at a depth, and the variant it trains as."""

    family: str
    blocks_per_stage: int
    layers: int
    variant: str


def points(params: Params) -> list[Point]:
    """Every (family, depth) of `sweep`, families in params order, each from shallow to deep."""
    cfg = params.sweep
    out = []
    for family in cfg.families:
        for blocks in sorted(cfg.blocks_per_stage):
            layers = params.model.layers(blocks)
            out.append(Point(family, blocks, layers, f"{family}-{layers:03d}"))
    return out


def sweep_params(params: Params) -> Params:
    """The params the sweep's runs train under: the sweep's networks as variants beside the study's (so every
    cross-check still holds where a worker validates them again), its one seed, its epochs, gradient statistics
    on (they are what it measures), no model logged (its runs are measurements, not models to use)."""
    cfg = params.sweep
    clash = sorted({p.variant for p in points(params)} & set(params.variants))
    if clash:
        raise SweepError(f"variants: {', '.join(clash)} is also the name of a sweep network; rename the variant")
    variants = dict(params.variants)
    for point in points(params):
        batch_norm, residual = FAMILIES[point.family]
        variants[point.variant] = Variant(
            blocks_per_stage=point.blocks_per_stage,
            batch_norm=batch_norm,
            residual=residual,
            lr=cfg.lr,
            schedule="cosine",
            period=cfg.epochs,
            batch_size=cfg.batch_size,
        )
    raw = params.model_dump(mode="json")
    raw["variants"] = {name: v.model_dump(mode="json") for name, v in variants.items()}
    raw["seeds"] = [cfg.seed]
    raw["report"]["seed"] = cfg.seed
    raw["train"].update(epochs=cfg.epochs, grad_stats=True)
    raw["tracking"]["log_model"] = False
    return Params.model_validate(raw)


def sweep_data(data: PreparedData, params: Params) -> PreparedData:
    """The sweep's split: `sweep.subset` images per class of the prepared training and validation splits (the
    same draw for every network), normalised with the prepared statistics; one test image per class (the sweep
    tests nothing: it keeps the folder in the prepared data's form)."""
    cfg, seed = params.sweep, params.prepare.split_seed
    subset = {"train": cfg.subset.train, "val": cfg.subset.val, "test": 1}
    splits = {}
    for name, per_class in subset.items():
        split = getattr(data, name)
        have = len(split) // params.model.num_classes
        if per_class > have:
            where = f"sweep.subset.{name}" if name != "test" else "the sweep"
            raise ConfigError(
                f"{where}: {per_class} images per class asked, but the prepared {name} split has {have} per class "
                f"(prepare.subset.{name}); lower it or prepare more"
            )
        splits[name] = take_per_class(split, per_class, seed, field=f"sweep.subset.{name}")
    stats = {**data.stats, "sizes": {n: len(s) for n, s in splits.items()}, "subset": subset}
    return PreparedData(stats=stats, **splits)


def sweep_context(params: Params):
    """The MLflow parent run of the sweep: beside the pipeline run's own, named after it."""
    from vggdepth.tracking.store import PipelineContext

    context = PipelineContext.detect(params)
    name = f"depth sweep, {context.name}"
    description = (
        f"The {name}: the parent of one training run per network (family and depth) of params.yaml's "
        "`sweep` section, trained briefly on a reduced split to find where each family stops learning. The sweep "
        "stage logs its table here (sweep_table.json as an MLflow table, table.md, table.csv, sweep.json), the "
        "figures of entry-layer gradient and validation accuracy against depth, the `sweep.*` settings as params "
        "and a vggdepth.sweep.stops.<family> tag per family."
    )
    return dataclasses.replace(context, key=f"sweep:{context.key}", name=name, stage="sweep", description=description)


def run_sweep(
    params: Params,
    prepared: PreparedData,
    out: Path,
    context=None,
    publish: Callable[[Path, dict], object] | None = None,
) -> dict:
    """Train every network of the sweep (the grid: resumed where a run stopped, skipped where finished), under the
    MLflow parent run `context` (`sweep_context`; None when tracking is off), then write `out/report` atomically;
    `publish(staging, record)` (MLflow) gets it before it is put in place. Returns the record (`sweep.json`)."""
    from vggdepth.grid import run_grid

    derived = sweep_params(params)
    data = sweep_data(prepared, params)
    data_dir, runs = out / DATA, out / RUNS
    write_prepared(data_dir, data)
    wanted = {p.variant for p in points(params)}
    result, planned, _ = run_grid(derived, data, data_dir, runs, only=wanted, context=context)
    failed = {name: why for name, why in result.failed.items() if name not in result.diverged}
    if failed:
        names = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        raise SweepError(
            f"{len(failed)} of the sweep's runs failed ({names}). Re-running trains only what is unfinished"
        )
    for name in sorted(result.diverged):
        log.warning("sweep: %s diverged, recorded as not learning: %s", name, result.failed[name])
    restore_tables(derived, data, [r for r in planned if not r.stale])
    record = sweep_record(params, runs, len(data.val), result.diverged)
    with atomic_dir(out / REPORT) as staging:
        write_json(staging / RECORD, record)
        rows = record["rows"]
        write_csv(staging / "table.csv", COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
        (staging / "table.md").write_text(table_markdown(params, record))
        sweep_figures(params, record, staging / "figures")
        if publish is not None:
            publish(staging, record)
    return record


def restore_tables(derived: Params, data: PreparedData, skipped: list) -> None:
    """The tables (epochs.csv, gradients.csv, train.json) of the runs the grid `skipped` as finished, written again
    from their checkpoints, as a train stage does for a finished run: when settings change and change back, a run's
    checkpoints return from `superseded/` while its tables are still the other settings'. (The runs the grid
    trained wrote theirs as they trained.)"""
    from vggdepth.engine import train_run
    from vggdepth.locks import writing

    for run in skipped:
        with writing(run.files.root):
            train_run(derived, run.variant, run.seed, data, run.files.root)


def chance_limit(classes: int, images: int, sigmas: float) -> float:
    """The validation accuracy that a network guessing at random stays under, but for `sigmas` standard errors:
    1/classes plus `sigmas` times the binomial standard error of an accuracy over `images` images."""
    p = 1 / classes
    return p + sigmas * math.sqrt(p * (1 - p) / images)


def sweep_record(params: Params, runs: Path, val_images: int, diverged: dict[str, str] | None = None) -> dict:
    """Each network's last epoch (entry-layer gradient, accuracy, loss), whether it learns and why not, and the
    depth at which each family stops learning. `diverged`: the runs whose loss became NaN or infinite (run name ->
    what happened, `GridResult.diverged`), recorded without numbers."""
    cfg, diverged = params.sweep, diverged or {}
    limit = chance_limit(params.model.num_classes, val_images, cfg.chance_sigmas)
    rows = []
    for point in points(params):
        files = RunFiles.of(runs, point.variant, cfg.seed)
        if files.root.name in diverged:
            rows.append(_diverged_row(params, point, diverged[files.root.name]))
            continue
        train = read_train(files)
        last = read_epochs(files.epochs_csv)[-1]
        gradients = read_gradients(files.gradients_csv)
        final = max(g.epoch for g in gradients)
        entry = next((g.mean_abs for g in gradients if g.index == 0 and g.epoch == final), None)
        if entry is None:
            raise SweepError(
                f"{files.gradients_csv} has no entry-layer row for its last epoch ({final}); delete {files.root} "
                "and run the sweep again"
            )
        why = []
        if entry < cfg.vanishing_below:
            why.append(f"entry gradient {entry:.1e} < {cfg.vanishing_below:.0e}")
        if last["val_acc"] <= limit:
            why.append(f"val acc {last['val_acc']:.4f} <= {limit:.4f}")
        rows.append(
            {
                "family": point.family,
                "layers": point.layers,
                "blocks_per_stage": point.blocks_per_stage,
                "parameters": train["parameters"],
                "entry_grad": entry,
                "val_acc": last["val_acc"],
                "val_loss": last["val_loss"],
                "train_acc": last["train_acc"],
                "learns": not why,
                "diverged": False,
                "why": "; ".join(why),
            }
        )

    return {
        "epochs": cfg.epochs,
        "train_images": cfg.subset.train * params.model.num_classes,
        "val_images": val_images,
        "chance_acc": 1 / params.model.num_classes,
        "chance_limit": limit,
        "vanishing_below": cfg.vanishing_below,
        **family_depths(rows, cfg.families, cfg.vanishing_below, limit),
        "rows": rows,
    }


def _diverged_row(params: Params, point: Point, what: str) -> dict:
    """The row of a network whose loss became NaN or infinite: no measurement, its size from the network itself."""
    from vggdepth.models import VGG, count_parameters

    net = VGG(params.model, sweep_params(params).variant(point.variant))
    return {
        "family": point.family,
        "layers": point.layers,
        "blocks_per_stage": point.blocks_per_stage,
        "parameters": count_parameters(net),
        **dict.fromkeys(MEASURES),
        "learns": False,
        "diverged": True,
        "why": f"diverged: {what}",
    }


def family_depths(rows: list[dict], families: list[str], vanishing_below: float, limit: float) -> dict:
    """Per family, the depth from which on it stops learning (`stops`), and from which on for each of the two
    reasons (`vanished`, `at_chance`): the shallowest depth at which that network and every deeper one have
    stopped; None when the deepest has not. A diverged network has stopped learning, but was not measured: it
    counts for neither reason (the table says so beside them)."""

    def from_on(family: str, stopped) -> int | None:
        depth = None
        for row in sorted((r for r in rows if r["family"] == family), key=lambda r: -r["layers"]):
            if not stopped(row):
                break
            depth = row["layers"]
        return depth

    return {
        "stops": {f: from_on(f, lambda r: not r["learns"]) for f in families},
        "vanished": {f: from_on(f, lambda r: _measured(r) and r["entry_grad"] < vanishing_below) for f in families},
        "at_chance": {f: from_on(f, lambda r: _measured(r) and r["val_acc"] <= limit) for f in families},
    }


def table_markdown(params: Params, record: dict) -> str:
    """Where each family stops learning, then every network's numbers."""
    cfg = params.sweep
    lines = [
        "# The depth sweep: where each family stops learning",
        "",
        f"Each network trained {record['epochs']} epoch(s) on {record['train_images']:,} training images (seed "
        f"{cfg.seed}, Adam lr {cfg.lr:g}, batch {cfg.batch_size}), validated on {record['val_images']:,}. A network "
        f"stops learning when its entry layer's mean |gradient| in the last epoch is below "
        f"{cfg.vanishing_below:.0e}, or its validation accuracy is within {cfg.chance_sigmas:g} standard errors of "
        f"chance ({record['chance_acc']:.0%}): at most {record['chance_limit']:.4f}. A family stops learning from "
        "the depth on which it and every deeper network do.",
        "",
        "| family | stops learning from | entry gradient vanished from | at chance from | deepest that learns |",
        "|---|---|---|---|---|",
    ]

    def depth(layers: int | None) -> str:
        return f"{layers} layers" if layers is not None else f"none up to {max(r['layers'] for r in record['rows'])}"

    for family in cfg.families:
        learning = [r["layers"] for r in record["rows"] if r["family"] == family and r["learns"]]
        diverged = [str(r["layers"]) for r in record["rows"] if r["family"] == family and not _measured(r)]
        unmeasured = f" (not measured at {', '.join(diverged)}: diverged)" if diverged else ""
        cells = [depth(record["stops"][family])] + [
            depth(record[key][family]) + unmeasured for key in ("vanished", "at_chance")
        ]
        lines.append(f"| {family} | {' | '.join(cells)} | {f'{max(learning)} layers' if learning else 'none'} |")
    lines += [
        "",
        "| family | layers | parameters | entry-layer mean \\|grad\\| | val acc | val loss | train acc | learns |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        learns = "yes" if r["learns"] else f"no: {r['why']}"
        shown = [f"{r[name]:{form}}" if _measured(r) else "—" for name, form in MEASURES.items()]
        lines.append(f"| {r['family']} | {r['layers']} | {r['parameters']:,} | {' | '.join(shown)} | {learns} |")
    return "\n".join(lines) + "\n"


def _measured(row: dict) -> bool:
    """Whether the network has numbers: every one but a diverged one (a record of an earlier version has no key)."""
    return not row.get("diverged", False)


def sweep_figures(params: Params, record: dict, out: Path) -> None:
    """Entry-layer gradient against depth (log axis) and validation accuracy against depth, a line per family."""
    from vggdepth.figures import plt, save_figure

    out.mkdir(parents=True, exist_ok=True)
    families = params.sweep.families
    colors = {family: f"C{k}" for k, family in enumerate(FAMILIES)}  # a family's colour whatever is swept
    depths = sorted({r["layers"] for r in record["rows"]})

    def by_family(family: str) -> list[dict]:
        return [r for r in record["rows"] if r["family"] == family]

    # An exact zero (a gradient that underflowed) is drawn as a cross, two decades under the smallest value; a
    # network that diverged (no measurement) as a triangle, two decades over the largest.
    measured = [r["entry_grad"] for r in record["rows"] if _measured(r)]
    floor = min([*(g for g in measured if g > 0), record["vanishing_below"]]) / 100
    ceiling = max([*measured, record["vanishing_below"]]) * 100
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in families:
        rows = [r for r in by_family(family) if _measured(r)]
        values = [r["entry_grad"] or floor for r in rows]
        ax.plot([r["layers"] for r in rows], values, marker="o", color=colors[family], label=family)
        zeros = [r["layers"] for r in rows if r["entry_grad"] == 0]
        ax.plot(zeros, [floor] * len(zeros), "x", color=colors[family], markersize=10)
        diverged = [r["layers"] for r in by_family(family) if not _measured(r)]
        ax.plot(diverged, [ceiling] * len(diverged), "^", color=colors[family], markersize=10)
    ax.axhline(
        record["vanishing_below"], color="grey", linestyle=":", label=f"vanished ({record['vanishing_below']:.0e})"
    )
    ax.set_yscale("log")
    ax.set_ylabel(f"entry-layer mean |gradient|, epoch {record['epochs']} (x: exactly 0, ^: diverged)")
    _depth_axis(ax, depths, "Entry-layer gradient against depth")
    save_figure(fig, out / FIGURES["gradient"])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in families:
        rows = [r for r in by_family(family) if _measured(r)]
        ax.plot(
            [r["layers"] for r in rows], [r["val_acc"] for r in rows], marker="o", color=colors[family], label=family
        )
        diverged = [r["layers"] for r in by_family(family) if not _measured(r)]
        ax.plot(diverged, [0] * len(diverged), "v", color=colors[family], markersize=10, clip_on=False)
    ax.axhline(record["chance_acc"], color="grey", linestyle=":", label=f"chance ({record['chance_acc']:.0%})")
    ax.axhspan(0, record["chance_limit"], color="grey", alpha=0.15, label="within noise of chance")
    accuracies = [r["val_acc"] for r in record["rows"] if _measured(r)]
    ax.set_ylim(0, max([*accuracies, record["chance_limit"]]) * 1.15)
    ax.set_ylabel(f"validation accuracy after {record['epochs']} epoch(s) (v: diverged)")
    _depth_axis(ax, depths, "Validation accuracy against depth")
    save_figure(fig, out / FIGURES["accuracy"])


def _depth_axis(ax, depths: list[int], title: str) -> None:
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.set_xlabel("weight layers (log axis)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def check_sweep(params: Params, record: dict) -> list[str]:
    """The sweep's claim, one line per family starting with PASS or FAIL: the plain family's entry-layer gradient
    falls with every step in depth (or stays at an exact zero, underflowed) and is below `vanishing_below` at the
    deepest; every other family's stays above `learning_above` at every depth. A family with a network that
    diverged has a depth without a measurement: its line fails, naming it."""
    cfg = params.sweep
    lines = []
    if "plain" not in {r["family"] for r in record["rows"]}:
        lines.append("FAIL: the sweep has no plain networks: nothing shows where gradients vanish with depth")
    for family in dict.fromkeys(r["family"] for r in record["rows"]):
        rows = sorted((r for r in record["rows"] if r["family"] == family), key=lambda r: r["layers"])
        if diverged := [str(r["layers"]) for r in rows if not _measured(r)]:
            lines.append(
                verdict(
                    False,
                    f"{family} networks diverged at {', '.join(diverged)} layers (a NaN or infinite loss): no "
                    "gradient measured there, so nothing to judge; lower sweep.lr or leave those depths out",
                )
            )
            continue
        shown = ", ".join(f"{r['entry_grad']:.1e} at {r['layers']}" for r in rows)
        if family == "plain":
            pairs = list(itertools.pairwise(rows))
            falls = bool(pairs) and all(
                b["entry_grad"] < a["entry_grad"] or a["entry_grad"] == b["entry_grad"] == 0 for a, b in pairs
            )
            vanished = rows[-1]["entry_grad"] < cfg.vanishing_below
            lines.append(
                verdict(
                    falls and vanished,
                    f"plain networks' entry-layer gradient falls with depth, below {cfg.vanishing_below:.0e} at the "
                    f"deepest: {shown}" + ("" if pairs else " (one depth: nothing to compare)"),
                )
            )
        else:
            lines.append(
                verdict(
                    all(r["entry_grad"] > cfg.learning_above for r in rows),
                    f"{family} networks' entry-layer gradient stays above {cfg.learning_above:.0e} at every depth: "
                    f"{shown}",
                )
            )
    return lines
