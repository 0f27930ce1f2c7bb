"""Figures from aggregated result tables (seaborn, one style, labelled axes with units).

Each function takes the tidy table (benches.results.collect) and an output directory, writes a PNG
and a PDF, and returns the PNG's path. Nothing here measures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["IMPL_LABELS", "busy", "plot_rank_sweep", "save"]

IMPL_LABELS = {"tt": "TT-EmbeddingBag", "t3nsor": "T3nsor-style (decompress)", "dense": "nn.EmbeddingBag"}

# Config columns of a result row that make a different series when they differ, unless a figure
# plots them on an axis or a panel (seeds are replicates of one point)
SERIES_COLUMNS = ("table", "num_embeddings", "embedding_dim", "tt_p_shapes", "tt_q_shapes", "tt_rank", "tt_d", "init",
                  "mode", "pooling_factor",
                  "batch_size", "pooling", "distribution", "zipf_alpha", "permute", "weighted", "pooling_sigma",
                  "pooling_distribution", "hit_rate", "hot_fraction", "reuse_fraction", "criteo_feature",
                  "optimizer", "lr", "sparse", "device", "threads", "flush_l2", "stream_lookups", "cache_enabled",
                  "cache_fraction")


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)


def save(fig: plt.Figure, out_dir: str | Path, name: str) -> Path:
    """``<name>.png`` and ``<name>.pdf``, byte-identical when redrawn from the same table: the PDF
    carries no creation date (a PNG carries none)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(out_dir / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return png


def busy(df: pd.DataFrame) -> pd.Series:
    """Rows timed while their threads waited for a CPU (their note, benches.environment.CpuWait):
    their times are inflated."""
    if "note" not in df:
        return pd.Series(False, index=df.index)
    return df["note"].astype(str).str.startswith(("busy machine", "oversubscribed"))


def _machine(df: pd.DataFrame) -> str:
    """"CPU, N threads" of the rows, every distinct value listed (rows pooled from runs on other
    machines or thread counts say so), and how many of them ran on a busy machine, if any."""
    cpus = ", ".join(str(c) for c in df["cpu_model"].dropna().drop_duplicates()) if "cpu_model" in df else ""
    threads = (", ".join(_plain(t) for t in df["threads"].dropna().drop_duplicates())
               if "threads" in df else "")
    flagged = int(busy(df).sum())
    return ((cpus or "unknown CPU") + (f", {threads} threads" if threads else "")
            + (f"\nBUSY MACHINE: {flagged} of {len(df)} rows timed while their threads waited for a CPU "
               f"(times inflated; see their note)" if flagged else ""))


def title(headline: str | None, detail: str) -> str:
    """A figure's title: the paper's figure it stands for (``headline``, when drawn for the report), then
    what was run (``detail``)."""
    return detail if headline is None else f"{headline}\n{detail}"


def _plain(v) -> str:
    """4096.0 -> '4096' (integers read back from CSV as floats), anything else as str."""
    numeric = isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
    return str(int(v)) if numeric and float(v).is_integer() else str(v)


def _series_label(d: pd.DataFrame, label: pd.Series, axes: tuple[str, ...]) -> pd.Series:
    """``label`` with ", column value" appended for each of :data:`SERIES_COLUMNS` but the figure's
    ``axes`` that takes more than one value among the rows of one label: such rows are different
    series, never one median."""
    out = label.copy()
    for column in SERIES_COLUMNS:
        if column not in d or column in axes:
            continue
        values = d[column].map(_plain)  # (NaN as 'nan': a missing value is a value of its own)
        varies = values.groupby(label).transform("nunique") > 1
        out = out.where(~varies, out + ", " + column + " " + values)
    return out


IMPL_COLOURS = {"t3nsor": 0, "tt": 1, "dense": 2, "tltorch": 3}  # colorblind palette slots: one colour per
# implementation in every figure (a sweep's forward and training figures alike); further series of one
# implementation (backends, fused or not) take the slots after these


def _impl_palette(d: pd.DataFrame) -> dict:
    """Colour of each ``implementation`` series of ``d``: its implementation's own for the first of its series."""
    colours = sns.color_palette("colorblind", 10)
    spare = iter(range(len(IMPL_COLOURS), 10))
    palette, taken = {}, set()
    for label, impl in d[["implementation", "impl"]].drop_duplicates("implementation").sort_values(
            "implementation").itertuples(index=False):
        slot = IMPL_COLOURS.get(impl)
        if slot is None or slot in taken:
            slot = next(spare, 9)
        taken.add(slot)
        palette[label] = colours[slot]
    return palette


def plot_rank_sweep(df: pd.DataFrame, out_dir: str | Path, name: str = "fig11_time_vs_rank",
                    mode: str = "forward", headline: str | None = None) -> Path:
    """Time per lookup (ns, median with IQR bars) against TT rank, one panel per pooling factor.

    The shape of the paper's Figure 11. nn.EmbeddingBag has no rank: it is drawn as a horizontal
    line at the median of its measurements in the same run.
    """
    _style()
    d = df[(df["metric"] == "time_per_lookup") & (df["mode"] == mode)].copy()
    if d.empty:
        raise ValueError(f"no time_per_lookup rows with mode={mode!r} to plot")
    # one line per (implementation, backend[, fused update]): never average different series
    label = d["impl"].map(IMPL_LABELS).fillna(d["impl"])
    tt = d["impl"] == "tt"
    label = label.where(~tt, label + " (" + d["backend"].astype(str) + ")")
    if "fused" in d and d["fused"].fillna(False).astype(bool).any():
        label = label.where(~d["fused"].fillna(False).astype(bool), label + ", fused update")
    d["implementation"] = _series_label(d, label, axes=("tt_rank", "pooling_factor", "mode"))
    poolings = sorted(d["pooling_factor"].unique())
    fig, axes = plt.subplots(1, len(poolings), figsize=(4.2 * len(poolings), 3.6), squeeze=False, sharey=False)
    palette = _impl_palette(d)
    for ax, pooling in zip(axes[0], poolings):
        part = d[d["pooling_factor"] == pooling]
        ranked = part[part["tt_rank"].notna()]
        for label, g in ranked.groupby("implementation"):
            g = g.groupby("tt_rank").agg(median=("median", "median"), q1=("q1", "median"), q3=("q3", "median"))
            ax.errorbar(g.index, g["median"], yerr=[g["median"] - g["q1"], g["q3"] - g["median"]],
                        marker="o", capsize=3, label=label, color=palette.get(label))
        for label, g in part[part["tt_rank"].isna()].groupby("implementation"):  # no rank: one value for all
            ax.axhline(g["median"].median(), ls="--", label=label, color=palette.get(label))
            ax.axhspan(g["q1"].median(), g["q3"].median(), color=palette.get(label), alpha=0.15, lw=0)  # its IQR
        ax.set_xscale("log", base=2)
        ranks = sorted(ranked["tt_rank"].unique())
        if ranks:
            ax.set_xticks(ranks, [str(int(r)) for r in ranks])
        ax.set_yscale("log")
        ax.set_title(f"pooling factor {int(pooling)}")
        ax.set_xlabel("TT rank")
        ax.set_ylabel("time per lookup (ns, median, IQR bars)")
    legend = {}  # every panel's series (a series may be missing from some panels), in plotting order
    for ax in axes[0]:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 3),
               bbox_to_anchor=(0.5, -0.08 * -(-len(legend) // 3)), frameon=False)
    tables = ", ".join(f"{t} ({int(n):,} x {int(e)})" for t, n, e in
                       d[["table", "num_embeddings", "embedding_dim"]].drop_duplicates().itertuples(index=False))
    batches = ", ".join(str(int(b)) for b in sorted(d["batch_size"].unique()))
    fig.suptitle(title(headline, f"{mode}: table {tables}, batch {batches}; {_machine(d)}"), fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir, name)
