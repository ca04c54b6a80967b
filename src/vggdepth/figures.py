"""The study's figures, drawn with matplotlib from stage outputs (no tracking store needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vggdepth.files import atomic_path
from vggdepth.gradients import GradientRow
from vggdepth.outputs import run_of

# Values at or below this are drawn on the floor of the log axis (float32 gradients that vanished entirely).
GRADIENT_FLOOR = 1e-20
LAYER_AXIS = "layer, input to output (s: stage, b: block, r: reduction, c: conv, bn: batch norm)"


def short_layer(name: str) -> str:
    """A layer's name short enough for 75 of them side by side: `stage0.block1.conv0` -> `s0.b1.c0`,
    `stage2.reduce.bn1` -> `s2.r.bn1`, `entry.conv` -> `entry.c`, `head.linear` -> `head`."""
    if name == "head.linear":
        return "head"
    parts = name.split(".")
    out = []
    for part in parts:
        for long, short in (("stage", "s"), ("block", "b"), ("reduce", "r"), ("conv", "c")):
            if part.startswith(long):
                part = short + part[len(long) :]
                break
        out.append(part)
    return ".".join(out)


def _mark_stages(ax: Axes, layers: Sequence[str]) -> None:
    """A dotted line where each stage (and the head) begins, with the stage's name above the plot."""
    starts: dict[str, int] = {}
    for i, layer in enumerate(layers):
        starts.setdefault(layer.split(".")[0], i)
    for group, start in starts.items():
        if start:
            ax.axvline(start - 0.5, color="grey", linestyle=":", linewidth=0.8)
        ax.text(start - 0.4, 1.01, group, transform=ax.get_xaxis_transform(), fontsize=7, color="grey", va="bottom")


def draw_gradient_flow(ax: Axes, rows: Sequence[GradientRow], title: str, statistic: str = "mean_abs") -> None:
    """Layers on x (short names, stages marked), mean |gradient| on a log y axis, one line per epoch shaded from
    light (first) to dark (last)."""
    epochs = sorted({r.epoch for r in rows})
    layers = [r.layer for r in sorted((r for r in rows if r.epoch == epochs[0]), key=lambda r: r.index)]
    cmap = plt.get_cmap("Blues")
    for k, epoch in enumerate(epochs):
        values = [
            max(getattr(r, statistic), GRADIENT_FLOOR)
            for r in sorted((r for r in rows if r.epoch == epoch), key=lambda r: r.index)
        ]
        shade = 0.25 + 0.75 * (k + 1) / len(epochs)
        ax.plot(range(len(layers)), values, color=cmap(shade), linewidth=1, label=f"epoch {epoch}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [short_layer(layer) for layer in layers], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    _mark_stages(ax, layers)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("mean |gradient|" + (" (last step of epoch)" if statistic == "last_mean_abs" else ""))
    ax.set_title(title, pad=14)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    if len(epochs) > 1:
        # A legend of 100 epochs is noise: name the first and the last shade only.
        handles, labels = ax.get_legend_handles_labels()
        ax.legend([handles[0], handles[-1]], [labels[0], labels[-1]], fontsize=8, loc="best")  # where fewest lines are


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a PNG atomically and release the figure."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def gradient_flow_figure(rows: Sequence[GradientRow], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len({r.layer for r in rows}) + 2), 4.5))
    draw_gradient_flow(ax, rows, title)
    return fig


def draw_accuracy(ax: Axes, label: str, epochs: Sequence[dict], *, color, reference: bool = False) -> None:
    """Train (dashed) and validation (solid) accuracy per epoch of one run."""
    x = [int(e["epoch"]) if "epoch" in e else i for i, e in enumerate(epochs)]
    style = {"alpha": 0.6, "linewidth": 1} if reference else {"linewidth": 1.5}
    if len(x) <= 20:  # few epochs: mark each (one epoch is a point, not a line)
        style.update(marker="o", markersize=3)
    ax.plot(x, [e["train_acc"] for e in epochs], linestyle="--", color=color, label=f"{label} train", **style)
    ax.plot(x, [e["val_acc"] for e in epochs], linestyle="-", color=color, label=f"{label} validation", **style)


def _epoch_axis(ax: Axes) -> None:
    """Whole epochs on x, half an epoch of room on either side; accuracy on y from 0, no offset notation."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    data = [line for line in ax.get_lines() if not line.get_label().startswith("chance")]
    last = max((max(line.get_xdata(), default=0) for line in data), default=0)
    top = max((max(line.get_ydata(), default=0) for line in ax.get_lines()), default=0)
    ax.set_xlim(-0.5, max(last, 1) + 0.5)
    ax.set_ylim(0, max(top * 1.15, 0.02))
    ax.ticklabel_format(axis="y", useOffset=False)


def _chance(ax: Axes, classes: int) -> None:
    ax.axhline(1 / classes, color="grey", linestyle=":", linewidth=1, label=f"chance ({1 / classes:.0%})")


TITLE_CHARACTERS = 80  # an accuracy figure's title wraps at this width rather than widen the figure


def _accuracy_axes(ax: Axes, title: str, classes: int) -> None:
    _chance(ax, classes)
    _epoch_axis(ax)
    ax.set_ylabel("accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, TITLE_CHARACTERS, break_on_hyphens=False)))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def accuracy_figure(
    results: dict, variants: Sequence[str], seed: int, title: str, colors: dict[str, str], classes: int
) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in variants:
        run = run_of(results, variant, seed)
        draw_accuracy(ax, variant, run.epochs, color=colors[variant])
    _accuracy_axes(ax, title, classes)
    return fig


def gradient_flow_panels(results: dict, variants: Sequence[str], seed: int, statistic: str, title: str) -> Figure:
    runs = [run_of(results, v, seed) for v in variants]
    tables = [r.gradients() for r in runs]  # each run's gradients.csv, read once
    widths = [len({g.layer for g in table}) for table in tables]
    fig, axes = plt.subplots(
        1,
        len(runs),
        figsize=(sum(0.2 * w + 2 for w in widths), 5),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
        sharey=True,
    )
    for k, (ax, run, table) in enumerate(zip(axes[0], runs, tables, strict=True)):
        draw_gradient_flow(ax, table, f"{run.variant} (seed {seed})", statistic)
        if k < len(runs) - 1:  # the key to the layer names once, under the widest (last) panel
            ax.set_xlabel("layer")
        if k:  # the y axis is shared: its label once
            ax.set_ylabel("")
    fig.suptitle(title, y=1.04)
    return fig


def seeds_figure(results: dict, variants: Sequence[str], title: str, colors: dict[str, str], classes: int) -> Figure:
    """Validation accuracy per epoch of every variant: the mean over seeds, and the min-max band (with two seeds or
    more: one seed has no band to show)."""
    columns = min(3, len(variants))
    rows = -(-len(variants) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(variants) :]:
        ax.set_visible(False)
    for ax, variant in zip(axes.flat, variants, strict=False):
        runs = results[variant]
        length = min(len(r.epochs) for r in runs)
        per_epoch = [[r.epochs[e]["val_acc"] for r in runs] for e in range(length)]
        x = range(length)
        if len(runs) > 1:
            ax.fill_between(
                x,
                [min(v) for v in per_epoch],
                [max(v) for v in per_epoch],
                color=colors[variant],
                alpha=0.25,
                label=f"min-max over {len(runs)} seeds",
            )
        label = f"mean of {len(runs)} seeds" if len(runs) > 1 else "one seed"
        marks = {"marker": "o", "markersize": 3} if length <= 20 else {}
        ax.plot(x, [sum(v) / len(v) for v in per_epoch], color=colors[variant], label=label, **marks)
        _chance(ax, classes)
        ax.set_title(variant)
        _epoch_axis(ax)
        ax.set_ylabel("validation accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    # The panels share their y axis: from 0 to above every band, not only the last panel's.
    top = max(r.epochs[e]["val_acc"] for v in variants for r in results[v] for e in range(len(r.epochs)))
    axes.flat[0].set_ylim(0, max(top * 1.15, 1.5 / classes))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def reference_overlay_figure(
    results: dict,
    variants: Sequence[str],
    seed: int,
    curves: dict[str, list[dict]],
    title: str,
    colors: dict[str, str],
    classes: int,
) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in variants:
        run = run_of(results, variant, seed)
        draw_accuracy(ax, f"{variant} (ours)", run.epochs, color=colors[variant])
        draw_accuracy(ax, f"{variant} (reference)", curves[variant], color=colors[variant], reference=True)
    _accuracy_axes(ax, title, classes)
    return fig


def variant_colors(variants: Sequence[str]) -> dict[str, str]:
    """One colour per variant, by its row in `variants` (params.yaml's order): the same in every figure."""
    return {variant: f"C{k % 10}" for k, variant in enumerate(variants)}


def _scientific(value: float) -> str:
    """7.5e-3, 1e-3: the report's way of writing learning rates."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def comparison(params, variants: Sequence[str]) -> str:
    """What a figure of two variants compares, from the settings in which they differ: `learning rate 7.5e-3 vs
    1e-3`; for any other number of variants, their names."""
    if len(variants) != 2:
        return ", ".join(variants)
    a, b = (params.variants[v] for v in variants)

    def layers(v) -> str:
        return f"{params.model.layers(v.blocks_per_stage)} layers"

    def schedule(v) -> str:
        if v.schedule == "warm_restarts":
            return f"warm restarts every {v.period} epochs"
        return f"cosine over {v.period} epochs"

    aspects = (
        ("", layers),
        ("batch norm ", lambda v: "on" if v.batch_norm else "off"),
        ("residual shortcuts ", lambda v: "on" if v.residual else "off"),
        ("learning rate ", lambda v: _scientific(v.lr)),
        ("", schedule),
        ("batch ", lambda v: str(v.batch_size)),
    )
    differences = [f"{prefix}{show(a)} vs {show(b)}" for prefix, show in aspects if show(a) != show(b)]
    names = f"{variants[0]} vs {variants[1]}"
    return f"{'; '.join(differences)} ({names})" if differences else names
