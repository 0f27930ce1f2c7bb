"""Review of the paper report (reports.report, reports.claims, reports.paper_figures): a partial or
incomplete table is stated in the report, never fatal to it nor a claim silently left out."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from benches.analytic import model_size_rows, tt_shapes_rows
from benches.config import BenchConfig
from reports.claims import FIG5_REDUCTION, TABLE2, claims
from reports.paper_figures import plot_model_size
from reports.report import build

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "reports" / "results"
NOT_MEASURED = "not measured"


def _committed(name: str) -> pd.DataFrame:
    return pd.read_csv(COMMITTED / f"{name}.csv")


def _table2(ranks: list[int]) -> pd.DataFrame:
    cfg = BenchConfig()
    cfg.analysis.ranks = ranks
    return pd.DataFrame(tt_shapes_rows(cfg))


def _fig5(rank: int, datasets: list[str] | None = None) -> list[dict]:
    cfg = BenchConfig()
    cfg.tt.rank = rank
    if datasets is not None:
        cfg.analysis.datasets = datasets
    return model_size_rows(cfg)


def test_a_table_its_claims_cannot_use_is_stated_and_the_other_experiments_still_reported(tmp_path):
    """fig12 with its nn.EmbeddingBag jobs lost (a sweep some of whose jobs failed): its claims cannot be
    checked; the report says so in its section and still holds Table 2's claims."""
    results = tmp_path / "results"
    results.mkdir()
    _committed("table2").to_csv(results / "table2.csv", index=False)
    fig12 = _committed("fig12")
    fig12[fig12["impl"] != "dense"].to_csv(results / "fig12.csv", index=False)
    report = build(results, tmp_path / "out").read_text()
    assert "Claims not checked (the table lacks what they need; see the section): fig12." in report
    section = report[report.index("## Figure 12"):]
    assert "Claims not checked: results['fig12']: no TT + cache points with an nn.EmbeddingBag" in section
    table2_rows = [line for line in report.splitlines() if line.startswith("| Table 2 | Table 2: ")]
    assert len(table2_rows) == 3 * len(TABLE2) and all(line.endswith("| yes |") for line in table2_rows)


def test_the_scale_line_names_every_scale_of_the_tables(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _committed("table2").assign(scale="default").to_csv(results / "table2.csv", index=False)
    _committed("fig5").assign(scale="smoke").to_csv(results / "fig5.csv", index=False)
    report = build(results, tmp_path / "out").read_text()
    assert "(scale: default, smoke)" in report


@pytest.mark.parametrize("ranks", [[32], [16, 64]])
def test_table2_ranks_not_computed_are_stated_not_left_out(ranks):
    out = claims({"table2": _table2(ranks)})
    table2 = out[out["artifact"] == "Table 2"]
    assert len(table2) == 3 * len(TABLE2)  # every cell of the paper's table has its row
    for rank in (16, 32, 64):
        rows = table2[table2["claim"].str.contains(f"R = {rank}:", regex=False)]
        assert len(rows) == len(TABLE2)
        if rank in ranks:
            assert (rows["agrees"] == "yes").all()
        else:
            assert (rows["measured"] == NOT_MEASURED).all() and rows["agrees"].isna().all()
            assert rows["note"].str.contains(f"at rank {rank} in this run's table").all()
    section61 = out[out["artifact"] == "Section 6.1"]
    assert len(section61) == 2
    if 32 in ranks:  # 327x the largest, 181x the average (the paper's Table 2 column R = 32)
        assert section61["agrees"].tolist() == ["yes", "yes"]
    else:
        assert (section61["measured"] == NOT_MEASURED).all() and section61["agrees"].isna().all()


def test_fig5_datasets_not_computed_are_stated_not_left_out():
    out = claims({"fig5": pd.DataFrame(_fig5(32, ["kaggle"]))})
    terabyte = out[out["claim"].str.contains("terabyte")]
    # Figure 5 (3, 5, 7 tables), the 12.57 GB -> 0.11 GB headline, the 99% share, 6.3's 3 -> 7 tables
    assert len(terabyte) == 6
    assert (terabyte["measured"] == NOT_MEASURED).all() and terabyte["agrees"].isna().all()
    assert terabyte["note"].str.contains("terabyte with").all()
    kaggle = out[out["artifact"].eq("Figure 5") & out["claim"].str.contains("kaggle")]
    assert kaggle["agrees"].tolist() == ["yes"] * 3


def test_fig5_claims_use_the_papers_rank_when_the_table_has_several():
    """Rank 16 rows before rank 32 ones: the claims at rank 32 are compared (the paper's 117x, 95.5x, ...),
    not left uncompared as 'computed at rank 16'."""
    out = claims({"fig5": pd.DataFrame(_fig5(16) + _fig5(32))})
    fig5 = out[out["artifact"] == "Figure 5"]
    assert fig5["agrees"].tolist() == ["yes"] * len(FIG5_REDUCTION)
    assert fig5["measured"].iloc[0].startswith("117x")
    assert not out["note"].str.contains("computed at rank 16").any()


def test_fig5_figure_refuses_several_ranks(tmp_path):
    df = pd.DataFrame(_fig5(16) + _fig5(32))
    with pytest.raises(ValueError, match=r"Figure 5 draws one TT rank; got tt_rank \[16, 32\]"):
        plot_model_size(df, tmp_path)
    assert plot_model_size(pd.DataFrame(_fig5(32)), tmp_path).exists()


def test_fig8_without_t3nsor_states_its_claims_not_measured():
    fig8 = _committed("fig8")
    out = claims({"fig8": fig8[fig8["impl"] != "t3nsor"]})
    assert len(out) == 3
    assert (out["measured"] == NOT_MEASURED).all() and out["agrees"].isna().all()
    assert out["note"].str.contains("no T3nsor-style time_per_lookup rows").all()
    assert out["claim"].str.contains("direction only").any() and out["claim"].str.contains("#EmbRows").any()


def test_fig11_with_one_pooling_factor_states_its_claims_not_measured():
    fig11 = _committed("fig11")
    one = fig11[fig11["pooling_factor"] == 10]
    series = 1 + one.loc[one["impl"] == "tt", "tt_rank"].nunique()  # nn.EmbeddingBag + a TT series per rank
    out = claims({"fig11": one})
    assert len(out) == series + (series - 1)  # "falls with P" per series, "the gap grows" per TT series
    assert (out["measured"] == NOT_MEASURED).all() and out["agrees"].isna().all()
    assert out["note"].str.contains("pooling factors 10; a trend needs two or more").all()
    dense_only = claims({"fig11": fig11[fig11["impl"] == "dense"]})
    gap = dense_only[dense_only["claim"].str.contains("gap")]
    assert len(gap) == 1 and gap["measured"].item() == NOT_MEASURED


def test_a_smoke_scale_or_busy_run_is_flagged_before_its_numbers(tmp_path):
    """The report warns above its tables when any table is of the smoke scale, and names the tables
    whose timed points carry the busy-machine note, with the largest other load; the committed
    default-scale tables get neither warning."""
    results = tmp_path / "results"
    results.mkdir()
    _committed("table2").assign(scale="default").to_csv(results / "table2.csv", index=False)
    fig11 = _committed("fig11").assign(scale="default", note=None, cpu_wait=0.01)
    fig11.to_csv(results / "fig11.csv", index=False)
    quiet = build(results, tmp_path / "out").read_text()
    assert "**Smoke scale.**" not in quiet and "**Busy machine.**" not in quiet
    fig11.loc[fig11.index[:2], ["note", "cpu_wait"]] = ["busy machine: this process's threads waited", 1.1]
    fig11.to_csv(results / "fig11.csv", index=False)
    _committed("fig5").assign(scale="smoke").to_csv(results / "fig5.csv", index=False)
    report = build(results, tmp_path / "out").read_text()
    head = report[:report.index("## Machine and versions")]
    assert "**Smoke scale.**" in head
    assert "**Busy machine.** Timed points of fig11 ran while their threads waited for a CPU (up to 1.10 threads waiting)" in head


def test_report_says_when_one_setting_timed_by_two_experiments_reads_far_apart():
    """The committed run timed nn.EmbeddingBag's 100,000 x 16 training step at batch 4,096 in fig8 (186 ns a
    lookup) and fig11 (93.8 ns): the caveat names it with both medians and their ratio. A setting within 1.5x
    across experiments, or timed by one experiment only, is not named."""
    from reports.report import _repeats_apart

    base = {"metric": "time_per_lookup", "unit": "ns", "impl": "dense", "mode": "train", "num_embeddings": 100000,
            "embedding_dim": 16, "batch_size": 4096, "pooling_factor": 1, "distribution": "uniform"}
    results = {"fig8": pd.DataFrame([{**base, "median": 186.4}, {**base, "batch_size": 512, "median": 50.0}]).astype(
                   {"batch_size": float, "num_embeddings": float}),  # (another table's column read back as floats)
               "fig11": pd.DataFrame([{**base, "median": 93.8}, {**base, "pooling_factor": 10, "median": 40.0}]),
               "fig12": pd.DataFrame([{**base, "batch_size": 512, "median": 60.0}])}
    (line, blank) = _repeats_apart(results)
    assert "1 setting(s)" in line and "(time per lookup, ns)" in line
    assert "dense, train, 100,000 x 16, batch 4,096, pooling 1, uniform: fig8 186, fig11 93.8 (1.99x)" in line
    assert "batch 512" not in line and "pooling 10" not in line and blank == ""
    assert _repeats_apart({"fig8": results["fig8"]}) == []


def test_the_committed_report_tests_the_order_of_magnitude_claim_against_figure_8():
    """Section 6.4's "order-of-magnitude more efficient than ... T3nsor" (compute and memory) has a row: the
    committed fig8 run's time and memory ratios, each at least 10x for a yes."""
    from reports.claims import fig8_claims

    df = pd.read_csv(Path(__file__).resolve().parent.parent / "reports" / "results" / "fig8.csv")
    (row,) = [c for c in fig8_claims(df) if c["claim"].startswith("6.4: \"order-of-magnitude")]
    time, memory = (float(x) for x in re.findall(r"(?:time|memory) ([0-9.]+)x", row["measured"]))
    assert row["agrees"] == ("yes" if min(time, memory) >= 10 else "partly" if max(time, memory) >= 10 else "no")
    direction = [c for c in fig8_claims(df) if c["claim"].startswith("6.4: TT-EmbeddingBag is faster")][0]
    assert f"{time:g}x" in direction["measured"] or f"{time}x" in direction["measured"]
