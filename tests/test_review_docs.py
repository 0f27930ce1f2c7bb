"""The README against the tree: config groups and options, presets, file paths, and the numbers it
cites from committed files (reports/REPORT.md, reports/cpu_kernel/report_*.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
KERNEL_REPORTS = ROOT / "reports" / "cpu_kernel"


def _config_table() -> dict[str, list[str]]:
    """The README's Configuration table: group -> the options named in its 'options' cell."""
    section = README.split("## Configuration", 1)[1]
    table = section[section.index("| group |"):].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rows[cells[0].strip("`")] = re.findall(r"`([^`]+)`", cells[1])
    return rows


def test_config_table_names_every_group_and_option_under_conf():
    """Every option the README names exists under conf/, and every conf/ option is named."""
    table = _config_table()
    builtin = {"hydra/launcher": {"basic"}}  # Hydra's own launcher, no file of ours
    for group, options in table.items():
        on_disk = {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
        assert set(options) - builtin.get(group, set()) == on_disk, group
    groups = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*") if p.is_dir()}
    assert groups - {"hydra"} == set(table)


def test_every_experiment_the_readme_runs_exists():
    named = set(re.findall(r"experiment=([a-z0-9_]+)", README))
    presets = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert named and named <= presets, named - presets


def test_every_repository_path_the_readme_names_exists():
    paths = set(re.findall(r"`((?:benches|conf|impl|reports|tests|\.ci)/[^`<*|]*?)`", README))
    assert len(paths) > 10
    missing = sorted(p for p in paths if not (ROOT / p).exists() and not p.startswith("reports/figures/latest"))
    assert not missing


def test_reference_run_wall_time_is_the_reports():
    """The Quick start's minutes are those of REPORT.md's wall-time table (kernel-level + training)."""
    report = (ROOT / "reports" / "REPORT.md").read_text()
    total = float(re.search(r"Total: ([0-9.]+) minutes", report).group(1))
    rows = re.findall(r"^\| (\w+) \| default \| ([0-9.]+) \| ok \|$", report, re.M)
    training = {"table1", "fig7", "fig6", "fig10_training"}
    paper = sum(float(s) for e, s in rows if e not in training) / 60
    train = sum(float(s) for e, s in rows if e in training) / 60
    m = re.search(r"experiments' wall time ([0-9.]+) min: ([0-9.]+) \+ ([0-9.]+)", README)
    assert m, "the Quick start cites the reference run's wall time from REPORT.md"
    assert float(m.group(1)) == total
    assert (float(m.group(2)), float(m.group(3))) == (round(paper, 1), round(train, 1))


def _kernel_report(run: str) -> str:
    return (KERNEL_REPORTS / f"report_{run}.md").read_text()


def _fastest_fused(run: str) -> float:
    return float(re.search(r"fastest rounds: native fused SGD: \*\*([0-9.]+)x", _kernel_report(run)).group(1))


def _interleaved_fused(run: str) -> float:
    return float(re.search(r"native fused SGD: \*\*([0-9.]+)x\*\* \[", _kernel_report(run)).group(1))


def _runs(day: str, letters: str) -> list[str]:
    a, b = letters.split("-")
    return [f"{day}{chr(c)}" for c in range(ord(a), ord(b) + 1)]


def test_intel_fastest_round_ranges_cover_every_intel_run():
    """The status table's Intel row: its two ranges of fastest-round ratios hold every run's."""
    row = next(line for line in README.splitlines() if line.startswith("| Intel Xeon VM"))
    m = re.search(r"fastest rounds \*\*([0-9.]+)-([0-9.]+)x\*\* there, ([0-9.]+)-([0-9.]+)x in slower states", row)
    fast_lo, fast_hi, slow_lo, slow_hi = map(float, m.groups())
    runs = _runs("2026-12-02", "o-q") + _runs("2026-12-03", "a-h")
    values = [_fastest_fused(r) for r in runs]
    slow = [v for v in values if v > fast_hi]
    assert min(values) == fast_lo
    assert (min(slow), max(slow)) == (slow_lo, slow_hi)


def test_zen4_runs_below_embeddingbag_are_all_named():
    """'Not met ... on the Zen 4 VM in runs ...' (the run-by-run account, moved from the README to the
    reference runs' README): every 2026-12-04 Zen 4 run whose interleaved training ratio is below 1 is
    named there, with its ratio."""
    account = (KERNEL_REPORTS / "README.md").read_text()
    m = re.search(r"Zen 4 VM in runs ([a-z, ]+?) \(([0-9.x, and]+) interleaved", account.replace("\n", " "))
    named = re.findall(r"\b([a-z])\b", m.group(1).replace("and", ","))
    ratios = [float(x) for x in re.findall(r"([0-9.]+)x", m.group(2))]
    runs = _runs("2026-12-04", "a-o") + ["2026-12-05a"]
    below = {r[-1]: _interleaved_fused(r) for r in runs if _interleaved_fused(r) < 1}
    assert set(named) == set(below)
    assert dict(zip(named, ratios)) == pytest.approx(below)


def _interleaved_share(run: str) -> int:
    return int(re.search(r"useful FLOPs = \*\*([0-9]+)%\*\*", _kernel_report(run)).group(1))


def test_zen4_sgemm_share_count_matches_the_runs():
    """'Met on the Zen 4 VM in N of its M runs (60-72%; X% in run a, ...)': M is every Zen 4 run, N those
    at 60% or more (interleaved), the range is theirs and each run below is named with its share."""
    text = README.replace("\n", " ")
    m = re.search(r"Met on the Zen 4 VM in ([0-9]+) of its ([0-9]+) runs \(([0-9]+)-([0-9]+)%; ([^)]*)\)", text)
    runs = _runs("2026-12-04", "a-o") + _runs("2026-12-05", "a-c") + _runs("2026-12-06", "l-n") + _runs("2026-12-07", "a-l")
    shares = {r: _interleaved_share(r) for r in runs}
    met = [s for s in shares.values() if s >= 60]
    assert (int(m.group(1)), int(m.group(2))) == (len(met), len(runs))
    assert (int(m.group(3)), int(m.group(4))) == (min(met), max(met))
    # "run d" is 2026-12-04's; a run of another day is named with its date ("run 2026-12-06m")
    named = {f"{day or '2026-12-04'}{run}": int(share)
             for share, day, run in re.findall(r"([0-9]+)%\s+in\s+run\s+(2026-12-[0-9]{2})?([a-z])\b", m.group(5))}
    assert named == {r: s for r, s in shares.items() if s < 60}


def test_zen4_row_interleaved_range_is_the_runs():
    """The Status table's Zen 4 row gives the useful-FLOPs share as "**lo-hi%**": the lowest and highest
    interleaved share over the runs the row names (the same runs as the count above)."""
    row = next(line for line in README.splitlines() if line.startswith("| Zen 4 VM"))
    lo, hi = map(int, re.search(r"\| \*\*([0-9]+)-([0-9]+)%\*\* \(", row).groups())
    runs = _runs("2026-12-04", "a-o") + _runs("2026-12-05", "a-c") + _runs("2026-12-06", "l-n") + _runs("2026-12-07", "a-l")
    shares = [_interleaved_share(r) for r in runs]
    assert (lo, hi) == (min(shares), max(shares))


def test_hard_bound_of_the_training_step_is_run_js():
    """'takes T ms at the cores' FMA peak (P GFLOP/s ..., timed in run 2026-12-07j's rounds; its sgemm ran at
    S% of it): no kernel doing it can pass Ax nn.EmbeddingBag's ... (D ms, run i ...), Bx its fastest round
    in run j (F ms)': P, S and T as run j's report gives them, A = D / T and B = F / T, D run i's near
    round median of nn.EmbeddingBag's step and F run j's fastest round."""
    text = README.replace("\n", " ")
    m = re.search(r"takes ([0-9.]+) ms at the cores' FMA peak \(([0-9.]+) GFLOP/s on 2 threads, timed in run "
                  r"2026-12-07j's rounds; its sgemm ran at ([0-9]+)% of it\): no kernel doing it can pass ([0-9.]+)x "
                  r"nn.EmbeddingBag's fastest near round median on this VM \(([0-9.]+) ms, run i; at run j's peak\), "
                  r"([0-9.]+)x its fastest round in run j \(([0-9.]+) ms\)", text)
    assert m, "the bound's sentence"
    t, peak, share, a, d, b, f = (float(x) for x in m.groups())
    j = _kernel_report("2026-12-07j")
    assert peak == float(re.search(r"fma_peak\): \*\*([0-9.]+) GFLOP/s\*\*", j).group(1))
    assert share == float(re.search(r"the sgemm ran at \*\*([0-9]+)%\*\*", j).group(1))
    assert t == float(re.search(r"At the cores' FMA peak \([0-9.]+ GFLOP/s, in the forward's rounds\) that arithmetic "
                                r"alone takes \*\*([0-9.]+) ms\*\*", j).group(1))
    i = _kernel_report("2026-12-07i")
    assert d == float(re.search(r"near \([0-9]+ rounds\): fused SGD \*\*[0-9.]+x\*\* \[[^]]*\] \(steps [0-9.]+ against "
                                r"([0-9.]+) ms\)", i).group(1))
    assert f == float(re.search(r"nn.EmbeddingBag sparse \+ SGD ([0-9.]+) ms;", j).group(1))
    # B as run j's report gives it (from unrounded times); A from the rounded times, within their rounding
    assert b == float(re.search(r"no kernel doing it can pass \*\*[0-9.]+x\*\* and \*\*([0-9.]+)x\*\* replayed", j).group(1))
    assert b == pytest.approx(f / t, abs=0.011) and a == pytest.approx(d / t, abs=0.011)


def _by_state(run: str) -> dict[str, tuple[int, float, float | None]]:
    """A run's 'Training step vs nn.EmbeddingBag by the vCPUs' state' line: per state ("near", "far") its
    number of rounds, the fused step's ratio replaying one batch, and on the stream (None before run
    2026-12-07c, or without rounds in that state)."""
    line = re.search(r"Training step vs nn.EmbeddingBag by the vCPUs' state, (.*)", _kernel_report(run)).group(1)
    out = {}
    for state in ("near", "far"):
        part = re.search(state + r" \(([0-9]+) rounds\): ([^;]*)", line)
        replay = re.search(r"fused SGD \*\*([0-9.]+)x\*\*", part.group(2))
        stream = re.search(r"on the stream \*\*([0-9.]+)x\*\*", part.group(2))
        out[state] = (int(part.group(1)), float(replay.group(1)) if replay else None,
                      float(stream.group(1)) if stream else None)
    return out


def _range(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def test_zen4_row_training_ranges_are_the_runs():
    """The Status table's Zen 4 training cell: far and near ranges, replayed and on the stream, over the runs
    since 2026-12-06l with 3 or more rounds in that state, and the latest run's four ratios; the bullet's
    counts of near runs inside and outside its ranges."""
    row = next(line for line in README.splitlines() if line.startswith("| Zen 4 VM"))
    runs = _runs("2026-12-06", "l-n") + _runs("2026-12-07", "a-l")
    states = {r: _by_state(r) for r in runs}

    def values(state: str, which: int) -> list[float]:
        return [s[state][which] for s in states.values() if s[state][0] >= 3 and s[state][which] is not None]

    m = re.search(r"vCPUs far \*\*([0-9.]+)-([0-9.]+)x\*\* \(on the stream ([0-9.]+)-([0-9.]+)x\); near "
                  r"\*\*([0-9.]+)-([0-9.]+)x\*\* replaying one batch, \*\*([0-9.]+)-([0-9.]+)x\*\* on a stream", row)
    got = [float(x) for x in m.groups()]
    assert got == [*_range(values("far", 1)), *_range(values("far", 2)), *_range(values("near", 1)),
                   *_range(values("near", 2))]
    m = re.search(r"latest run \(2026-12-07l\): near \*\*([0-9.]+)x\*\* replayed and \*\*([0-9.]+)x\*\* on the "
                  r"stream, far ([0-9.]+)x and ([0-9.]+)x", row)
    j = states["2026-12-07l"]
    assert [float(x) for x in m.groups()] == [j["near"][1], j["near"][2], j["far"][1], j["far"][2]]
    text = re.sub(r"\s+", " ", README)
    m = re.search(r"reached ([0-9.]+)-([0-9.]+)x in the near rounds of (\w+) of the (\w+) runs since 2026-12-06l that "
                  r"had three or more \(([0-9.]+)-([0-9.]+)x in the other (\w+)\)", text)
    words = {"two": 2, "three": 3, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
    near = values("near", 1)
    inside = [v for v in near if v < 1]
    assert (float(m.group(1)), float(m.group(2))) == _range(inside)
    assert (words[m.group(3)], words[m.group(4)], words[m.group(7)]) == (len(inside), len(near), len(near) - len(inside))
    assert (float(m.group(5)), float(m.group(6))) == _range([v for v in near if v >= 1])
    m = re.search(r"([0-9.]+)-([0-9.]+)x in (\w+) of the (\w+) runs that time it \(([0-9.]+)x and ([0-9.]+)x in the other "
                  r"(\w+),", text)
    stream = values("near", 2)
    lo, hi = float(m.group(1)), float(m.group(2))
    inside = [v for v in stream if lo <= v <= hi]
    assert (lo, hi) == _range(inside)
    assert sorted(v for v in stream if v not in inside) == [float(m.group(5)), float(m.group(6))]
    assert (words[m.group(3)], words[m.group(4)], words[m.group(7)]) == (len(inside), len(stream), len(stream) - len(inside))


def test_zen2_row_is_the_runs():
    """The Status table's Zen 2 row: the useful-FLOPs shares (interleaved, sequential) and the training ratios
    over its runs, and the ranges it gives for the runs since the flat last core and for 2026-12-06."""
    row = next(line for line in README.splitlines() if line.startswith("| AVX2 Zen 2 VM"))
    runs = _runs("2026-12-02", "e-f") + _runs("2026-12-05", "d-e") + [r for r in _runs("2026-12-06", "a-k")
                                                                      if r != "2026-12-06j"]
    inter = {r: _interleaved_share(r) for r in runs}
    seq = [int(re.search(r"GFLOP/s = \*\*([0-9]+)%\*\*", _kernel_report(r)).group(1)) for r in runs]
    train = {r: _interleaved_fused(r) for r in runs}
    m = re.search(r"\*\*([0-9]+)-([0-9]+)%\*\* \(([0-9]+)-([0-9]+)%\); ([0-9]+)-([0-9]+)% since its flat last core "
                  r"\(2026-12-06 c-k", row)
    flat = [inter[r] for r in runs if r >= "2026-12-06c"]
    assert [int(x) for x in m.groups()] == [*_range(list(inter.values())), *_range(seq), *_range(flat)]
    m = re.search(r"\*\*([0-9.]+)-([0-9.]+)x\*\*: ([0-9.]+)-([0-9.]+)x in 2026-12-06 a-k", row)
    assert [float(x) for x in m.groups()] == [*_range(list(train.values())),
                                             *_range([v for r, v in train.items() if r.startswith("2026-12-06")])]


def test_step_profile_shares_are_run_ks():
    """'Per thread (run 2026-12-07k's profile of the step) its chain GEMMs run at A% of the peak in the forward and
    B% in the backward, while the forward's last core ... runs at C% and the backward's per-row products at D%':
    the shares of the FMA peak per thread that run k's report gives for those parts."""
    text = re.sub(r"\s+", " ", README)
    m = re.search(r"\(run 2026-12-07k's profile of the step\) its chain GEMMs run at ([0-9]+)% of the peak in the forward "
                  r"and ([0-9]+)% in the backward, while the forward's last core, .*? runs at ([0-9]+)% and the "
                  r"backward's per-row products at ([0-9]+)%", text)
    k = re.sub(r"\s+", " ", _kernel_report("2026-12-07k"))

    def share(part: str) -> int:
        return int(re.search(re.escape(part) + r" [0-9.]+ ms \([0-9]+ MFLOP per thread: [0-9.]+ GFLOP/s, \*\*([0-9]+)%\*\* "
                             r"of the FMA peak's per thread\)", k).group(1))

    assert [int(x) for x in m.groups()] == [share("- forward: chain GEMMs"), share("(dG_2 and dP_1)"),
                                            share("; last core"), share("(dP and dG_3)")]


def test_native_calls_alone_sentence_is_run_ls():
    """'there the Python path cost P ms of the S ms step, and the calls alone reached **Ax** nn.EmbeddingBag's step
    in the near rounds (N), against the fused step's Fx': as run 2026-12-07l's report gives them."""
    text = re.sub(r"\s+", " ", README)
    m = re.search(r"there the Python path cost ([0-9.]+) ms of the ([0-9.]+) ms step, and the calls alone reached "
                  r"\*\*([0-9.]+)x\*\* nn.EmbeddingBag's step in the near rounds \(([0-9]+)\), against the fused step's "
                  r"([0-9.]+)x", text)
    assert m, "the sentence"
    report = re.sub(r"\s+", " ", _kernel_report("2026-12-07l"))
    alone = re.search(r"against the fused step's ([0-9.]+) ms \(round medians\); the Python path around the calls took "
                      r"\*\*([0-9.]+) ms\*\*", report)
    near = re.search(r"The native calls alone vs nn.EmbeddingBag by the vCPUs' state, near \(([0-9]+) rounds\): "
                     r"\*\*([0-9.]+)x\*\*", report)
    assert (float(m.group(1)), float(m.group(2))) == (float(alone.group(2)), float(alone.group(1)))
    assert (float(m.group(3)), int(m.group(4))) == (float(near.group(2)), int(near.group(1)))
    assert float(m.group(5)) == _by_state("2026-12-07l")["near"][1]
    row = next(line for line in README.splitlines() if line.startswith("| Zen 4 VM"))
    assert f"its two native calls alone, without the Python around them, near **{near.group(2)}x** replayed" in row


def test_fig7_overhead_range_is_the_reports_statistic():
    """'the time overhead reading +A% to +B% as the report gives it': the lowest and highest of the committed fig7
    run's per-point medians of the paired per-iteration time ratios (the report's Figure 7 rows), as percentages."""
    import pandas as pd

    m = re.search(r"the time overhead reading \+([0-9]+)% to \+([0-9]+)% as the report gives it", re.sub(r"\s+", " ", README))
    d = pd.read_csv(ROOT / "reports" / "results" / "fig7.csv")
    per_point = d[d["metric"] == "time_vs_reference"].groupby(["tt_tables", "tt_rank"])["median"].median()
    assert (int(m.group(1)), int(m.group(2))) == (round(100 * (per_point.min() - 1)), round(100 * (per_point.max() - 1)))
