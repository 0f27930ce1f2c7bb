"""Mutation-found gaps in the figures and the Hydra callbacks: each figure plots the rows, columns and
series it says (checked on the data of the drawn Axes against hand-computed values, never pixels), and
the callback draws and reports what belongs to this run."""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Rectangle
from omegaconf import OmegaConf

from benches import callbacks
from benches.analytic import model_size_rows, tt_shapes_rows
from benches.config import BenchConfig
from benches.results import AGGREGATE_FILE, FAILED_FILE, write_rows
from reports import cache_figures, figures, paper_figures, training_figures

ENV = {"cpu_model": "Test CPU", "threads": 2}
TRAINING = {"dataset": "kaggle", "source": "synthetic", "scale_down": 1000, "batch_size": 128, "iterations": 600, **ENV}


def _csv(rows: list[dict]) -> pd.DataFrame:
    """Through CSV, as the report and the callback read results back."""
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    buf.seek(0)
    return pd.read_csv(buf)


def _errorbars(ax) -> dict[str, tuple[np.ndarray, ...]]:
    """{label: (x, y, lower end, upper end)} of every error-bar series of ``ax``."""
    out = {}
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            line, _, (bars, *_) = c.lines
            ends = np.array([[seg[0][1], seg[1][1]] for seg in bars.get_segments()], dtype=float)
            out[c.get_label()] = (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float),
                                  ends[:, 0], ends[:, 1])
    return out


def _lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


# ---- reports.figures: Figure 11's rank sweep ----

def _rank_sweep_rows(backends=("cpu",)) -> pd.DataFrame:
    """3 replicates (seeds) per point, medians x1, x1.1, x2 (their median is x1.1, their mean x1.37);
    q1 = 0.9 median, q3 = 1.5 median (asymmetric bars). Train is 10x slower than forward."""
    rows = []
    point = {"metric": "time_per_lookup", "table": "t", "num_embeddings": 1000, "embedding_dim": 16,
             "batch_size": 64, "pooling_factor": 1, **ENV}
    for mode, scale in (("train", 10.0), ("forward", 1.0)):
        for seed, factor in enumerate((1.0, 1.1, 2.0)):
            for i, backend in enumerate(backends):
                for rank in (8, 16, 32):
                    ns = scale * rank * 10 * (i + 1) * factor
                    rows.append({**point, "impl": "tt", "backend": backend, "tt_rank": rank, "mode": mode, "seed": seed,
                                 "median": ns, "q1": 0.9 * ns, "q3": 1.5 * ns})
            ns = scale * (10.0, 20.0, 60.0)[seed]  # nn.EmbeddingBag: median 20, min 10, mean 30
            rows.append({**point, "impl": "dense", "backend": "aten", "tt_rank": None, "mode": mode, "seed": seed,
                         "median": ns, "q1": ns, "q3": ns})
    return _csv(rows)


def test_rank_sweep_plots_the_median_replicate_of_the_asked_mode_with_iqr_bars_on_log_axes(drawn, tmp_path):
    """Train mode: TT at 1.1 x 100 x rank ns (the median of its replicates), bars from q1 to q3; the
    forward rows are not in it; nn.EmbeddingBag a line at the median of its replicates (200 ns)."""
    figures.plot_rank_sweep(_rank_sweep_rows(), tmp_path, name="sweep", mode="train")
    (ax,) = drawn["sweep"].axes
    x, y, lo, hi = _errorbars(ax)["TT-EmbeddingBag (cpu)"]
    np.testing.assert_allclose(x, [8, 16, 32])
    np.testing.assert_allclose(y, [880.0, 1760.0, 3520.0])
    np.testing.assert_allclose(lo, 0.9 * y)
    np.testing.assert_allclose(hi, 1.5 * y)
    np.testing.assert_allclose(_lines(ax)["nn.EmbeddingBag"].get_ydata(), [200.0, 200.0])
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2 and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "TT rank" and "ns" in ax.get_ylabel()


def test_rank_sweep_shades_the_iqr_of_a_series_without_rank(drawn, tmp_path):
    """nn.EmbeddingBag (no TT rank: one value for every rank) gets a band from the median of its q1 to
    the median of its q3 (replicates: 10-30, 20-40, 60-80 ns -> 20 to 40 ns)."""
    df = _rank_sweep_rows()
    dense = df["impl"] == "dense"
    df.loc[dense, "q3"] = df.loc[dense, "median"] + 20
    figures.plot_rank_sweep(df, tmp_path, name="sweep", mode="forward")
    (ax,) = drawn["sweep"].axes
    (band,) = ax.patches  # axhspan: a Rectangle (a Polygon before matplotlib 3.9), y in data units
    ys = ((band.get_y(), band.get_y() + band.get_height()) if isinstance(band, Rectangle)
          else np.asarray(band.get_xy(), float)[:, 1])
    np.testing.assert_allclose((min(ys), max(ys)), (20.0, 40.0))


def test_fig9_change_axis_ticks_only_zero_and_powers_of_ten_from_one_over_k(drawn, tmp_path):
    """The symlog axis of the top-k change: a tick at 0 and at 10^e for 1/k <= 10^e <= 1, none inside the
    linear part between 0 and 1/k, where it printed over the 0 (k = 10,132: 0, 1e-4 ... 1)."""
    fig9 = pd.read_csv(Path(__file__).resolve().parents[1] / "reports" / "results" / "fig9.csv")  # the committed run
    assert set(fig9["topk_rows"].dropna()) == {10_132}
    cache_figures.plot_topk_stability(fig9, tmp_path)
    ax = next(iter(drawn.values())).axes[0]
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    np.testing.assert_allclose(ticks, [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])


def test_rank_sweep_keeps_each_tt_backend_its_own_series(drawn, tmp_path):
    """Two TT backends at 100 x rank and 200 x rank ns (forward): two lines, never one median of both."""
    figures.plot_rank_sweep(_rank_sweep_rows(("cpu", "torch")), tmp_path, name="sweep", mode="forward")
    bars = _errorbars(drawn["sweep"].axes[0])
    assert set(bars) == {"TT-EmbeddingBag (cpu)", "TT-EmbeddingBag (torch)"}
    np.testing.assert_allclose(bars["TT-EmbeddingBag (cpu)"][1], [88.0, 176.0, 352.0])
    np.testing.assert_allclose(bars["TT-EmbeddingBag (torch)"][1], [176.0, 352.0, 704.0])


# ---- reports.paper_figures ----

def _rows_sweep_rows() -> pd.DataFrame:
    """TT: time 300 ns (replicates x1, x1.1, x2: median 330), peak 1 MB; dense: time 20 ns, no peak."""
    rows = []
    for n in (10_000, 100_000, 1_000_000):
        for impl, backend, ns, peak, params in (("tt", "cpu", 300.0, 1e6, 1.2e5), ("dense", "aten", 20.0, np.nan, 64.0 * n)):
            point = {"impl": impl, "backend": backend, "num_embeddings": n, "param_bytes": params, "batch_size": 4096,
                     "tt_rank": 32 if impl != "dense" else None, "mode": "train", **ENV}
            for seed, factor in enumerate((1.0, 1.1, 2.0)):
                t = ns * factor
                rows.append({**point, "seed": seed, "metric": "time_per_lookup", "median": t, "q1": 0.9 * t,
                             "q3": 1.1 * t})
            rows.append({**point, "metric": "peak_transient_memory", "median": peak, "q1": peak, "q3": peak})
    return _csv(rows)


def test_rows_sweep_times_are_median_replicates_and_memory_lines_are_peak_and_parameter_bytes(drawn, tmp_path):
    """Time panel: TT at 330 ns, nn.EmbeddingBag at 22 ns for every row count; memory panel: TT's peak
    (solid) at 1e6 bytes, no time mixed in; parameter bytes dashed (64 x rows for nn.EmbeddingBag)."""
    paper_figures.plot_rows_sweep(_rows_sweep_rows(), tmp_path, name="rows")
    ax_t, ax_m = drawn["rows"].axes
    rows = [1e4, 1e5, 1e6]
    bars = _errorbars(ax_t)
    np.testing.assert_allclose(bars["TT-EmbeddingBag (cpu)"][0], rows)
    np.testing.assert_allclose(bars["TT-EmbeddingBag (cpu)"][1], [330.0] * 3)
    np.testing.assert_allclose(bars["nn.EmbeddingBag"][1], [22.0] * 3)
    solid = {line.get_label(): line for line in ax_m.get_lines() if line.get_linestyle() == "-" and len(line.get_xdata())}
    assert set(solid) == {"TT-EmbeddingBag (cpu)"}  # nn.EmbeddingBag has no peak measured
    np.testing.assert_allclose(solid["TT-EmbeddingBag (cpu)"].get_ydata(), [1e6] * 3)
    dashed = [line for line in ax_m.get_lines() if line.get_linestyle() == "--" and len(line.get_xdata())]
    assert sorted(tuple(line.get_ydata()) for line in dashed) == sorted([(1.2e5,) * 3, tuple(64.0 * r for r in rows)])
    assert ax_m.get_xscale() == ax_m.get_yscale() == ax_t.get_xscale() == ax_t.get_yscale() == "log"


def test_table2_tables_largest_first_and_reduction_is_dense_over_tt_parameters(drawn, tmp_path):
    """Tick labels in decreasing rows; each memory-reduction bar is rows x dim / the TT-parameter bar
    of the same table and rank (the other panel)."""
    df = _csv(tt_shapes_rows(BenchConfig()))
    paper_figures.plot_tt_shapes(df, tmp_path)
    ax_red, ax_params = drawn["table2_tt_shapes"].axes[:2]
    ticks = [t.get_text() for t in ax_red.get_xticklabels()]
    rows = [int(t.split("\n")[0].replace(",", "")) for t in ticks]
    assert len(rows) == 7 and rows == sorted(rows, reverse=True)
    dim = int(df["embedding_dim"].iloc[0])
    assert len(ax_red.containers) == len(ax_params.containers) == df["tt_rank"].nunique()
    for red, params in zip(ax_red.containers, ax_params.containers):
        np.testing.assert_allclose(red.datavalues, np.array(rows) * dim / params.datavalues, rtol=1e-6)


def test_fig5_baseline_on_top_bars_end_at_the_model_bytes_and_markers_at_the_tt_bytes(drawn, tmp_path):
    """Per dataset: the baseline is the top bar; each bar ends at the model's bytes (no stack: on a log axis a
    stacked segment's length is not its share), a marker sits at the TT tables' bytes of each compressed row;
    the text's reduction is baseline / model bytes."""
    df = _csv(model_size_rows(BenchConfig()))
    paper_figures.plot_model_size(df, tmp_path)
    wide = df.pivot_table(index=["dataset", "tt_tables"], columns="metric", values="median")
    for ax in drawn["fig5_model_size"].axes:
        dataset = ax.get_title().split(":")[0]
        part = wide.loc[dataset].sort_index(ascending=False)  # bottom (y = 0) to top
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels[-1] == "baseline (uncompressed)" and labels[0] == f"{int(part.index[0])} largest in TT"
        (bars,) = ax.containers
        for k, patch in zip(part.index, bars.patches):
            assert patch.get_x() == pytest.approx(ax.get_xlim()[0], rel=1e-9)
            assert patch.get_x() + patch.get_width() == pytest.approx(part.loc[k, "model_bytes"], rel=1e-9)
        (markers,) = ax.collections
        compressed = part[part["tt_bytes"] > 0]
        np.testing.assert_allclose(markers.get_offsets()[:, 0], compressed["tt_bytes"], rtol=1e-9)
        np.testing.assert_array_equal(markers.get_offsets()[:, 1], np.flatnonzero((part["tt_bytes"] > 0).to_numpy()))
        baseline = part.loc[0, "model_bytes"]
        smaller = [t.get_text() for t in ax.texts if "smaller" in t.get_text()]
        expected = [f"{baseline / part.loc[k, 'model_bytes']:.3g}x smaller" for k in part.index if k > 0]
        assert [s.split(", ")[-1] for s in smaller] == expected


def test_fig3_a_nearly_empty_scale_panel_says_why_in_the_panel(drawn, tmp_path):
    """An init whose entries mostly fall outside the +-5 target stds (std ratio 32: 87.5% outside) gets, inside its
    near-empty top panel, the std ratio and the share outside; an init on target gets no such note."""
    xs = np.linspace(-4.5, 4.5, 10)
    rows = [{"metric": "density", "init": init, "x": x, "median": 0.01, "num_embeddings": 1000, "embedding_dim": 16,
             "tt_rank": 8, "samples": 1600, **ENV} for init in ("uniform", "calibrated") for x in xs]
    for init, ratio, outside in (("uniform", 32.2, 0.875), ("calibrated", 1.01, 0.0)):
        rows += [{"metric": m, "init": init, "median": v, **ENV}
                 for m, v in (("std_ratio", ratio), ("outside_fraction", outside), ("ks_distance", 0.4))]
    paper_figures.plot_init_distribution(_csv(rows), tmp_path)
    uniform, calibrated = drawn["fig3_init_distribution"].axes[:2]
    assert [t.get_text() for t in uniform.texts] == [
        "entries 32.2x as wide as the target:\n87.5% fall outside this range\n(their shape: below)"]
    assert len(calibrated.texts) == 0


def test_fig3_target_curve_is_the_standard_normal_density(drawn, tmp_path):
    """The N(0, 1) curve integrates over its range to the normal's mass there (erf), whatever the bars."""
    xs = np.linspace(-4, 4, 17)
    df = _csv([{"metric": "density", "init": "normal", "x": x, "median": 0.1, "num_embeddings": 1000,
                "embedding_dim": 16, "tt_rank": 8, "samples": 1600, **ENV} for x in xs])
    paper_figures.plot_init_distribution(df, tmp_path)
    curve = _lines(drawn["fig3_init_distribution"].axes[0])["N(0, 1)"]
    x, y = np.asarray(curve.get_xdata(), float), np.asarray(curve.get_ydata(), float)
    mass = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))
    assert mass == pytest.approx(math.erf(4 / math.sqrt(2)), abs=1e-4)
    assert y.max() == pytest.approx(0.39894, abs=1e-4)


# ---- reports.cache_figures ----

def _fig10_rows(fractions=(0.01, 0.1), warmups=(64,), tt_ms=(1.0, 2.0, 9.0)) -> pd.DataFrame:
    """One cached job per (fraction, warm-up); TT without cache at ``tt_ms`` in turn (median 2 ms),
    nn.EmbeddingBag at 0.5 ms."""
    rows = []
    for job, (fraction, warmup) in enumerate((f, w) for f in fractions for w in warmups):
        common = {"job_dir": str(job), "metric": "time_per_batch", "unit": "ms", "mode": "train", "table": "tiny",
                  "num_embeddings": 1000, "embedding_dim": 16, "tt_rank": 4, "distribution": "zipf",
                  "zipf_alpha": 1.05, "permute": True, "batch_size": 16, "pooling_factor": 3, **ENV}
        t = 10.0 + job
        rows.append({**common, "impl": "tt", "cache_enabled": True, "cache_fraction": fraction,
                     "cache_warmup_iters": warmup, "held_out_hit_ratio": 0.5, "median": t, "q1": t - 1, "q3": t + 1})
        for impl, t0 in (("tt", tt_ms[job % len(tt_ms)]), ("dense", 0.5)):
            rows.append({**common, "impl": impl, "cache_enabled": False, "cache_fraction": None,
                         "cache_warmup_iters": None, "held_out_hit_ratio": None, "median": t0, "q1": t0, "q3": t0})
    return _csv(rows)


def test_fig10_baselines_are_lines_at_the_median_over_the_jobs(drawn, tmp_path):
    """TT without cache timed at 1, 2 and 9 ms in three jobs: its line at 2 ms; nn.EmbeddingBag at 0.5."""
    cache_figures.plot_cache_size_warmup(_fig10_rows(fractions=(0.01, 0.1, 1.0)), tmp_path)
    bottom_left = drawn["fig10_cache_size_warmup"].axes[2]
    lines = _lines(bottom_left)
    np.testing.assert_allclose(lines["TT, no cache"].get_ydata(), [2.0, 2.0])
    np.testing.assert_allclose(lines["nn.EmbeddingBag"].get_ydata(), [0.5, 0.5])


def test_two_cache_sizes_are_enough_for_figure_10(drawn, tmp_path):
    """A sweep over two cache sizes (one warm-up) is a Figure 10 sweep; its x axis in % of the rows."""
    paths = cache_figures.plot_cache_figures(_fig10_rows(fractions=(0.01, 0.1)), tmp_path)
    assert [p.name for p in paths] == ["fig10_cache_size_warmup.png"]
    x, y, _, _ = _errorbars(drawn["fig10_cache_size_warmup"].axes[2])["warm-up 64"]
    np.testing.assert_allclose(x, [1.0, 10.0])
    np.testing.assert_allclose(y, [10.0, 11.0])


# ---- reports.training_figures ----

def test_table1_error_bars_are_one_binomial_standard_error_and_paper_bars_match_their_inits(drawn, tmp_path):
    """p = 0.78 on 10,000 held-out samples: SE = 100 sqrt(0.78 x 0.22 / 10,000) = 0.414 points; the
    paper panel shows Table 1's values of the inits this run has (N(0, 1): 78.123, N(0, 1/3n): 79.256)."""
    df = _csv([{**TRAINING, "model": "main", "metric": "accuracy", "dense_init": init, "eval_samples": 10_000,
                "median": 78.0} for init in ("gauss_1", "gauss_1_3n")])
    training_figures.plot_table1(df, tmp_path)
    ax, bx = drawn["table1_dense_init_accuracy"].axes
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    lo, hi = np.array([[seg[0][1], seg[1][1]] for seg in bars.lines[2][0].get_segments()]).T
    y = np.array([p.get_height() for p in ax.patches])
    np.testing.assert_allclose(y, [78.0, 78.0])
    np.testing.assert_allclose(hi - y, [0.41425] * 2, atol=1e-4)
    np.testing.assert_allclose(y - lo, [0.41425] * 2, atol=1e-4)
    assert [t.get_text() for t in bx.get_xticklabels()] == ["N(0, 1)", "N(0, 1/3n)"]
    assert [p.get_height() for p in bx.patches] == [78.123, 79.256]


def test_fig6_lines_start_at_the_uncompressed_model_at_zero_tables(drawn, tmp_path):
    acc = {0: 77.0, 3: 76.5, 7: 76.0}
    df = _csv([{**TRAINING, "model": "main", "metric": "accuracy", "tt_tables": t, "tt_rank": None if t == 0 else 8,
                "tt_init": None if t == 0 else "normal", "eval_samples": 64_000, "median": a} for t, a in acc.items()])
    training_figures.plot_fig6(df, tmp_path)
    line = _lines(drawn["fig6_accuracy"].axes[0])["R=8, normal"]
    assert list(line.get_xdata()) == [0, 3, 7] and list(line.get_ydata()) == [77.0, 76.5, 76.0]


def _fig7_rows() -> pd.DataFrame:
    """Rank 8 at 1 and 3 TT tables, rank 32 at 3 only. Per job: uncompressed 100 ms (embeddings 20),
    TT 150 ms (embeddings 80)."""
    rows = []
    for job, (tables, rank, ratio) in enumerate(((1, 8, 1.2), (3, 8, 1.5), (3, 32, 1.8))):
        point = {**TRAINING, "job_dir": str(job), "tt_tables": tables, "tt_rank": rank}
        rows.append({**point, "model": "main", "metric": "time_vs_reference", "median": ratio, "q1": ratio - 0.1,
                     "q3": ratio + 0.1})
        for model, total, emb in (("main", 150.0, 80.0), ("uncompressed", 100.0, 20.0)):
            rows.append({**point, "model": model, "metric": "time_per_iteration", "median": total})
            rows.append({**point, "model": model, "metric": "embedding_time", "median": emb})
    return _csv(rows)


def test_fig7_bars_sit_at_their_table_count_and_time_split_ends_at_the_total(drawn, tmp_path):
    """(a) rank 32, timed at 3 tables only, has no bar at 1 table; (b) each model's embedding part
    (0.2 uncompressed, 0.8 TT) and the rest end at its total over the uncompressed total (1.0, 1.5)."""
    training_figures.plot_fig7(_fig7_rows(), tmp_path)
    ax, bx = drawn["fig7_training_time"].axes[:2]
    rank32 = next(c for c in ax.containers if c.get_label() == "rank 32")
    heights = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in rank32.patches}
    assert heights[1] == pytest.approx(1.8) and not np.isfinite(heights.get(0, np.nan))
    emb, rest = bx.containers[:2]
    labels = [t.get_text() for t in bx.get_yticklabels()]
    ends = {label: (e.get_width(), r.get_x() + r.get_width()) for label, e, r in zip(labels, emb.patches, rest.patches)}
    assert ends["uncompressed"] == pytest.approx((0.2, 1.0))
    for label in ("1 TT, R=8", "3 TT, R=8", "3 TT, R=32"):
        assert ends[label] == pytest.approx((0.8, 1.5))


# ---- benches.callbacks ----

def _config(root: Path, task=None) -> object:
    return OmegaConf.create({"task": task, "figures_dir": str(root / "figs"),
                             "hydra": {"runtime": {"choices": {"experiment": None}}, "run": {"dir": str(root)},
                                       "sweep": {"dir": str(root)}}})


def _timed_jobs(root: Path, ranks=(8, 16)) -> list[str]:
    for job, rank in enumerate(ranks):
        write_rows([{"impl": "tt", "tt_rank": rank, "mode": mode, "metric": "time_per_lookup", "median": 1.0}
                    for mode in ("forward", "train")], root / str(job) / "results.csv")
    return [str(j) for j in range(len(ranks))]


def test_a_sweep_over_two_ranks_draws_one_time_vs_rank_figure_per_mode(tmp_path, monkeypatch):
    """Two ranks are a rank sweep; the train figure does not take (and overwrite) the forward one's name."""
    calls = []
    monkeypatch.setattr(callbacks, "plot_rank_sweep",
                        lambda df, out, name, mode: calls.append((name, mode, len(df))) or Path(out) / f"{name}.png")
    jobs = _timed_jobs(tmp_path)
    callbacks.AggregateResults()._finish(str(tmp_path), _config(tmp_path), jobs)
    assert calls == [("time_vs_rank", "forward", 4), ("time_vs_rank_train", "train", 4)]
    assert len(pd.read_csv(tmp_path / AGGREGATE_FILE)) == 4


def test_a_training_run_is_not_aggregated_again_by_the_callback(tmp_path):
    """experiment=training (like paper) aggregated its experiments itself: no results_all.csv at the root."""
    jobs = _timed_jobs(tmp_path)
    for task in ("training", "paper"):
        callbacks.AggregateResults()._finish(str(tmp_path), _config(tmp_path, task=task), jobs)
        assert not (tmp_path / AGGREGATE_FILE).exists()


def test_a_sweep_reports_only_failures_written_since_it_started(tmp_path):
    """A failed.txt left by an earlier sweep is not this sweep's failure (exit 0); a new one is (exit 1)."""
    cb = callbacks.AggregateResults()
    cb.start = time.time()
    old = tmp_path / "0" / FAILED_FILE
    old.parent.mkdir()
    old.write_text("RuntimeError: earlier\n")
    os.utime(old, (cb.start - 3600, cb.start - 3600))
    cb.on_multirun_end(_config(tmp_path, task="paper"))  # nothing raised
    new = tmp_path / "1" / FAILED_FILE
    new.parent.mkdir()
    new.write_text("RuntimeError: now\n")
    with pytest.raises(SystemExit) as exc:
        cb.on_multirun_end(_config(tmp_path, task="paper"))
    assert exc.value.code == 1

