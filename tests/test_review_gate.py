"""Review of the performance-regression gate (benches.gate): bad inputs that were tracebacks or
silently accepted, results lost or mislabelled, help that said something the code does not do.
No timing: the benchmarks are replaced by canned pytest-benchmark JSON, the gate subprocess by a stub."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benches.gate import baselines, evidence, run
from benches.gate.decision import DEFAULT_THRESHOLD, REGRESSION, confirmation_bar
from ttrec.cpu import plant


def _canned(*names: str, seconds: float = 1e-3) -> dict:
    """pytest-benchmark JSON as the gate's benchmarks write it: 3 rounds of ``seconds`` per call,
    4 calibration samples of 1 ms per unit (normalised median = seconds / 1 ms)."""
    return {"benchmarks": [{"extra_info": {"gate_point": n, "round_seconds": [seconds] * 3,
                                           "calibration_seconds": [1e-3] * 4}} for n in names]}


@pytest.fixture
def no_plant(monkeypatch):
    monkeypatch.delenv(plant.ENV, raising=False)


# ---- run: the exit status says what happened, the artifact keeps what was measured ----

@pytest.mark.parametrize("extra_info", [
    {"gate_point": "tt_cpu_forward", "round_seconds": [0.0, 1e-3], "calibration_seconds": [1e-3] * 3},
    {"gate_point": "tt_cpu_forward", "round_seconds": [1e-3, 1e-3]},  # no calibration samples
])
def test_unusable_benchmark_output_is_exit_4_with_an_artifact(tmp_path, monkeypatch, capsys, no_plant, extra_info):
    """Output the decision cannot use was a traceback: exit 1 (the regression code), no gate.json."""
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: {"benchmarks": [{"extra_info": extra_info}]})
    code = run.main(["--points=tt_cpu_forward", "--baseline-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == run.EXIT_BENCH_FAILED
    decision = json.loads((tmp_path / "o" / "gate.json").read_text())["decision"]
    assert decision["exit_code"] == 4 and "cannot be used" in decision["error"]
    assert "cannot be used" in capsys.readouterr().err


def test_a_failed_confirmation_run_keeps_the_first_pass_verdicts(tmp_path, monkeypatch, no_plant):
    """A suspect's re-run failing is exit 4; the first pass's ratios were lost from the artifact."""
    common = ["--points=tt_cpu_forward", "--baseline-dir", str(tmp_path)]
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: _canned(*names))
    assert run.main([*common, "--update-baseline", "--baseline-runs", "1", "--out", str(tmp_path / "a")]) == 0
    calls = []

    def slow_then_broken(path, options, names):
        calls.append(names)
        if len(calls) > 1:
            raise run.BenchmarksFailed("the confirmation run crashed")
        return _canned(*names, seconds=2e-3)  # 2x the baseline

    monkeypatch.setattr(run, "run_benchmarks", slow_then_broken)
    assert run.main([*common, "--out", str(tmp_path / "b")]) == run.EXIT_BENCH_FAILED
    assert calls == [["tt_cpu_forward"], ["tt_cpu_forward"]]
    decision = json.loads((tmp_path / "b" / "gate.json").read_text())["decision"]
    (first,) = decision["first_pass_verdicts"]
    assert first["metric"] == "tt_cpu_forward" and first["verdict"] == REGRESSION
    assert first["ratio"] == pytest.approx(2.0)


@pytest.mark.parametrize("flags", [["--update-baseline"], ["--add-to-baseline"], []])
def test_a_bad_plant_value_is_exit_2_before_measuring(tmp_path, monkeypatch, capsys, flags):
    """Recording: a ValueError traceback (exit 1, the regression code); gating: every benchmark
    measured and failed in the child (exit 4). Both are a bad setting, refused up front."""
    monkeypatch.setenv(plant.ENV, "x")
    monkeypatch.setattr(run, "run_benchmarks", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as exc:
        run.main(["--points=tt_cpu_forward", "--baseline-dir", str(tmp_path), "--out", str(tmp_path / "o"), *flags])
    assert exc.value.code == 2
    assert "TTREC_PLANT_SLOWDOWN: got 'x'" in capsys.readouterr().err


# ---- baselines: a stored file's runs are checked with the rest of it ----

@pytest.mark.parametrize("runs", [["x"], 5, [-1.0, 0.0], [1.0, float("nan")]])
def test_corrupt_runs_in_a_baseline_fail_before_measuring(tmp_path, monkeypatch, capsys, no_plant, runs):
    """--add-to-baseline pools the stored runs: junk there crashed after the measurement (TypeError)
    or, non-positive, was pooled into a baseline of 0 that the next gate run refuses."""
    ran = []
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: ran.append(names) or _canned(*names))
    common = ["--points=tt_cpu_forward", "--baseline-dir", str(tmp_path), "--baseline-runs", "1"]
    assert run.main([*common, "--update-baseline", "--out", str(tmp_path / "a")]) == 0
    path, ran[:] = next(tmp_path.glob("*.json")), []
    data = json.loads(path.read_text())
    data["benchmarks"]["tt_cpu_forward"]["runs"] = runs
    path.write_text(json.dumps(data))
    before = path.read_text()
    with pytest.raises(SystemExit) as exc:
        run.main([*common, "--add-to-baseline", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(path) in err and "benchmarks.tt_cpu_forward.runs: got" in err, err
    assert ran == [] and path.read_text() == before  # nothing measured, nothing written
    with pytest.raises(ValueError, match=r"runs: got .*must be a list of finite numbers > 0"):
        baselines.load(data["machine_class"], data["benchmarks"]["tt_cpu_forward"]["calibration"], tmp_path)


def test_the_committed_baselines_stay_readable():
    from benches.gate.calibration import IDENTITY

    for path in sorted(baselines.DEFAULT_DIR.glob("*.json")):
        cls = json.loads(path.read_text())["machine_class"]
        values, _ = baselines.load(cls, IDENTITY)
        assert values and all(v > 0 for v in values.values()), path.name


# ---- help says what the code does ----

def test_threshold_help_names_the_confirmation_bar_and_the_points_own_thresholds():
    """The help said 'fail when normalised current / baseline exceeds this': a gated point above it
    passes unless its re-run also clears the bar, and the cache point keeps its own 1.25."""
    action = next(a for a in run.parser()._actions if "--threshold" in a.option_strings)
    text = " ".join(action.help.split())
    assert f"{confirmation_bar(DEFAULT_THRESHOLD):.2f}" in text and "re-run" in text
    assert "own higher threshold" in text and "reference points never fail" in text


# ---- evidence: factors, stale artifacts, the resummarised start ----

@pytest.mark.parametrize("text, needle", [("1,inf", "finite number >= 1"), ("1,1.0,1.5", "at most once")])
def test_evidence_plant_factors_are_finite_and_distinct(text, needle):
    """inf made every planted gate run fail in its child (TTREC_PLANT_SLOWDOWN refuses it); a repeated
    factor wrote its runs into one artifact directory and counted them twice in its summary row."""
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        evidence._factors(text)
    assert evidence._factors("1, 1.25,1.5") == [1.0, 1.25, 1.5]


def test_evidence_never_reads_an_earlier_sessions_artifact(tmp_path, monkeypatch):
    """A gate run that writes no gate.json (exit 2) was recorded with the verdicts of the gate.json
    an earlier session had left in the same --artifacts directory."""
    out = tmp_path / "plant1_run00"
    out.mkdir()
    (out / "gate.json").write_text(json.dumps({"decision": {"threshold": 1.2, "verdicts": [
        {"metric": evidence.GATED, "threshold": 1.2, "ratio": 0.99, "confirmation_ratio": None, "verdict": "pass"}]}}))
    monkeypatch.setattr(evidence.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, "", "error: bad argument\n"))
    result = evidence.run_gate(1.0, out, ["--threshold", "0.5"])
    assert result["exit_code"] == 2 and result["artifact"] == {}
    assert evidence.rows_of(0, 1.0, result)[0]["metric"] is None


def _artifacts(root: Path, starts: dict[str, float], wall: float = 30.0) -> None:
    for name, start in starts.items():
        (root / name).mkdir(parents=True)
        path = root / name / "gate.json"
        path.write_text(json.dumps({"environment": {"cpu_model": "x"}, "wall_seconds": wall,
                                    "decision": {"threshold": 1.2, "exit_code": 0, "verdicts": []}}))
        os.utime(path, (start + wall, start + wall))  # written at the end of the run


def test_evidence_resummarise_dates_the_summary_from_the_earliest_run(tmp_path):
    """The 'started' time was the file time of the alphabetically first artifact (plant1.25_run00,
    written at the end of the second run), not the start of the first run (plant1_run00)."""
    t0 = 1_000_000_000.0  # 2001-09-09 01:46:40 UTC
    _artifacts(tmp_path / "arts", {"plant1_run00": t0, "plant1.25_run00": t0 + 100, "plant1.5_run00": t0 + 200})
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.csv").write_text("iteration,plant,exit_code,wall_s,loadavg_before,loadavg_after,metric,threshold,"
                                  "ratio,confirmation_ratio,verdict,raw_median_ms\n0,1.0,0,30.0,,,,,,,,\n")
    assert evidence.main(["--resummarise", "--out", str(out), "--artifacts", str(tmp_path / "arts")]) == 0
    assert "started 2001-09-09 01:46 UTC" in (out / "summary.md").read_text()


def test_evidence_resummarise_without_its_inputs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="runs.csv does not exist"):
        evidence.main(["--resummarise", "--out", str(tmp_path / "none"), "--artifacts", str(tmp_path)])
    (tmp_path / "runs.csv").write_text("iteration\n")
    with pytest.raises(SystemExit, match="no <run>/gate.json of a gate decision"):
        evidence.main(["--resummarise", "--out", str(tmp_path), "--artifacts", str(tmp_path / "empty")])


def test_a_missing_baseline_dir_is_a_usage_error_and_the_hints_name_the_users_dir(tmp_path, monkeypatch, capsys,
                                                                                   no_plant):
    """--baseline-dir naming no directory (a typo) measured, found no baseline and passed (exit 0);
    now it is exit 2 before anything runs. An empty directory of the user's is no baseline, and the
    hint to record one names that directory, not the committed one's default."""
    measured = []
    monkeypatch.setattr(run, "run_benchmarks", lambda path, options, names: measured.append(names) or _canned(*names))
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as exc:
        run.main(["--points=tt_cpu_forward", "--baseline-dir", str(missing), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and measured == []
    err = capsys.readouterr().err
    assert f"--baseline-dir: got {str(missing)!r}, which is not a directory" in err
    assert f"--update-baseline --baseline-dir {missing}" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = run.main(["--points=tt_cpu_forward", "--baseline-dir", str(empty), "--out", str(tmp_path / "o2")])
    out = capsys.readouterr().out
    assert code == run.EXIT_PASS and measured == [["tt_cpu_forward"]]
    assert f"Record one with `nox -s gate -- --update-baseline --baseline-dir {empty}` and commit it." in out
    # recording into a new directory stays allowed (it is created)
    assert run.main(["--points=tt_cpu_forward", "--baseline-dir", str(missing), "--update-baseline",
                     "--baseline-runs", "1", "--out", str(tmp_path / "o3")]) == 0 and missing.is_dir()
