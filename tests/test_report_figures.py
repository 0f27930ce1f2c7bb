"""The report's figures (reports.figures, reports.paper_figures, reports.cache_figures) drawn from the
committed reference run (reports/results): every colour explained, value labels inside their panels,
byte axes in byte units, and files byte-identical when redrawn from the same table."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from reports.cache_figures import plot_cache_size_warmup, plot_hit_rate_sweep, plot_topk_stability
from reports.paper_figures import plot_rows_sweep, plot_tt_shapes

RESULTS = Path(__file__).resolve().parents[1] / "reports" / "results"


def _results(name: str) -> pd.DataFrame:
    return pd.read_csv(RESULTS / f"{name}.csv")


def test_fig10_every_panel_has_its_colours_in_a_legend_over_its_column(drawn, tmp_path):
    plot_cache_size_warmup(_results("fig10"), tmp_path)
    fig = drawn["fig10_cache_size_warmup"]
    top, bottom = fig.axes[:2], fig.axes[2:]
    assert all(ax.get_legend() is None for ax in bottom)  # one legend per column, over it
    for ax_top, ax_bottom in zip(top, bottom):
        entries = {t.get_text() for t in ax_top.get_legend().get_texts()}
        for ax in (ax_top, ax_bottom):
            assert set(ax.get_legend_handles_labels()[1]) <= entries
    assert "warm-up 1" in {t.get_text() for t in top[0].get_legend().get_texts()}
    assert "cache 0.01%" in {t.get_text() for t in top[1].get_legend().get_texts()}


def test_table2_value_labels_stay_inside_their_panels_clear_of_the_legend(drawn, tmp_path):
    plot_tt_shapes(_results("table2"), tmp_path)
    fig = drawn["table2_tt_shapes"]
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        frame = ax.get_window_extent()
        labels = [t.get_window_extent() for t in ax.texts]
        assert len(labels) == 21  # 7 tables x 3 ranks
        assert all(frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in labels)
        assert not legend.overlaps(frame)


def test_fig9_dashed_bounded_lines_are_drawn_over_wider_exact_ones(drawn, tmp_path):
    plot_topk_stability(_results("fig9"), tmp_path)
    middle = drawn["fig9_topk_stability"].axes[1]
    lines = [line for line in middle.get_lines() if len(line.get_xdata())]
    exact = {line.get_color(): line for line in lines if line.get_linestyle() == "-"}
    bounded = [line for line in lines if line.get_linestyle() == "--"]
    assert bounded and len(bounded) == len(exact)
    for line in bounded:
        under = exact[line.get_color()]
        assert line.get_linewidth() < under.get_linewidth() and lines.index(line) > lines.index(under)


def test_fig8_memory_axis_ticks_in_decimal_byte_units(drawn, tmp_path):
    plot_rows_sweep(_results("fig8"), tmp_path)
    memory = drawn["fig8_memory_time_vs_rows"].axes[1]
    labels = [t.get_text() for t in memory.get_yticklabels(which="both") if t.get_text()]
    assert labels and all(re.fullmatch(r"\d+(\.\d+)? (B|kB|MB|GB|TB)", label) for label in labels), labels
    assert "decimal kB/MB/GB" in memory.get_ylabel()


def test_redrawn_figures_are_byte_identical(tmp_path):
    df = _results("fig8")
    first, again = plot_rows_sweep(df, tmp_path / "a"), plot_rows_sweep(df, tmp_path / "b")
    for suffix in (".png", ".pdf"):
        assert first.with_suffix(suffix).read_bytes() == again.with_suffix(suffix).read_bytes(), suffix


def _drawn_points(ax) -> np.ndarray:
    """Display coordinates of every drawn line and error bar, 20 points along each segment."""
    segments = []
    for line in ax.get_lines():
        xy = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
        segments += list(zip(xy[:-1], xy[1:])) or [(xy[0], xy[0])] if len(xy) else []
    for collection in ax.collections:
        for seg in collection.get_segments():
            xy = ax.transData.transform(np.asarray(seg, dtype=float))
            segments += list(zip(xy[:-1], xy[1:]))
    t = np.linspace(0, 1, 20)[:, None]
    return np.concatenate([a + t * (b - a) for a, b in segments])


def test_fig12_break_even_text_hides_no_data(drawn, tmp_path):
    plot_hit_rate_sweep(_results("fig12"), tmp_path)
    for ax in drawn["fig12_time_vs_hit_rate"].axes:
        (text,) = ax.texts
        box = text.get_bbox_patch().get_window_extent()
        points = _drawn_points(ax)
        inside = (points[:, 0] >= box.x0) & (points[:, 0] <= box.x1) & (points[:, 1] >= box.y0) & (points[:, 1] <= box.y1)
        assert not inside.any(), (ax.get_title(), points[inside][:3])


def test_fig10_cache_gain_is_the_median_over_all_points():
    from reports.claims import claims

    out = claims({"fig10_training": _results("fig10_training")})
    row = out[out["claim"].str.contains("the cache adds") & ~out["measured"].str.startswith("not run")].iloc[0]
    gain = _results("fig10_training").query("metric == 'accuracy_vs_reference' and model == 'main'")["median"]
    assert row["measured"].startswith(f"{gain.median():+.3f} points (median over all {len(gain)} points; median by size")


def test_machine_label_lists_every_cpu_and_thread_count():
    """Figure titles name the machine of all their rows, not the first row's (pooled runs say so)."""
    from reports.figures import _machine

    one = pd.DataFrame({"cpu_model": ["AMD EPYC"] * 2, "threads": [2.0, 2.0]})
    assert _machine(one) == "AMD EPYC, 2 threads"
    pooled = pd.DataFrame({"cpu_model": ["AMD EPYC", "Intel Xeon"], "threads": [2, 1]})
    assert _machine(pooled) == "AMD EPYC, Intel Xeon, 2, 1 threads"
    assert _machine(pd.DataFrame({"x": [1]})) == "unknown CPU"


def test_a_figure_of_busy_machine_rows_says_so_in_its_title(tmp_path, monkeypatch):
    """Points timed while their threads waited for a CPU (35-40x inflated in one first-use run) were
    drawn like any other: the title now counts them, for the notes CpuWait writes."""
    from benches.environment import CpuWait
    from reports.figures import _machine, busy, plot_rank_sweep

    wait = CpuWait()
    wait.threads, wait.waited_s, wait.torch_threads = 1.5, 1.0, 1
    noted = wait.note()
    wait.torch_threads = 64
    over = wait.note()
    rows = pd.DataFrame({"cpu_model": ["AMD EPYC"] * 4, "threads": [2] * 4, "note": [noted, over, None, "other"]})
    assert busy(rows).tolist() == [True, True, False, False]
    assert _machine(rows) == ("AMD EPYC, 2 threads\nBUSY MACHINE: 2 of 4 rows timed while their threads waited for a "
                              "CPU (times inflated; see their note)")
    assert _machine(rows.iloc[2:]) == "AMD EPYC, 2 threads"
    titles = []
    monkeypatch.setattr("reports.figures.save", lambda fig, out, name: titles.append(fig._suptitle.get_text()))
    sweep = pd.DataFrame({"metric": "time_per_lookup", "mode": "forward", "impl": "tt", "backend": "cpu",
                          "tt_rank": [8, 16], "pooling_factor": 1, "median": [1.0, 2.0], "q1": 1.0, "q3": 2.0,
                          "table": "t", "num_embeddings": 10, "embedding_dim": 4, "batch_size": 8,
                          "cpu_model": "AMD EPYC", "threads": 2, "note": [noted, None]})
    plot_rank_sweep(sweep, tmp_path)
    assert titles and "BUSY MACHINE: 1 of 2 rows" in titles[0]


def test_an_implementation_keeps_its_colour_across_figures():
    """nn.EmbeddingBag was green in a sweep's forward figure and orange in its training figure (the
    colours went by the sorted labels present): each implementation now has its own, and a second
    series of one implementation (another backend) another colour."""
    from reports.figures import _impl_palette

    fwd = pd.DataFrame({"impl": ["tt", "t3nsor", "dense"],
                        "implementation": ["TT-EmbeddingBag (cpu)", "T3nsor-style (decompress)", "nn.EmbeddingBag"]})
    train = pd.DataFrame({"impl": ["tt", "dense"], "implementation": ["TT-EmbeddingBag (cpu), fused update",
                                                                      "nn.EmbeddingBag"]})
    a, b = _impl_palette(fwd), _impl_palette(train)
    assert a["nn.EmbeddingBag"] == b["nn.EmbeddingBag"]
    assert a["TT-EmbeddingBag (cpu)"] == b["TT-EmbeddingBag (cpu), fused update"]
    two = _impl_palette(pd.DataFrame({"impl": ["tt", "tt", "dense"], "implementation": [
        "TT-EmbeddingBag (cpu)", "TT-EmbeddingBag (torch)", "nn.EmbeddingBag"]}))
    assert len(set(two.values())) == 3 and two["nn.EmbeddingBag"] == a["nn.EmbeddingBag"]
