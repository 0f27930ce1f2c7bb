"""Figures of the paper's Table 2 and Figures 3, 5 and 8 from aggregated result tables.

Same conventions as :mod:`reports.figures` (its style and :func:`~reports.figures.save`): labelled
axes with units, PNG + PDF, the PNG's path returned. Tables are read back from CSV, so numbers may
be floats and missing values NaN. Nothing here measures.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from .figures import IMPL_LABELS, _machine, _plain, _series_label, _style, save  # noqa: E402

__all__ = ["plot_tt_shapes", "plot_model_size", "plot_init_distribution", "plot_rows_sweep", "format_bytes"]


def _metric(df: pd.DataFrame, metric: str | list[str], figure: str, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows of ``metric`` (a copy), or a ValueError naming the figure, the metric and what the table holds."""
    metrics = [metric] if isinstance(metric, str) else metric
    if "metric" not in df.columns:
        raise ValueError(f"df: got columns {list(df.columns)[:12]}...; {figure} needs a tidy table with a 'metric' column")
    d = df[df["metric"].isin(metrics)].copy()
    if d.empty:
        raise ValueError(f"df: no rows with metric {metrics} for {figure}; "
                         f"the table has metrics {sorted(df['metric'].dropna().unique())}")
    missing = [c for c in columns if c not in d.columns]
    if missing:
        raise ValueError(f"df: columns {missing} missing for {figure}; got {list(d.columns)}")
    return d


def format_bytes(value: float, *, digits: int = 3) -> str:
    """Decimal units, as the paper writes sizes: 18.4 MB, 2.16 GB (``digits`` significant digits)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {unit}"
    return f"{value:.{digits}g} B"


class _BytesLogFormatter(LogFormatter):
    """Tick labels of a log axis of bytes in :func:`format_bytes`' units, on the ticks matplotlib's
    log formatter labels (minor ones only when the axis spans few decades)."""

    def __call__(self, x, pos=None):
        return format_bytes(x) if super().__call__(x, pos) else ""


def _bytes_axis(axis) -> None:
    """Label a log axis of bytes 100 kB, 1 MB, ...; after ``set_*scale("log")``, which sets its own formatters."""
    axis.set_major_formatter(_BytesLogFormatter())
    axis.set_minor_formatter(_BytesLogFormatter())


def _suptitle(fig: plt.Figure, df: pd.DataFrame, what: str, timed: bool = True) -> None:
    """``what``, then the machine of the rows for a timed figure; a figure of counts (or of sampled values)
    says it holds no timing instead."""
    fig.suptitle(f"{what}\n{_machine(df) if timed else 'computed, not timed'}", fontsize=9)


# ---- Table 2 ----

def plot_tt_shapes(df: pd.DataFrame, out_dir: str | Path, name: str = "table2_tt_shapes") -> Path:
    """Table 2: memory reduction (dense / TT parameters, log) and TT parameters (log) of each table,
    grouped by rank, each bar's value written above it; tick labels give the table's rows and
    p-shapes; one legend of the ranks below both panels."""
    _style()
    d = _metric(df, ["memory_reduction", "tt_params"], "Table 2",
                ("table_position", "num_embeddings", "tt_rank", "tt_p_shapes"))
    d["table"] = d.apply(lambda r: f"{int(r['num_embeddings']):,}\n{r['tt_p_shapes']}", axis=1)
    d["rank"] = "R = " + d["tt_rank"].astype(int).astype(str)
    order = d.sort_values("table_position").drop_duplicates("table")["table"].tolist()
    hue_order = [f"R = {r}" for r in sorted(d["tt_rank"].astype(int).unique())]
    panels = [("memory_reduction", "memory reduction (x, dense / TT parameters, log)"),
              ("tt_params", "TT parameters (count, log)")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, (metric, ylabel) in zip(axes, panels):
        part = d[d["metric"] == metric]
        if part.empty:
            ax.set_visible(False)
            continue
        sns.barplot(data=part, x="table", y="median", hue="rank", order=order, hue_order=hue_order, ax=ax,
                    errorbar=None)
        ax.set_yscale("log")
        ax.set_xlabel("Kaggle table (rows, TT p-shapes), largest first")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelsize=7)
        for container in ax.containers:
            fmt = "{:.0f}" if metric == "memory_reduction" else "{:.3g}"
            ax.bar_label(container, labels=[fmt.format(v) for v in container.datavalues], fontsize=5.5,
                         rotation=90, padding=2)
        # the panel's top quarter above the tallest bar, for its value: on a log axis, a quarter of the
        # height is the span (top / low) to the power 1/4 / (1 - 1/4)
        low, top = ax.get_ylim()[0], part["median"].max()
        ax.set_ylim(low, top * (top / low) ** (1 / 3))
        handles, labels = ax.get_legend_handles_labels()  # the same ranks in both panels: one legend
        ax.get_legend().remove()
    fig.legend(handles, labels, title="TT rank", loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.1),
               frameon=False, fontsize=8, title_fontsize=9)
    q = ", ".join(sorted(d["tt_q_shapes"].astype(str).unique())) if "tt_q_shapes" in d else "?"
    dim = int(d["embedding_dim"].iloc[0]) if "embedding_dim" in d else "?"
    _suptitle(fig, d, f"Table 2: TT format of Kaggle's {len(order)} largest tables (dim {dim}, q-shapes {q})", timed=False)
    fig.tight_layout()
    return save(fig, out_dir, name)


# ---- Figure 5 ----

def plot_model_size(df: pd.DataFrame, out_dir: str | Path, name: str = "fig5_model_size") -> Path:
    """Figure 5: per dataset, horizontal bars of the embedding tables' total bytes (log), baseline (k = 0)
    first, each with a marker at the bytes of its k largest tables in TT format; the reduction against
    the baseline is written beside each bar. (Not a stack: on a log axis a stacked segment's length is not
    its share; the TT part of 3 tables, 1% of 532 MB, drew a fifth of the bar.)"""
    _style()
    d = _metric(df, ["tt_bytes", "uncompressed_bytes", "reduction", "model_bytes"], "Figure 5",
                ("dataset", "tt_tables"))
    ranks = sorted(d.loc[d["tt_tables"] > 0, "tt_rank"].dropna().unique()) if "tt_rank" in d else []
    if len(ranks) > 1:  # one bar per (dataset, k): several ranks would be drawn as whichever row came first
        raise ValueError(f"df: Figure 5 draws one TT rank; got tt_rank {[int(r) for r in ranks]} (one table per "
                         "tt.rank)")
    wide = d.pivot_table(index=["dataset", "tt_tables"], columns="metric", values="median", aggfunc="first")
    needed = {"tt_bytes", "uncompressed_bytes", "reduction", "model_bytes"} - set(wide.columns)
    if needed:
        raise ValueError(f"df: metrics {sorted(needed)} missing for Figure 5; got {sorted(wide.columns)}")
    datasets = list(dict.fromkeys(d["dataset"]))
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9.5, 1.2 + 0.45 * len(wide) + 0.6 * len(datasets)),
                             squeeze=False)
    colors = sns.color_palette("colorblind", 2)
    low = 0.3 * wide[["tt_bytes", "uncompressed_bytes"]].replace(0, np.nan).min().min()
    high = 30 * wide["model_bytes"].max()  # room for the labels right of the bars
    for ax, dataset in zip(axes[:, 0], datasets):
        part = wide.loc[dataset].sort_index(ascending=False)
        labels = ["baseline (uncompressed)" if k == 0 else f"{int(k)} largest in TT" for k in part.index]
        y = np.arange(len(part))
        tt = part["tt_bytes"].to_numpy(float)
        total = part["model_bytes"].to_numpy(float)
        # each bar starts at the axis' lower edge (a log axis has no zero) and ends at the model's bytes
        ax.barh(y, total - low, left=low, color=colors[1], label="all embedding tables (uncompressed fp32 + TT)")
        has_tt = tt > 0
        ax.scatter(tt[has_tt], y[has_tt], marker="D", s=36, color=colors[0], edgecolor="white", zorder=3,
                   label="of which the tables in TT format")
        for yi, (total, red, tt_b) in enumerate(zip(part["model_bytes"], part["reduction"], tt)):
            text = format_bytes(total) + (f" (TT {format_bytes(tt_b)}), {red:.3g}x smaller" if tt_b > 0 else "")
            ax.text(total * 1.1, yi, text, va="center", fontsize=8)
        ax.set_yticks(y, labels)
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        _bytes_axis(ax.xaxis)
        first = d[d["dataset"] == dataset].iloc[0]
        facts = [f"{_plain(first[c])} {label}" for c, label in (("num_tables", "tables"),) if c in first]
        facts += [f"{label} {_plain(first[c])}" for c, label in (("embedding_dim", "dim"), ("tt_rank", "TT rank"))
                  if c in first]
        ax.set_title(f"{dataset}: " + ", ".join(facts), fontsize=9)
        ax.set_xlabel("embedding tables (bytes, log scale; decimal MB/GB)")
    axes[0, 0].legend(loc="lower right", fontsize=7)
    _suptitle(fig, d, "Figure 5: model size with the k largest tables in TT format", timed=False)
    fig.tight_layout()
    return save(fig, out_dir, name)


# ---- Figure 3 ----

def plot_init_distribution(df: pd.DataFrame, out_dir: str | Path, name: str = "fig3_init_distribution") -> Path:
    """Figure 3: per init scheme (columns), the density of reconstructed entries against the N(0, 1)
    target: top row with x in units of the target std sqrt(1/(3N)) (the scale), bottom row (when the
    table has ``density_own_std``) in units of the sample's own std, log y (the shape). KS distance,
    std ratio and the share of entries beyond the plotted range in the panel titles."""
    _style()
    dens = _metric(df, ["density", "density_own_std"], "Figure 3",
                   ("init", "x", "num_embeddings", "embedding_dim", "tt_rank", "samples"))
    points = dens[["num_embeddings", "tt_rank"]].drop_duplicates()
    if len(points) > 1:
        raise ValueError("df: Figure 3 draws one table and rank; got several (num_embeddings, tt_rank) points: "
                         f"{points.values.tolist()}")
    summary = df[df["metric"].isin(["ks_distance", "std_ratio", "outside_fraction"])]
    inits = list(dict.fromkeys(dens["init"]))
    panels = [m for m in ("density", "density_own_std") if (dens["metric"] == m).any()]
    fig, axes = plt.subplots(len(panels), len(inits), figsize=(3.6 * len(inits), 3.1 * len(panels) + 0.6),
                             squeeze=False, sharey="row")
    grid = np.linspace(dens["x"].min(), dens["x"].max(), 400)
    target = np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi)
    color = sns.color_palette("colorblind")[0]
    for row, metric in enumerate(panels):
        for ax, init in zip(axes[row], inits):
            part = dens[(dens["init"] == init) & (dens["metric"] == metric)].sort_values("x")
            width = float(np.diff(part["x"].to_numpy(float)).min()) if len(part) > 1 else 1.0
            ax.bar(part["x"], part["median"], width=width, color=color, alpha=0.7, label="measured")
            ax.plot(grid, target, color="0.35", lw=1.5, label="N(0, 1)")
            if metric == "density":
                stats = summary[summary["init"] == init].groupby("metric")["median"].first()
                title = init.replace("_", " ")
                if {"ks_distance", "std_ratio"} <= set(stats.index):
                    title += f"\nKS {stats['ks_distance']:.3f}, std ratio {stats['std_ratio']:.3g}"
                if "outside_fraction" in stats.index and stats["outside_fraction"] > 0.001:
                    title += f"\n{100 * stats['outside_fraction']:.1f}% beyond the plotted range"
                if stats.get("outside_fraction", 0) > 0.5 and "std_ratio" in stats.index:
                    # a near-empty panel is the finding (the entries' scale is off): say so where the bars would be
                    ax.text(0.5, 0.55, f"entries {stats['std_ratio']:.3g}x as wide as the target:\n"
                            f"{100 * stats['outside_fraction']:.1f}% fall outside this range\n(their shape: below)",
                            transform=ax.transAxes, ha="center", va="center", fontsize=8,
                            bbox=dict(boxstyle="round", fc="white", ec="0.7"))
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("entry / sqrt(1/(3N)) (target stds)")
            else:
                ax.set_yscale("log")
                ax.set_ylim(1e-4, 1.5)
                ax.set_xlabel("(entry - mean) / own std (sample stds)")
        axes[row, 0].set_ylabel("density (1/target std)" if metric == "density"
                                else "density, own scale (1/std, log)")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    r = dens.iloc[0]
    rows = -(-int(r["samples"]) // int(r["embedding_dim"]))
    what = (f"Figure 3: {int(r['samples']):,} entries of {rows:,} random rows reconstructed from fresh cores; "
            f"table {int(r['num_embeddings']):,} x {int(r['embedding_dim'])}, p {r.get('tt_p_shapes', '?')}, "
            f"q {r.get('tt_q_shapes', '?')}, TT rank {int(r['tt_rank'])}; target N(0, 1/(3N))")
    _suptitle(fig, dens, what, timed=False)
    fig.tight_layout()
    return save(fig, out_dir, name)


# ---- Figure 8 ----

def _impl_label(d: pd.DataFrame) -> pd.Series:
    """One label per series: the implementation (TT's with its backend), and any other config value
    that differs within it (e.g. ", tt_rank 64"), so different series never share one median."""
    label = d["impl"].map(IMPL_LABELS).fillna(d["impl"])
    if "backend" in d:
        tt = d["impl"] == "tt"
        label = label.where(~tt, label + " (" + d["backend"].astype(str) + ")")
    return _series_label(d, label, axes=("table", "num_embeddings", "tt_p_shapes"))


def plot_rows_sweep(df: pd.DataFrame, out_dir: str | Path, name: str = "fig8_memory_time_vs_rows") -> Path:
    """Figure 8: against the number of rows (log-log), time per lookup (median, IQR bars) per
    implementation, and memory: parameter bytes (dashed) and measured peak transient memory (solid)."""
    _style()
    d = _metric(df, ["time_per_lookup", "peak_transient_memory"], "Figure 8", ("impl", "num_embeddings"))
    d["implementation"] = _impl_label(d)
    labels = sorted(d["implementation"].unique())
    palette = dict(zip(labels, sns.color_palette("colorblind", len(labels))))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.0))
    times = d[d["metric"] == "time_per_lookup"]
    for label, g in times.groupby("implementation"):
        g = g.groupby("num_embeddings")[["median", "q1", "q3"]].median().sort_index()
        ax_t.errorbar(g.index, g["median"], yerr=[g["median"] - g["q1"], g["q3"] - g["median"]], marker="o",
                      capsize=3, color=palette[label], label=label)
    ax_t.set_ylabel("time per lookup (ns, median, IQR bars)")
    for label, g in d.groupby("implementation"):
        if "param_bytes" in g:
            p = g.groupby("num_embeddings")["param_bytes"].first().dropna().sort_index()
            ax_m.plot(p.index, p.to_numpy(float), ls="--", marker="s", ms=3, color=palette[label])
        peak = g[g["metric"] == "peak_transient_memory"].groupby("num_embeddings")["median"].median().dropna()
        if not peak.empty:
            ax_m.plot(peak.index, peak.to_numpy(float), ls="-", marker="o", color=palette[label], label=label)
    same_cores = {"tt", "t3nsor"} <= set(d["impl"])
    ax_m.plot([], [], ls="--", color="0.4",
              label="parameters (dashed" + ("; T3nsor-style holds TT's cores)" if same_cores else ")"))
    ax_m.plot([], [], ls="-", color="0.4", label="peak transient, measured (solid)")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows in the table (num_embeddings, log)")
    _bytes_axis(ax_m.yaxis)
    ax_m.set_ylabel("memory (bytes, log; decimal kB/MB/GB)")
    if times.empty:
        ax_t.text(0.5, 0.5, "no time_per_lookup rows", transform=ax_t.transAxes, ha="center")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)  # off the lines
    parts = [f"{c} {', '.join(_plain(v) for v in sorted(d[c].dropna().unique()))}"
             for c in ("mode", "batch_size", "tt_rank", "pooling_factor") if c in d and d[c].notna().any()]
    _suptitle(fig, d, "Figure 8: time and memory against table rows; " + "; ".join(parts))
    fig.tight_layout()
    return save(fig, out_dir, name)
