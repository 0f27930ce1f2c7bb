"""Figures of the cache experiments (paper Figures 9, 10, 12) from aggregated result tables.

Same conventions as :mod:`reports.figures`: seaborn, labelled axes with units, PNG + PDF, the PNG's
path returned. :func:`plot_cache_figures` picks the figures a result table supports; the Hydra
callback calls it. Nothing here measures.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from benches.cache_experiments import break_even  # noqa: E402

from .figures import _machine, _style, save, title  # noqa: E402

__all__ = ["is_cache_experiment", "plot_cache_figures", "plot_topk_stability", "plot_hit_rate_sweep",
           "plot_cache_size_warmup"]

log = logging.getLogger("ttrec.bench")


def _cached(df: pd.DataFrame) -> pd.Series:
    if "cache_enabled" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["cache_enabled"].astype(str).str.lower() == "true"


def is_cache_experiment(df: pd.DataFrame) -> bool:
    """Results of a cache experiment: cached points, or top-k stability windows."""
    return bool(_cached(df).any()) or bool((df["metric"] == "topk_change").any())


def _workload_label(r: pd.Series) -> str:
    dist = r["distribution"]
    if dist == "zipf":
        return f"Zipf alpha={r['zipf_alpha']:g}" + ("" if r.get("permute", True) in (True, "True") else " (unpermuted)")
    if dist == "hot_set":
        return f"hot set h={r['hit_rate']:g}"
    if dist == "criteo":
        return f"Criteo feature {int(r['criteo_feature'])}"
    return str(dist)


def _batch_label(r: pd.Series) -> str:
    """"batch B x pooling L"; a Criteo feature has no pooling_factor (one value, or none, per sample)."""
    pooling = r.get("pooling_factor")
    batch = f"batch {int(r['batch_size'])}"
    return batch if pd.isna(pooling) else f"{batch} x pooling {int(pooling)}"


def plot_cache_figures(df: pd.DataFrame, out_dir: str | Path, headlines: dict[str, str] | None = None) -> list[Path]:
    """Every cache figure ``df`` supports: Figure 9 for top-k windows, Figure 12 for a sweep over the
    hot-set hit rate (plus its break-even table, CSV), Figure 10 for a sweep over cache size or warm-up.
    ``headlines``: a first title line per figure ("fig9", "fig10", "fig12"; the report names the paper's figure)."""
    h = headlines or {}
    out: list[Path] = []
    if (df["metric"] == "topk_change").any():
        out.append(plot_topk_stability(df, out_dir, headline=h.get("fig9")))
    cached = df[_cached(df)]
    if cached.empty:
        return out
    if (cached["distribution"] == "hot_set").any() and cached["hit_rate"].nunique() >= 2:
        out += plot_hit_rate_sweep(df, out_dir, headline=h.get("fig12"))
    if cached["cache_fraction"].nunique() >= 2 or cached["cache_warmup_iters"].nunique() >= 2:
        out.append(plot_cache_size_warmup(df, out_dir, headline=h.get("fig10")))
    return out



# ---- Figure 9 ----

def plot_topk_stability(df: pd.DataFrame, out_dir: str | Path, name: str = "fig9_topk_stability",
                        headline: str | None = None) -> Path:
    """Per window of the stream: change of the top-k set (log scale above 1/k, linear below, so that 0
    shows), the hit ratio a cache holding the previous window's top-k would have had (exact counts as a
    wide pale line, the bounded counter's dashed on top: the two often coincide), and the bounded
    counter's recall of the exact top-k."""
    _style()
    d = df[df["metric"].isin(["topk_change", "topk_window_hit_ratio", "topk_window_hit_ratio_bounded",
                              "topk_recall_bounded"])].copy()
    if d.empty:
        raise ValueError("no top-k stability rows (metric topk_change) to plot")
    d["workload"] = d.apply(_workload_label, axis=1)
    d["progress_pct"] = 100 * d["progress"]
    panels = [("topk_change", "change of the top-k set\n(fraction of rows new, log above 1/k)", True),
              ("topk_window_hit_ratio", "hit ratio of the previous top-k\n(wide pale: exact, dashed: bounded)",
               False),
              ("topk_recall_bounded", "bounded counter: share of the\nexact top-k it finds", False)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    order = sorted(d["workload"].unique())
    for ax, (metric, ylabel, log_y) in zip(axes, panels):
        part = d[d["metric"] == metric]
        with_bounded = metric == "topk_window_hit_ratio"  # exact wide and pale, the bounded counter's dashed on it
        style = dict(lw=5, alpha=0.35) if with_bounded else dict(marker="o", markersize=3)
        sns.lineplot(data=part, x="progress_pct", y="median", hue="workload", hue_order=order, ax=ax, errorbar=None,
                     **style)
        if with_bounded:
            bounded = d[d["metric"] == "topk_window_hit_ratio_bounded"]
            sns.lineplot(data=bounded, x="progress_pct", y="median", hue="workload", hue_order=order, ls="--",
                         lw=1.2, ax=ax, errorbar=None, legend=False)
        if log_y:
            # a change of 0 (the top-k set did not move) has no place on a log axis, and it is the stable
            # case Figure 9 looks for: linear below one row's share 1/k (the smallest change there can be
            # but 0), logarithmic above, so 0 sits at the bottom and every other value where log puts it
            linthresh = 1 / float(d["topk_rows"].max())
            ax.set_yscale("symlog", linthresh=linthresh, linscale=0.5)
            ax.set_ylim(-0.3 * linthresh, 1.5)  # the whole range of a share, 0 clear of the axis
            # ticks at 0 and the powers of 10 from 1/k up (the default put one inside the linear part, on top of 0)
            ax.set_yticks([0.0] + [10.0 ** e for e in range(math.ceil(math.log10(linthresh)), 1)])
        else:
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("stream progress (% of batches)")
        ax.set_ylabel(ylabel)
        ax.get_legend().remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.07), frameon=False)
    r = d.iloc[0]
    fig.suptitle(title(headline, f"top-{int(r['topk_rows']):,} rows ({100 * r['cache_fraction']:g}% of "
                        f"{int(r['num_embeddings']):,}), {int(r['stability_batches'])} batches ({_batch_label(r)}); "
                        f"bounded counter {int(r['counter_slots']):,} slots ({r['counter_bytes'] / 2**20:.1f} MiB "
                        f"vs exact {r['exact_counter_bytes'] / 2**20:.0f} MiB)"), fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir, name)


# ---- Figure 12 ----

def plot_hit_rate_sweep(df: pd.DataFrame, out_dir: str | Path, name: str = "fig12_time_vs_hit_rate",
                        metric: str = "time_per_lookup", headline: str | None = None) -> list[Path]:
    """Time per lookup (ns, median with IQR bars) against the measured hit ratio of the timed batch,
    one panel per pooling factor: TT + cache (solid, per rank), TT without cache (dotted, per rank),
    nn.EmbeddingBag (black dashed). Break-even hit rates are marked and written to ``<name>_break_even.csv``."""
    _style()
    d = df[df["metric"] == metric].copy()
    cached = _cached(d)
    d["tt_rank"] = pd.to_numeric(d["tt_rank"], errors="coerce")
    # every job times all three on one batch: give the baselines the job's measured hit ratio
    x_of_job = d[cached].groupby("job_dir")["hit_ratio"].first()
    d["x"] = d["job_dir"].map(x_of_job)
    d = d.dropna(subset=["x"])
    cached = _cached(d)
    be = break_even(df, metric)
    poolings = sorted(d["pooling_factor"].unique())
    ranks = sorted(d.loc[cached, "tt_rank"].dropna().unique())
    colors = dict(zip(ranks, sns.color_palette("colorblind", len(ranks))))
    fig, axes = plt.subplots(1, len(poolings), figsize=(5.2 * len(poolings), 4.0), squeeze=False)
    for ax, pooling in zip(axes[0], poolings):
        part = d[d["pooling_factor"] == pooling]
        pc = _cached(part)
        for rank in ranks:
            for sel, style, label in ((pc, "-", f"TT + cache, rank {int(rank)}"),
                                      (~pc & (part["impl"] == "tt"), ":", f"TT, no cache, rank {int(rank)}")):
                g = part[sel & (part["tt_rank"] == rank)].groupby("x")[["median", "q1", "q3"]].median().sort_index()
                if g.empty:
                    continue
                ax.errorbar(g.index, g["median"], yerr=[g["median"] - g["q1"], g["q3"] - g["median"]], ls=style,
                            marker="o" if style == "-" else None, ms=4, capsize=2, color=colors[rank], label=label)
        g = part[part["impl"] == "dense"].groupby("x")[["median", "q1", "q3"]].median().sort_index()
        if not g.empty:  # (timed in the same jobs only with cache.compare=true)
            ax.errorbar(g.index, g["median"], yerr=[g["median"] - g["q1"], g["q3"] - g["median"]], ls="--",
                        color="black", capsize=2, label="nn.EmbeddingBag")
        for _, row in be[be["pooling_factor"] == pooling].iterrows():
            if row["reached"]:
                ax.axvline(row["break_even_hit_ratio"], color=colors.get(row["tt_rank"], "gray"), lw=0.8, alpha=0.7)
        text = "\n".join(
            f"rank {int(r['tt_rank'])}: " + (f"break-even at {100 * r['break_even_hit_ratio']:.1f}%" if r["reached"]
                                             else f"no break-even up to {100 * r['max_hit_ratio']:.0f}% "
                                                  f"({r['time_ratio_at_max_hit']:.2f}x slower there)")
            for _, r in be[be["pooling_factor"] == pooling].sort_values("tt_rank").iterrows()) or (
            "no nn.EmbeddingBag timed in these jobs (cache.compare=true): no break-even")
        ax.set_yscale("log")
        # an empty band below the data for the break-even text (it must hide no point or error bar): the data,
        # error bars included, fill the top 75% of the log axis
        lo, hi = ax.dataLim.y0, ax.dataLim.y1
        if lo > 0 and hi > lo:
            span = math.log(hi / lo)
            ax.set_ylim(lo * math.exp(-span / 3) / 1.05, hi * 1.15)
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=7, va="bottom",
                bbox=dict(boxstyle="round", fc="white", alpha=0.8))
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(f"pooling factor {int(pooling)}")
        ax.set_xlabel("cache hit ratio of the timed batch (lookups from cache / lookups)")
        ax.set_ylabel("time per lookup (ns, median, IQR bars)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.16),
               frameon=False, fontsize=8)
    r = d.iloc[0]
    cache_pct = 100 * float(d.loc[cached, "cache_fraction"].iloc[0])
    fig.suptitle(title(headline, f"{r['mode']} step: {r['table']} table ({int(r['num_embeddings']):,} x "
                        f"{int(r['embedding_dim'])}), batch {int(r['batch_size'])}, cache {cache_pct:g}% of rows; "
                        f"{_machine(d)}"), fontsize=9)
    fig.tight_layout()
    png = save(fig, out_dir, name)
    csv = Path(out_dir) / f"{name}_break_even.csv"
    be.to_csv(csv, index=False)
    log.info("break-even hit rates (TT + cache vs nn.EmbeddingBag):\n%s", be.to_string(index=False))
    return [png, csv]


# ---- Figure 10 ----

def plot_cache_size_warmup(df: pd.DataFrame, out_dir: str | Path, name: str = "fig10_cache_size_warmup",
                           metric: str = "time_per_batch", headline: str | None = None) -> Path:
    """Held-out hit ratio (top) and time per training iteration (bottom, ms) against the cache size
    (left, % of the table, one line per warm-up length) and the warm-up length (right, one line
    per cache size); TT without cache and nn.EmbeddingBag timed in the same jobs as horizontal lines."""
    _style()
    d = df[df["metric"] == metric].copy()
    cached = d[_cached(d)].copy()
    cached["cache_pct"] = 100 * cached["cache_fraction"].astype(float)
    cached["warmup"] = cached["cache_warmup_iters"].astype(int)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.4), sharey="row")
    columns = (("cache_pct", "warmup", "cache size (% of the table's rows)", "colour: warm-up length"),
               ("warmup", "cache_pct", "warm-up length (iterations)", "colour: cache size"))
    for col, (x, hue, xlabel, legend_title) in enumerate(columns):
        for row, (y, ylabel) in enumerate((("held_out_hit_ratio", "hit ratio on held-out batches"),
                                           ("median", f"time per iteration ({d['unit'].iloc[0]}, median, IQR bars)"))):
            ax = axes[row][col]
            hues = sorted(cached[hue].unique())
            palette = dict(zip(hues, sns.color_palette("viridis", len(hues))))
            for h in hues:
                g = cached[cached[hue] == h].groupby(x)[[y, "q1", "q3"]].median().sort_index()
                label = f"warm-up {int(h)}" if hue == "warmup" else f"cache {h:g}%"
                if y == "median":
                    ax.errorbar(g.index, g[y], yerr=[g[y] - g["q1"], g["q3"] - g[y]], marker="o", ms=4, capsize=2,
                                color=palette[h], label=label)
                else:
                    ax.plot(g.index, g[y], marker="o", ms=4, color=palette[h], label=label)
            if y == "median":
                for sel, style, label in ((~_cached(d) & (d["impl"] == "tt"), ":", "TT, no cache"),
                                          (d["impl"] == "dense", "--", "nn.EmbeddingBag")):
                    if sel.any():
                        ax.axhline(d.loc[sel, "median"].median(), ls=style, color="black", label=label)
            else:
                ax.set_ylim(0, 1.02)
            ticks = sorted(cached[x].unique())
            if ticks[0] > 0:
                ax.set_xscale("log")
            else:  # a warm-up of 0 iterations: linear up to 1, logarithmic above (a log axis has no 0)
                ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        # the column's colours mean the same in both rows: one legend over the column
        handles, labels = axes[1][col].get_legend_handles_labels()
        axes[0][col].legend(handles, labels, title=legend_title, loc="lower center", bbox_to_anchor=(0.5, 1.02),
                            ncol=3, fontsize=7, title_fontsize=8, frameon=False)
    r = d.iloc[0]
    workload = _workload_label(r)
    fig.suptitle(title(headline, f"{r['mode']} step: {r['table']} table ({int(r['num_embeddings']):,} x "
                        f"{int(r['embedding_dim'])}), TT rank {int(float(r['tt_rank']))}, {workload}, {_batch_label(r)}; "
                        f"{_machine(d)}"), fontsize=9)
    fig.tight_layout()
    return save(fig, out_dir, name)
