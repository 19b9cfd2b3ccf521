"""The report's figures, each written as a PNG: titled, with sub-task and layer names on the axes,
sized to the number of rows and columns.

Figures are built with matplotlib's object API (`Figure`, rendered by the Agg canvas), never pyplot:
no GUI backend is touched and no global figure state is left behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy.cluster.hierarchy import dendrogram

from lmms_talo.analysis.agreement import Agreement
from lmms_talo.analysis.clustering import Clustering, Stability
from lmms_talo.analysis.robustness import NONE, SelectionDistribution
from lmms_talo.analysis.transfer import TransferMatrix
from lmms_talo.outputs.report_reader import Run

DPI = 150
MISSING = "#9a9a9a"  # cells with no value: darker than any near-zero colour


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _diverging(values: np.ndarray):
    cmap = colormaps["RdBu_r"].with_extremes(bad=MISSING)
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 0.0
    limit = limit or 0.01
    return cmap, TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)


def _outline(ax, col: int, row: int, color: str = "black") -> None:
    ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=2))


def _annotate(ax, values: np.ndarray, norm, fmt: str) -> None:
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            dark = abs(norm(value) - 0.5) > 0.3 if norm else value > 0.6
            ax.text(
                col, row, format(value, fmt), ha="center", va="center", fontsize=7, color="white" if dark else "black"
            )


def _layer_ticks(ax, layers: list, axis: str = "x") -> None:
    step = 1 if len(layers) <= 40 else 2
    positions = list(range(0, len(layers), step))
    labels = [str(layers[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels, fontsize=8)
    else:
        ax.set_yticks(positions, labels, fontsize=8)


def interaction_heatmap(
    gains: np.ndarray, subtasks: list[str], layers: list[int], selected: list[int | None], title: str, path: Path
) -> Path:
    """Figure 2: sub-tasks x layers, colour = probe gain of knocking the layer out (0 = white)."""
    rows, cols = gains.shape
    fig = Figure(figsize=(max(6.0, 0.32 * cols + 3.5), max(3.0, 0.38 * rows + 1.8)))
    ax = fig.subplots()
    cmap, norm = _diverging(gains)
    image = ax.imshow(np.ma.masked_invalid(gains), cmap=cmap, norm=norm, aspect="auto")
    for row, column in enumerate(selected):
        if column is not None:
            _outline(ax, column, row)
    if cols <= 12 and rows <= 25:
        _annotate(ax, gains, norm, "+.2f")
    _layer_ticks(ax, layers)
    ax.set_yticks(range(rows), subtasks, fontsize=8)
    ax.set_xlabel("knocked-out decoder layer")
    ax.set_ylabel("sub-task")
    ax.set_title(f"{title}\nprobe gain per layer (black box: selected layer; grey: not swept)", fontsize=10)
    fig.colorbar(image, ax=ax, label="probe gain (knocked out − base)", fraction=0.04, pad=0.02)
    return _save(fig, path)


def run_heatmap(run: Run, path: Path, title: str) -> Path:
    """Tasks x candidate layers, colour = probe gain (diverging, centred on 0), selected layer boxed."""
    subs = [s for s in run.subtasks if s.interaction_vector]
    layers = sorted({layer for s in subs for layer in s.interaction_vector})
    gains = np.full((len(subs), len(layers)), np.nan)
    selected = []
    for row, sub in enumerate(subs):
        for layer, gain in sub.interaction_vector.items():
            gains[row, layers.index(layer)] = gain
        selected.append(layers.index(sub.selected_layer) if sub.selected_layer in layers else None)
    return interaction_heatmap(gains, [s.name for s in subs], layers, selected, title, path)


def correlation_dendrogram(result: Clustering, title: str, path: Path) -> Path:
    """Correlation of interaction vectors, rows and columns in dendrogram order, tree on the left."""
    n = len(result.names)
    order = result.order
    size = max(5.0, 0.42 * n + 3.0)
    fig = Figure(figsize=(size + 2.2, size))
    tree_ax = fig.add_axes([0.02, 0.1, 0.2, 0.75])
    heat_ax = fig.add_axes([0.23, 0.1, 0.62, 0.75])
    bar_ax = fig.add_axes([0.04, 0.9, 0.16, 0.025])  # top left, clear of the sub-task labels on the right
    clusters = len(set(result.labels.tolist()))
    threshold = result.tree[-(clusters - 1), 2] if clusters > 1 else 0.0
    dendrogram(
        result.tree,
        orientation="left",
        ax=tree_ax,
        no_labels=True,
        color_threshold=threshold,
        above_threshold_color="#777777",
    )
    tree_ax.set_ylim(0, 10 * n)
    tree_ax.axis("off")
    ordered = result.corr[np.ix_(order, order)]
    image = heat_ax.imshow(ordered, cmap="RdBu_r", vmin=-1, vmax=1, origin="lower", aspect="auto")
    names = [f"{result.names[i]} [c{result.labels[i]}]" for i in order]
    heat_ax.set_yticks(range(n), names, fontsize=8)
    heat_ax.yaxis.tick_right()
    heat_ax.set_xticks(range(n), [result.names[i] for i in order], rotation=90, fontsize=8)
    if n <= 15:
        for (row, col), value in np.ndenumerate(ordered):
            heat_ax.text(
                col,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(value) > 0.6 else "black",
            )
    bar = fig.colorbar(image, cax=bar_ax, orientation="horizontal", ticks=[-1, 0, 1])
    bar.set_label("Pearson r", fontsize=8)
    bar.ax.xaxis.set_label_position("top")
    heat_ax.set_title(
        f"{title}\ninteraction-vector correlation, average-linkage clusters (c1..c{clusters})", fontsize=10
    )
    return _save(fig, path)


def cluster_stability(result: Clustering, stability: Stability, title: str, path: Path) -> Path:
    """Left: how often two sub-tasks share a cluster over the bootstrap; right: the ARI distribution."""
    n = len(result.names)
    order = result.order
    size = max(4.5, 0.4 * n + 2.5)
    fig = Figure(figsize=(size + 5.0, size))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [size, 4.0]})
    image = left.imshow(stability.co_clustered[np.ix_(order, order)], cmap="Greens", vmin=0, vmax=1)
    names = [result.names[i] for i in order]
    left.set_xticks(range(n), names, rotation=90, fontsize=8)
    left.set_yticks(range(n), names, fontsize=8)
    left.set_title("share of resamples in the same cluster", fontsize=9)
    fig.colorbar(image, ax=left, fraction=0.045, pad=0.03)
    summary = stability.summary()
    low = min(-0.2, float(stability.ari.min()))
    right.hist(stability.ari, bins=np.linspace(low, 1.0, 25), color="#4c72b0", edgecolor="white")
    right.axvline(summary["mean"], color="black", linestyle="--", label=f"mean {summary['mean']:.2f}")
    right.set_xlabel("adjusted Rand index vs the full-data clusters")
    right.set_ylabel("bootstrap resamples")
    right.set_title(f"cluster stability ({summary['resamples']} resamples)", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def agreement_scatter(agreement: Agreement, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Figure 4: one point per (sub-task, layer), coloured by layer depth, with Pearson and Spearman r.
    Gains on k probe docs are multiples of 1/k, so pairs often coincide: coinciding pairs are drawn as
    one marker whose area grows with their number (written on it), coloured by their mean layer."""
    fig = Figure(figsize=(6.4, 5.4))
    ax = fig.subplots()
    # rounded so that float noise (0.1 vs 0.09999999999999998) does not split coinciding pairs
    where, group, counts = np.unique(
        np.column_stack([agreement.x, agreement.y]).reshape(-1, 2).round(9),
        axis=0,
        return_inverse=True,
        return_counts=True,
    )
    mean_layer = np.bincount(group.ravel(), weights=agreement.layers, minlength=len(counts)) / np.maximum(counts, 1)
    area = 30 + 400 * counts / max(counts.max(initial=1), 1)
    points = ax.scatter(
        where[:, 0], where[:, 1], c=mean_layer, cmap="viridis", s=area, alpha=0.8, edgecolors="white", linewidths=0.4
    )
    for (x, y), count in zip(where, counts):
        if count > 1:
            ax.text(x, y, str(count), ha="center", va="center", fontsize=7, color="black")
    both = np.concatenate([agreement.x, agreement.y]) if len(agreement.x) else np.array([0.0])
    low, high = float(both.min()), float(both.max())
    pad = 0.05 * (high - low or 1.0)
    ax.plot(
        [low - pad, high + pad], [low - pad, high + pad], linestyle="--", color="#999999", linewidth=1, label="y = x"
    )
    ax.axhline(0, color="#cccccc", linewidth=0.8)
    ax.axvline(0, color="#cccccc", linewidth=0.8)
    ax.text(
        0.03,
        0.97,
        f"Pearson r = {agreement.pearson:.3f}\nSpearman ρ = {agreement.spearman:.3f}\n"
        f"n = {len(agreement.x)} task-layer pairs",
        transform=ax.transAxes,
        va="top",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#bbbbbb"},
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(points, ax=ax, label="decoder layer (mean of coinciding pairs)")
    return _save(fig, path)


def selection_robustness(distributions: list[SelectionDistribution], layers: list[int], title: str, path: Path) -> Path:
    """Share (%) of bootstrap resamples choosing each layer (or none), per sub-task; red box = actual choice."""
    columns = list(layers) + [NONE]
    shares = np.array([[d.share(c) for c in columns] for d in distributions])
    rows = len(distributions)
    fig = Figure(figsize=(max(6.0, 0.32 * len(columns) + 4.0), max(3.0, 0.38 * rows + 1.8)))
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for row, d in enumerate(distributions):
        _outline(ax, columns.index(d.chosen), row, color="#d62728")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=8)
    ax.set_yticks(range(rows), [d.subtask for d in distributions], fontsize=8)
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(rows), [f"{d.win_rate:.0%}" for d in distributions], fontsize=8)
    right.set_ylabel("resamples agreeing with the choice")
    ax.set_xlabel("layer chosen on the resample ('none': keep the full model); cells: % of resamples")
    ax.set_ylabel("sub-task")
    ax.set_title(title, fontsize=10)
    for (row, col), share in np.ndenumerate(shares):
        if share >= 0.05:  # the share in percent, written on the cell (no colour bar to read off)
            ax.text(
                col,
                row,
                f"{100 * share:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share > 0.6 else "black",
            )
    return _save(fig, path)


def transfer_heatmap(matrix: TransferMatrix, title: str, path: Path) -> Path:
    """Rows: the sub-task whose selection is applied (and its layer); columns: the sub-task it is
    applied to; colour: test gain on the column's test docs (grey: not scored)."""
    rows, cols = matrix.gains.shape
    fig = Figure(figsize=(max(5.5, 0.5 * cols + 3.5), max(3.0, 0.42 * rows + 2.2)))
    ax = fig.subplots()
    cmap, norm = _diverging(matrix.gains)
    image = ax.imshow(np.ma.masked_invalid(matrix.gains), cmap=cmap, norm=norm, aspect="auto")
    for row, source in enumerate(matrix.sources):
        if source in matrix.targets:
            _outline(ax, matrix.targets.index(source), row)
    if rows * cols <= 225:
        _annotate(ax, matrix.gains, norm, "+.2f")
    ax.set_xticks(range(cols), matrix.targets, rotation=90, fontsize=8)
    ax.set_yticks(range(rows), [f"{s} (layer {l})" for s, l in zip(matrix.sources, matrix.source_labels)], fontsize=8)
    ax.set_xlabel("applied to sub-task (its test docs)")
    ax.set_ylabel("layer selected on sub-task")
    ax.set_title(f"{title}\ncross-task transfer: test gain over the full model (black box: own selection)", fontsize=10)
    fig.colorbar(image, ax=ax, label="test gain (knocked out − base)", fraction=0.04, pad=0.02)
    return _save(fig, path)
