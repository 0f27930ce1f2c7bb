"""Figures of the end-to-end DLRM training experiments: paper Figures 7, 6, 10 and Table 1.

Same conventions as :mod:`reports.figures` (its style and :func:`~reports.figures.save`): labelled
axes with units, PNG + PDF, the PNG's path returned. Input: the experiment's aggregated tidy table
(benches.training rows: ``model`` main / uncompressed / tt / planted). Nothing here measures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .figures import _machine, _style, save  # noqa: E402

__all__ = ["TABLE1_PAPER", "DENSE_INIT_ORDER", "TT_INIT_LABELS", "metric_table", "plot_fig7", "plot_table1",
           "plot_fig6", "plot_fig10_training"]

# Table 1 of the paper (uncompressed DLRM; its caption names no dataset, Kaggle by its 79.3% baseline):
# dense init -> accuracy (%)
TABLE1_PAPER = {"uniform": 79.263, "gauss_1": 78.123, "gauss_1_2": 78.371, "gauss_1_8": 78.823,
                "gauss_1_3n": 79.256, "gauss_1_9n2": 79.220}
DENSE_INIT_ORDER = list(TABLE1_PAPER)
DENSE_INIT_LABELS = {"uniform": "U(-1/√n, 1/√n)", "gauss_1": "N(0, 1)", "gauss_1_2": "N(0, 1/2)",
                     "gauss_1_8": "N(0, 1/8)", "gauss_1_3n": "N(0, 1/3n)", "gauss_1_9n2": "N(0, 1/9n²)"}
TT_INIT_LABELS = {"uniform": "uniform", "normal": "normal", "sampled_gaussian": "sampled Gaussian (Alg. 3)",
                  "calibrated": "calibrated (ours)"}


def metric_table(df: pd.DataFrame, metric: str, figure: str, model: str | None = "main") -> pd.DataFrame:
    """Rows of ``metric`` (of ``model``'s rows when given), or a ValueError naming the figure and what is there."""
    if "metric" not in df.columns or "model" not in df.columns:
        raise ValueError(f"df: got columns {list(df.columns)[:12]}...; {figure} needs the training experiments' "
                         "tidy table (columns 'metric' and 'model')")
    d = df[df["metric"] == metric]
    if model is not None:
        d = d[d["model"] == model]
    if d.empty:
        raise ValueError(f"df: no rows with metric {metric!r}{f' of model {model!r}' if model else ''} for {figure}; "
                         f"the table has metrics {sorted(df['metric'].dropna().unique())}")
    return d.copy()


def _title(fig: plt.Figure, df: pd.DataFrame, what: str) -> None:
    r = df.iloc[0]
    setup = (f"{r['dataset']} DLRM, {r['source']} data, tables / {int(r['scale_down'])}, batch {int(r['batch_size'])}, "
             f"{int(r['iterations'])} iterations")
    fig.suptitle(f"{what}\n{setup}; {_machine(df)}", fontsize=9)


def _bayes_text(df: pd.DataFrame) -> str:
    b = df[df["metric"] == "bayes_accuracy"]
    return f"\nBayes-optimal (planted model): {b['median'].median():.2f}%" if not b.empty else ""


def _std_error(acc: pd.DataFrame) -> float:
    """Binomial std error (points) of the accuracies in ``acc`` (their held-out size, their level)."""
    p, n = acc["median"].median() / 100, acc["eval_samples"].max()
    return 100 * float(np.sqrt(p * (1 - p) / n))


def _errorbar(ax, x, g: pd.DataFrame, **kw) -> None:
    ax.errorbar(x, g["median"], yerr=[g["median"] - g["q1"], g["q3"] - g["median"]], capsize=3, marker="o", **kw)


# ---- Figure 7 ----

def plot_fig7(df: pd.DataFrame, out_dir: str | Path, name: str = "fig7_training_time") -> Path:
    """(a) Time per training iteration / the uncompressed model's (paired, same batches), against
    the number of TT tables, one bar per rank. (b) Where the time goes: the embedding part and the
    rest of each model's iteration, as fractions of the uncompressed model's iteration time in the
    same job (so that load drift between jobs cancels)."""
    _style()
    ratio = metric_table(df, "time_vs_reference", "Figure 7")
    total = metric_table(df, "time_per_iteration", "Figure 7", model=None)
    emb = metric_table(df, "embedding_time", "Figure 7", model=None)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    ranks = sorted(ratio["tt_rank"].dropna().unique())
    tables = sorted(ratio["tt_tables"].unique())
    palette = sns.color_palette("colorblind", len(ranks))
    width = 0.8 / max(1, len(ranks))
    for i, rank in enumerate(ranks):
        g = ratio[ratio["tt_rank"] == rank].groupby("tt_tables")[["median", "q1", "q3"]].median().reindex(tables)
        x = np.arange(len(tables)) + (i - (len(ranks) - 1) / 2) * width
        ax.bar(x, g["median"], width, color=palette[i], label=f"rank {int(rank)}",
               yerr=[g["median"] - g["q1"], g["q3"] - g["median"]], capsize=2)
    ax.axhline(1.0, color="black", lw=1, ls="--", label="uncompressed")
    ax.set_ylim(0, ratio["q3"].max() * 1.25)
    ax.set_xticks(np.arange(len(tables)), [f"TT-Emb. of {int(t)}" for t in tables])
    ax.set_ylabel("time per iteration / uncompressed\n(median of paired ratios, IQR)")
    ax.set_title("(a) normalized training time")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    job = "job_dir" if "job_dir" in df.columns else "tt_rank"
    ref_total = total[total["model"] == "uncompressed"].groupby(job)["median"].median()
    parts = []
    for (model, key), g in pd.concat([total.assign(part="total"), emb.assign(part="embedding")]).groupby(["model", job]):
        if key not in ref_total.index:
            continue
        r = g.iloc[0]
        label = "uncompressed" if model != "main" else f"{int(r['tt_tables'])} TT, R={int(r['tt_rank'])}"
        v = g.set_index("part")["median"] / ref_total[key]
        parts.append({"label": label, "embedding": v["embedding"], "other": v["total"] - v["embedding"],
                      "k": (0, 0) if model != "main" else (int(r["tt_tables"]), int(r["tt_rank"]))})
    p = pd.DataFrame(parts).groupby("label").agg(embedding=("embedding", "median"), other=("other", "median"),
                                                 k=("k", "first")).sort_values("k")
    y = np.arange(len(p))
    colors = sns.color_palette("colorblind")
    bx.barh(y, p["embedding"], color=colors[0], label="embeddings (lookups, backward + fused update, SGD)")
    bx.barh(y, p["other"], left=p["embedding"], color=colors[7], label="MLPs, interaction, loss, their SGD")
    bx.axvline(1.0, color="black", lw=1, ls="--")
    bx.set_yticks(y, p.index, fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel("time per iteration / the uncompressed model's in the same job (medians)")
    bx.set_title("(b) where the time goes")
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    _title(fig, df, "Figure 7: DLRM training time with the largest tables in TT format")
    fig.tight_layout()
    return save(fig, out_dir, name)


# ---- Table 1 ----

def plot_table1(df: pd.DataFrame, out_dir: str | Path, name: str = "table1_dense_init_accuracy") -> Path:
    """Accuracy of the uncompressed model per dense-table init: this run (with the Bayes-optimal
    accuracy of the planted model) beside the paper's Table 1 (Criteo Kaggle, as its accuracies suggest: its
    caption names no dataset)."""
    _style()
    acc = metric_table(df, "accuracy", "Table 1")
    g = acc.groupby("dense_init")["median"].median()
    order = [i for i in DENSE_INIT_ORDER if i in g.index] + sorted(set(g.index) - set(DENSE_INIT_ORDER))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [DENSE_INIT_LABELS.get(i, i) for i in order]
    colors = sns.color_palette("colorblind", len(order))
    se = _std_error(acc)
    ax.bar(labels, [g[i] for i in order], color=colors, yerr=se, capsize=3)
    for x, i in enumerate(order):
        if np.isfinite(g[i]):
            ax.annotate(f"{g[i]:.2f}", (x, g[i] + se), ha="center", va="bottom", fontsize=7, xytext=(0, 4),
                        textcoords="offset points")
        else:  # a model that diverged has no accuracy (NaN, benches.training): marked, not an empty slot
            ax.text(x, 0.02, "diverged (NaN)", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                    va="bottom", fontsize=7, color=colors[x])
    ax.set_ylim(g.min() - max(1.0, 2 * se), g.max() + max(0.6, 2 * se))  # the error bars and their labels inside
    ax.set_ylabel("held-out accuracy (%) ± std error")
    ax.set_title(f"(this run) uncompressed DLRM, synthetic clicks{_bayes_text(df)}", fontsize=9)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    paper = [TABLE1_PAPER[i] for i in order if i in TABLE1_PAPER]
    bx.bar([DENSE_INIT_LABELS[i] for i in order if i in TABLE1_PAPER], paper, color=colors[:len(paper)])
    bx.set_ylim(min(paper) - 0.5, max(paper) + 0.3)
    bx.set_ylabel("accuracy (%)")
    bx.set_title("(paper, Table 1) Criteo Kaggle")
    bx.tick_params(axis="x", rotation=30, labelsize=8)
    _title(fig, df, "Table 1: accuracy by the embedding tables' initialization")
    fig.tight_layout()
    return save(fig, out_dir, name)


# ---- Figure 6 ----

def plot_fig6(df: pd.DataFrame, out_dir: str | Path, name: str = "fig6_accuracy") -> Path:
    """(a) accuracy against the number of TT tables, one line per rank (each init scheme its own line
    style); the uncompressed model at 0 tables. (c) accuracy per TT init scheme, bars per
    (tables, rank). The planted model's Bayes accuracy is in the panel titles (a line would squash
    the y range the accuracies differ in)."""
    _style()
    acc = metric_table(df, "accuracy", "Figure 6")
    tt = acc[acc["tt_tables"] > 0]
    base = acc[acc["tt_tables"] == 0]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    ranks = sorted(tt["tt_rank"].dropna().unique())
    inits = [i for i in TT_INIT_LABELS if i in set(tt["tt_init"].dropna())]
    palette = dict(zip(ranks, sns.color_palette("colorblind", len(ranks))))
    styles = dict(zip(inits, ["-", "--", "-.", ":"]))
    base_acc = base["median"].median() if not base.empty else None
    for (rank, init), g in tt.groupby(["tt_rank", "tt_init"]):
        g = g.groupby("tt_tables")["median"].median()
        if base_acc is not None:
            g = pd.concat([pd.Series({0: base_acc}), g])
        ax.plot(g.index, g.values, marker="o", ls=styles.get(init, "-"), color=palette[rank],
                label=f"R={int(rank)}, {TT_INIT_LABELS.get(init, init)}")
    if base_acc is not None:
        ax.axhline(base_acc, color="gray", lw=1, label="uncompressed")
    # a model that diverged has no accuracy (NaN, benches.training): marked at the panel's foot, not left out
    diverged = tt[~np.isfinite(tt["median"])]
    low = ax.get_ylim()[0]
    for t, r, init in sorted({(int(t), r, i) for t, r, i in zip(diverged["tt_tables"], diverged["tt_rank"],
                                                               diverged["tt_init"])}):
        ax.plot([t], [low], marker="X", ms=9, color=palette[r], clip_on=False, zorder=5)
        ax.annotate(f"diverged: R={int(r)}, {TT_INIT_LABELS.get(init, init)}", (t, low), xytext=(-6, 6),
                    textcoords="offset points", ha="right", fontsize=7, color=palette[r])
    ax.set_xticks(sorted(set(acc["tt_tables"].astype(int))))
    ax.set_xlabel("tables in TT format (the largest)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"(a) accuracy vs TT tables and rank{_bayes_text(df)}", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    groups = sorted({(int(t), int(r)) for t, r in zip(tt["tt_tables"], tt["tt_rank"])})
    width = 0.8 / max(1, len(inits))
    colors = sns.color_palette("colorblind", len(inits))
    for i, init in enumerate(inits):
        g = tt[tt["tt_init"] == init].groupby(["tt_tables", "tt_rank"])["median"].median()
        vals = [g.get((t, r), np.nan) for t, r in groups]
        xs = np.arange(len(groups)) + (i - (len(inits) - 1) / 2) * width
        bx.bar(xs, vals, width, color=colors[i], label=TT_INIT_LABELS[init])
        for x, (t, r), v in zip(xs, groups, vals):
            if (t, r) in g.index and not np.isfinite(v):  # measured, and diverged
                bx.text(x, 0.02, "diverged (NaN)", transform=bx.get_xaxis_transform(), rotation=90, ha="center",
                        va="bottom", fontsize=7, color=colors[i])
    if base_acc is not None:
        bx.axhline(base_acc, color="gray", lw=1, label="uncompressed")
    finite = tt["median"][np.isfinite(tt["median"])]
    if not finite.empty:
        bx.set_ylim(max(0.0, finite.min() - 1), max(finite.max(), base_acc or 0) + 1)
    bx.set_xticks(np.arange(len(groups)), [f"{t} TT, R={r}" for t, r in groups], fontsize=8)
    bx.set_ylabel("held-out accuracy (%)")
    bx.set_title(f"(c) accuracy per TT init scheme{_bayes_text(df)}", fontsize=9)
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    _title(fig, df, "Figure 6: DLRM accuracy with TT tables, ranks and init schemes")
    fig.tight_layout()
    return save(fig, out_dir, name)


# ---- Figure 10 in training ----

def plot_fig10_training(df: pd.DataFrame, out_dir: str | Path, name: str = "fig10_training_cache") -> Path:
    """Time per iteration relative to the same TT model without cache (paired), total training
    time and accuracy, against the cache warm-up share (one line per cache size) and the cache
    size (one line per warm-up)."""
    _style()
    ratio = metric_table(df, "time_vs_reference", "Figure 10 (training)")
    acc = metric_table(df, "accuracy", "Figure 10 (training)")
    hit = df[(df["metric"] == "hit_ratio") & (df["model"] == "main")]
    ref_acc = df[(df["metric"] == "accuracy") & (df["model"] == "tt")]["median"].median()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    fr = sorted(ratio["cache_fraction"].unique())
    wu = sorted(ratio["cache_warmup_share"].unique())
    pf = dict(zip(fr, sns.color_palette("colorblind", len(fr))))
    pw = dict(zip(wu, sns.color_palette("colorblind", len(wu))))
    panels = [(ratio, "time per iteration / TT without cache", 1.0), (acc, "held-out accuracy (%)", ref_acc),
              (hit, "cache hit ratio (after warm-up)", None)]
    def dodge(i: int, n: int) -> float:  # series i of n, centred on 0: its x offset, so that error bars do not hide each other
        return i - (n - 1) / 2

    for col, (d, ylabel, ref) in enumerate(panels):
        ax, bx = axes[0][col], axes[1][col]
        for i, (f, g) in enumerate(d.groupby("cache_fraction")):  # (a) warm-up, linear: 0.8 points apart
            g = g.groupby("cache_warmup_share")[["median", "q1", "q3"]].median()
            _errorbar(ax, 100 * g.index.values + 0.8 * dodge(i, len(fr)), g, color=pf[f],
                      label=f"cache {100 * f:g}% of rows")
        for i, (w, g) in enumerate(d.groupby("cache_warmup_share")):  # (b) size, log: 4% of a decade apart
            g = g.groupby("cache_fraction")[["median", "q1", "q3"]].median()
            _errorbar(bx, 100 * g.index.values * 10 ** (0.04 * dodge(i, len(wu))), g, color=pw[w],
                      label=f"warm-up {100 * w:.0f}%")
        for a in (ax, bx):
            if ref is not None and not pd.isna(ref):
                a.axhline(ref, color="gray", ls="--", lw=1, label="TT without cache")
            a.set_ylabel(ylabel)
        ax.set_xlabel("cache warm-up (% of training iterations)")
        bx.set_xlabel("cache size (% of each TT table's rows)")
        bx.set_xscale("log")
    for row in axes:  # each row's legend right of its last panel, clear of the data
        row[2].legend(*row[0].get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5),
                      frameon=False)
    axes[0][0].set_title("(a) warm-up")
    axes[1][0].set_title("(b) cache size")
    _title(fig, df, "Figure 10 (training): LFU cache warm-up and size against time and accuracy "
                    f"({int(ratio['tt_tables'].iloc[0])} TT tables, rank {int(ratio['tt_rank'].iloc[0])})")
    fig.tight_layout()
    return save(fig, out_dir, name)
