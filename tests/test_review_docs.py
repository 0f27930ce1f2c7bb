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
    """'Not met ... on the Zen 4 VM in runs ...': every Zen 4 run whose interleaved training ratio is
    below 1 is named there, with its ratio."""
    m = re.search(r"Zen 4 VM in runs ([a-z, ]+?) \(([0-9.x, and]+) interleaved", README.replace("\n", " "))
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
    runs = _runs("2026-12-04", "a-o") + _runs("2026-12-05", "a-c") + _runs("2026-12-06", "l-n") + _runs("2026-12-07", "a-j")
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
    runs = _runs("2026-12-04", "a-o") + _runs("2026-12-05", "a-c") + _runs("2026-12-06", "l-n") + _runs("2026-12-07", "a-j")
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
