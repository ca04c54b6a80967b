"""The study's figures, drawn with matplotlib from stage outputs (no tracking store needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vggdepth.files import atomic_path
from vggdepth.gradients import GradientRow

# Values at or below this are drawn on the floor of the log axis (float32 gradients that vanished entirely).
GRADIENT_FLOOR = 1e-20


def draw_gradient_flow(ax: Axes, rows: Sequence[GradientRow], title: str, statistic: str = "mean_abs") -> None:
    """Layers on x, mean |gradient| on a log y axis, one line per epoch shaded from light (first) to dark (last)."""
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
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6 if len(layers) > 20 else 8)
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("mean |gradient|" + (" (last step of epoch)" if statistic == "last_mean_abs" else ""))
    ax.set_title(title)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    if len(epochs) > 1:
        # A legend of 100 epochs is noise: name the first and the last shade only.
        handles, labels = ax.get_legend_handles_labels()
        ax.legend([handles[0], handles[-1]], [labels[0], labels[-1]], fontsize=8, loc="lower left")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a PNG atomically and release the figure."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def gradient_flow_figure(rows: Sequence[GradientRow], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len({r.layer for r in rows}) + 2), 4.5))
    draw_gradient_flow(ax, rows, title)
    return fig
