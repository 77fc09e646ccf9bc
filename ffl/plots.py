"""Figures in the style of the paper's Figures 2–3: per index, the unaligned "layer" feature beside
the aligned "chain" feature, with the paper's own numbers drawn next to ours when it reports them
(bars where it names the index, dashed lines where it gives one number for no stated index)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

FEATURE_LABELS = {"layer": "layer (unaligned)", "chain": "chain (aligned)"}
PALETTE = {
    "layer (unaligned), ours": "#9ecae1",
    "chain (aligned), ours": "#08519c",
    "layer (unaligned), paper": "#fdae6b",
    "chain (aligned), paper": "#a63603",
}


def protocol_bars(
    results: pd.DataFrame,
    metric: str,
    *,
    paper: pd.DataFrame | None = None,
    title: str | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Bar chart of ``metric`` per index for layer vs chain features.

    ``results`` (and ``paper``, if given) have columns ``index``, ``feature`` ("layer"/"chain"),
    ``metric`` and ``value`` (a fraction in [0, 1]). The paper's rows with an index are drawn as bars
    beside ours; rows whose index is missing (the paper gave one number for no stated index, e.g.
    :func:`ffl.paper.reported` for CIFAR-100's text or Table 1) as dashed horizontal lines.
    Which of the paper's numbers a figure shows belongs in its caption (:func:`ffl.paper.caption_note`).
    """
    paper = paper[paper["metric"] == metric] if paper is not None else pd.DataFrame(columns=results.columns)
    no_index = paper["index"].isna()
    frames = [results.assign(source="ours")]
    if (~no_index).any():
        frames.append(paper[~no_index].astype({"index": int}).assign(source="paper"))
    data = pd.concat(frames, ignore_index=True)
    data = data[data["metric"] == metric]
    if data.empty:
        raise ValueError(f"no results for metric {metric!r}")
    data = data.assign(
        series=data["feature"].map(FEATURE_LABELS) + ", " + data["source"],
        percent=100 * data["value"],
    )
    order = [s for s in PALETTE if s in set(data["series"])]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0))
    sns.barplot(data=data, x="index", y="percent", hue="series", hue_order=order, palette=PALETTE,
                errorbar=None, ax=ax)  # one value per bar: no interval to draw
    for container in ax.containers:
        ax.bar_label(container, fmt="%.0f", fontsize=7, padding=1)
    for _, row in paper[no_index].iterrows():
        series = FEATURE_LABELS[row["feature"]] + ", paper"
        ax.axhline(100 * row["value"], color=PALETTE[series], linestyle="--", linewidth=1.2,
                   label=f"{series} (no index stated): {100 * row['value']:.1f}")
    return _percent_axes(ax, "index l (layer W_l / chain G_l)", metric, title, legend_columns=2)



def protocol_figure(results: pd.DataFrame, *, paper: pd.DataFrame | None = None) -> plt.Figure:
    """The local-solution chapters' figure (the paper's Figures 2 and 3): :func:`protocol_bars` of
    local-solution classification (top-1, left) and of retrieval on unseen tasks (CMC rank-1, right)
    per index of ``results``, the paper's numbers beside ours where ``paper`` is given."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (protocol, metric, title) in zip(axes, (("classification", "top1", "local-solution classification"),
                                                   ("retrieval", "rank1", "retrieval on unseen tasks"))):
        protocol_bars(results[results.protocol == protocol], metric, paper=paper, title=title, ax=ax)
    fig.tight_layout()
    return fig

def invariance_bars(rows: pd.DataFrame, *, tolerance: float = 1e-5, ax: plt.Axes | None = None) -> plt.Axes:
    """§3.2's check as a figure: per network, the largest relative change of the raw weights W_l
    against that of the chain Grams G_l under random function-preserving permutations (log scale),
    with the tests' tolerance drawn. ``rows``: :attr:`ffl.invariance.InvarianceReport.rows`."""
    summary = rows.groupby("model", sort=False).agg(raw=("rel_dW", "max"), chain=("rel_dG", "max")).reset_index()
    long = summary.melt(id_vars="model", var_name="feature", value_name="relative change")
    long["feature"] = long["feature"].map({"raw": "raw weights $W_l$", "chain": "chain Gram $G_l$"})
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    sns.barplot(data=long, x="model", y="relative change", hue="feature", ax=ax)
    ax.axhline(tolerance, color="0.4", linestyle="--", linewidth=1, label=f"test tolerance {tolerance:.0e}")
    ax.set_yscale("log")
    ax.set_xlabel("")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.tick_params(axis="x", rotation=30)
    ax.figure.tight_layout()
    return ax


def setting_bars(results: pd.DataFrame, metric: str, *, order: list[str] | None = None,
                 title: str | None = None, ax: plt.Axes | None = None) -> plt.Axes:
    """§4.4's Figures 4–5: ``metric`` per "layer l" / "chain l" (x), one bar per setting (hue).
    ``results`` has columns ``setting, index, feature, metric, value`` (fractions)."""
    data = results[results["metric"] == metric]
    if data.empty:
        raise ValueError(f"no results for metric {metric!r}")
    data = data.assign(x=data["feature"] + " " + data["index"].astype(str), percent=100 * data["value"])
    x_order = [f"{f} {i}" for f in ("layer", "chain") for i in sorted(data["index"].unique())]
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.0))
    sns.barplot(data=data, x="x", y="percent", hue="setting", order=x_order, hue_order=order,
                errorbar=None, ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.0f", fontsize=6, padding=1)
    return _percent_axes(ax, "layer W_l (unaligned) / chain G_l (aligned)", metric, title, legend_columns=5)


def method_bars(results: pd.DataFrame, metric: str, *, order: list[str], title: str | None = None,
                ax: plt.Axes | None = None) -> plt.Axes:
    """Beyond the paper: ``metric`` per index l (x), one bar per similarity method (hue, in ``order``).
    ``results`` has columns ``label`` (the method), ``index``, ``metric``, ``value`` (fractions)."""
    data = results[results["metric"] == metric]
    if data.empty:
        raise ValueError(f"no results for metric {metric!r}")
    data = data.assign(percent=100 * data["value"])
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.0))
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))  # a method's colour, whatever is missing
    sns.barplot(data=data, x="index", y="percent", hue="label", hue_order=[o for o in order if o in set(data["label"])],
                palette=palette, errorbar=None, ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.0f", fontsize=6, padding=1)
    return _percent_axes(ax, "index l", metric, title, legend_columns=3)


def _percent_axes(ax: plt.Axes, xlabel: str, metric: str, title: str | None, *, legend_columns: int) -> plt.Axes:
    # The protocol figures' common frame: 0-105 %, legend below the bars.
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=legend_columns, frameon=False)
    if title:
        ax.set_title(title)
    sns.despine(ax=ax)
    return ax
