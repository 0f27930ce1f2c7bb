"""Mutation audit of the measurement area (benches.timing, benches.app's metric rows, benches.gate's
decision): the GPU protocol's repeat count and L2 flush by call order, every metric's unit and value
against the Stats it was made from (quartiles in order after a flip), the gate's boundaries
(threshold, 1 / threshold, confirmation bar: strictly beyond counts) and its input checks.
Faked clocks and CUDA: no timing is asserted."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from benches import app, timing
from benches.analytic import tt_shapes_rows
from benches.config import BenchConfig
from benches.gate import run
from benches.config import register, to_objects
from benches.gate.decision import (FASTER, NOT_CONFIRMED, PASS, REGRESSION, Measurement, confirm, decide,
                                   exit_code)
from benches.results import RESULTS_FILE, claim_point, collect, mark_run, measured_twin, refusal_file, write_rows
from benches.timing import Stats, measure
from reports.claims import fig5_claims, table2_claims
from ttrec.cpu import plant

from .test_bench_app import CONF, QUICK


# --- the GPU protocol (faked CUDA, faked clock) ----------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA events, device and synchronize faked; ``trace`` records what happens in order, the clock
    advances ``per_call`` seconds per call of the step (so the last warm-up call takes exactly that)."""
    trace: list[str] = []
    state = {"calls": 0, "per_call": 0.25}

    class FakeDevice:
        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            trace.append("record")
            self.at = state["calls"]

        def elapsed_time(self, end):  # ms: 3 ms per call between the two records
            return 3.0 * (end.at - self.at)

    class FakeBuffer:
        def zero_(self):
            trace.append("flush")

    def fake_empty(*size, dtype=None, device=None):
        trace.append(f"empty {size[0]} {dtype}")
        return FakeBuffer()

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: trace.append("sync"))
    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: state["per_call"] * state["calls"]))

    def step():
        state["calls"] += 1
        trace.append("fn")

    return types.SimpleNamespace(trace=trace, state=state, step=step)


@pytest.mark.parametrize("target,expected", [(1.0, 4), (0.1, 3), (100.0, 7)])
def test_gpu_repeats_are_the_target_over_the_last_warmup_call_clamped(fake_cuda, target, expected):
    """One warm-up call takes 0.25 s: target 1 s -> 4 timed calls; clamped to [3, 7] otherwise."""
    s = measure(fake_cuda.step, warmup=2, min_repeats=3, max_repeats=7, target_time_s=target, device="cuda")
    assert s.n == expected and fake_cuda.state["calls"] == 2 + expected
    assert s.median == pytest.approx(3e-3)  # CUDA events read ms: 3 ms per call is 0.003 s


def test_gpu_flush_l2_overwrites_a_large_buffer_before_every_timed_call_outside_its_events(fake_cuda):
    measure(fake_cuda.step, warmup=1, min_repeats=3, max_repeats=3, target_time_s=0.0, device="cuda", flush_l2=True)
    t = fake_cuda.trace
    assert t[0] == f"empty {timing.L2_FLUSH_BYTES} {torch.uint8}" and timing.L2_FLUSH_BYTES >= 50 * 2**20
    timed = t[t.index("sync", t.index("fn")) + 1:]  # after the synchronized last warm-up call
    assert timed == ["flush", "record", "fn", "record"] * 3 + ["sync"]


def test_gpu_without_flush_allocates_and_flushes_nothing(fake_cuda):
    measure(fake_cuda.step, warmup=1, min_repeats=2, max_repeats=2, target_time_s=0.0, device="cuda")
    assert "flush" not in fake_cuda.trace and not any(x.startswith("empty") for x in fake_cuda.trace)


# --- the bench app's metric rows: units and values from the Stats they were made from --------------------

SAMPLES = (0.004, 0.001, 0.002, 0.010, 0.003)  # seconds per batch, one slow outlier


def _cfg(*overrides: str):
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_objects(compose(config_name="bench", overrides=[
            "table=tiny", "tt.rank=4", "workload.batch_size=16", "workload.pooling_factor=3", *QUICK, *overrides]))


@pytest.fixture
def fake_measure(monkeypatch):
    seen = {}

    def fake(fn, **kwargs):
        seen.update(kwargs)
        return Stats.of(SAMPLES)

    monkeypatch.setattr(app, "measure", fake)
    monkeypatch.setattr(app, "measure_in_child", lambda setup, cfg: (123_456, "peak RSS rise in a fresh process"))
    return seen


def _quartiles(x) -> list[float]:
    return list(np.quantile(np.asarray(x, dtype=np.float64), [0.25, 0.5, 0.75]))


def test_metric_rows_have_their_units_and_values(fake_measure):
    cfg = _cfg("impl=tt", "mode=forward", "timing.memory=true")
    rows = {r["metric"]: r for r in app.measure_point(cfg, experiment="test")}
    assert fake_measure["warmup"] == cfg.timing.warmup and fake_measure["device"] == "cpu"
    lookups = 16 * 3
    # TT chain of one row, q = (2, 2, 4), ranks (1, 4, 4, 1): (2 x 4) @ (4 x 2*4) then (4 x 4) @ (4 x 4*1)
    flops = 2 * 2 * 4 * 2 * 4 + 2 * 4 * 4 * 4 * 1
    t = np.array(SAMPLES)
    expected = {"time_per_batch": ("ms", t * 1e3), "time_per_lookup": ("ns", t * 1e9 / lookups),
                "throughput": ("lookups/s", lookups / t), "gflops": ("GFLOP/s", flops * lookups / t / 1e9)}
    assert set(rows) == set(expected) | {"peak_transient_memory"}
    for metric, (unit, values) in expected.items():
        r = rows[metric]
        assert r["unit"] == unit, metric
        np.testing.assert_allclose([r["q1"], r["median"], r["q3"]], _quartiles(values), rtol=1e-12, err_msg=metric)
        assert r["q1"] <= r["median"] <= r["q3"] and r["iqr"] == pytest.approx(r["q3"] - r["q1"], rel=1e-12)
        assert r["n"] == len(SAMPLES)
    # throughput's quartiles are the times' flipped: its q1 is lookups over the slower quartile of time
    assert rows["throughput"]["q1"] == pytest.approx(lookups / np.quantile(t, 0.75), rel=1e-12)
    mem = rows["peak_transient_memory"]
    assert (mem["unit"], mem["median"], mem["q1"], mem["q3"], mem["iqr"], mem["n"]) == ("bytes", 123_456, 123_456,
                                                                                      123_456, 0.0, 1)
    # the point: TT parameters by hand (cores 1x10x2x4, 4x10x2x4, 4x10x4x1), reduction = dense / TT
    params = 1 * 10 * 2 * 4 + 4 * 10 * 2 * 4 + 4 * 10 * 4 * 1
    r = rows["time_per_batch"]
    assert r["param_bytes"] == 4 * params
    assert r["compression_ratio"] == pytest.approx(1000 * 16 / params) and r["compression_ratio"] > 1


def test_a_memory_probe_without_an_answer_is_a_row_of_none_counted_zero(fake_measure, monkeypatch):
    monkeypatch.setattr(app, "measure_in_child", lambda setup, cfg: (None, "not available: test"))
    rows = app.measure_point(_cfg("impl=dense", "mode=forward", "timing.memory=true"))
    mem = next(r for r in rows if r["metric"] == "peak_transient_memory")
    assert mem["median"] is None and mem["iqr"] is None and mem["n"] == 0 and mem["note"] == "not available: test"
    dense = next(r for r in rows if r["metric"] == "time_per_batch")
    assert dense["compression_ratio"] == 1.0 and dense["param_bytes"] == 1000 * 16 * 4


# --- the gate's decision: boundaries and checks ----------------------------------------------------------

def test_a_round_is_normalised_by_the_mean_of_the_calibration_samples_either_side():
    m = Measurement("p", (1.0, 1.0, 6.0), (1.0, 3.0, 1.0, 5.0))
    assert m.normalised() == pytest.approx([1 / 2, 1 / 2, 6 / 3])
    assert m.summary() == pytest.approx(1 / 2)  # the median of the three


def test_exactly_at_the_threshold_passes_and_strictly_beyond_fails():
    # (ratios chosen exact in binary: 1.5, 1.25, 0.75 of base 2)
    base = {"p": 2.0}
    at, above = decide({"p": 3.0}, base, threshold=1.5), decide({"p": 3.0 + 1e-9}, base, threshold=1.5)
    assert at[0].ratio == 1.5 and at[0].verdict == PASS and exit_code(at) == 0
    assert above[0].verdict == REGRESSION and exit_code(above) == 1
    # faster only below 1 / threshold: a ratio of 0.9 (threshold 1.2) is a plain pass, 1 / 1.25 = 0.8 too
    assert decide({"p": 1.8}, base, threshold=1.2)[0].verdict == PASS
    assert decide({"p": 1.6}, base, threshold=1.25)[0].verdict == PASS
    assert decide({"p": 1.6 - 1e-9}, base, threshold=1.25)[0].verdict == FASTER
    # a point's own threshold is used for it, the gate's for the rest
    own = decide({"p": 3.0 + 1e-9, "q": 3.0 + 1e-9}, {"p": 2.0, "q": 2.0}, threshold=1.2, thresholds={"p": 1.6})
    assert [(v.verdict, v.threshold) for v in own] == [(PASS, 1.6), (REGRESSION, 1.2)]


def test_a_rerun_exactly_at_the_confirmation_bar_does_not_confirm():
    first = decide({"p": 4.0}, {"p": 2.0}, threshold=1.5)  # bar: 1.25
    assert first[0].verdict == REGRESSION
    at = confirm(first, {"p": 2.5})
    assert at[0].verdict == NOT_CONFIRMED and at[0].confirmation_ratio == 1.25 and exit_code(at) == 0
    above = confirm(first, {"p": 2.5 + 1e-9})
    assert above[0].verdict == REGRESSION and exit_code(above) == 1
    assert confirm(first, {"other": 1.0})[0].verdict == REGRESSION  # not re-measured: fails closed


@pytest.mark.parametrize("bad", [1.0, 0.8, math.inf, math.nan])
def test_a_bad_per_point_threshold_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="threshold: got"):
        decide({"p": 1.0}, {"p": 1.0}, threshold=1.2, thresholds={"p": bad})


@pytest.mark.parametrize("rounds,calibration,needle", [
    ((1.0, 1.0), (1.0, 1.0, 1.0, 1.0), "got 4 calibration samples for 2 rounds; expected 3"),
    ((1.0,), (1.0,), "got 1 calibration samples for 1 rounds; expected 2"),
    ((math.inf,), (1.0, 1.0), "round_seconds holds inf"),
    ((1.0,), (1.0, math.inf), "calibration_seconds holds inf"),
    ((1.0,), (math.nan, 1.0), "calibration_seconds holds nan"),
    ((-1.0,), (1.0, 1.0), "round_seconds holds -1.0"),
])
def test_measurements_the_decision_cannot_use_are_refused(rounds, calibration, needle):
    with pytest.raises(ValueError, match=needle):
        Measurement("p", rounds, calibration)


# --- the gate's runner (benchmarks replaced by canned pytest-benchmark JSON) -----------------------------

def _canned(seconds: dict[str, float]):
    """A stand-in for run.run_benchmarks: 3 rounds of ``seconds[name]`` per point, calibration samples
    of 1 ms (normalised median = seconds / 1 ms); every call is recorded."""
    calls = []

    def run_benchmarks(path, options, names):
        calls.append(list(names))
        return {"benchmarks": [{"extra_info": {"gate_point": n, "round_seconds": [seconds[n]] * 3,
                                               "calibration_seconds": [1e-3] * 4}} for n in names]}
    run_benchmarks.calls = calls
    return run_benchmarks


@pytest.fixture
def gate_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(plant.ENV, raising=False)
    return tmp_path


def test_a_new_baseline_is_the_median_of_its_runs_not_their_mean(gate_dir, monkeypatch):
    per_run = iter([1e-3, 2e-3, 10e-3])  # normalised 1, 2, 10: median 2 (mean 4.33)

    def three_runs(path, options, names):
        s = next(per_run)
        return {"benchmarks": [{"extra_info": {"gate_point": n, "round_seconds": [s] * 3,
                                               "calibration_seconds": [1e-3] * 4}} for n in names]}

    monkeypatch.setattr(run, "run_benchmarks", three_runs)
    assert run.main(["--points=tt_cpu_forward", "--baseline-dir", str(gate_dir), "--update-baseline",
                     "--baseline-runs", "3", "--out", str(gate_dir / "o")]) == run.EXIT_PASS
    entry = json.loads(next(gate_dir.glob("*.json")).read_text())["benchmarks"]["tt_cpu_forward"]
    assert entry["runs"] == pytest.approx([1.0, 2.0, 10.0]) and entry["normalised_median"] == pytest.approx(2.0)


def _record_then_gate(gate_dir, monkeypatch, points: str, base: dict, now: dict, *flags: str) -> tuple[int, dict]:
    common = [f"--points={points}", "--baseline-dir", str(gate_dir)]
    monkeypatch.setattr(run, "run_benchmarks", _canned(base))
    assert run.main([*common, "--update-baseline", "--baseline-runs", "1", "--out", str(gate_dir / "a")]) == 0
    monkeypatch.setattr(run, "run_benchmarks", _canned(now))
    code = run.main([*common, *flags, "--out", str(gate_dir / "b")])
    return code, json.loads((gate_dir / "b" / "gate.json").read_text())["decision"]


def test_a_points_own_threshold_is_a_floor_that_a_higher_gate_threshold_raises(gate_dir, monkeypatch):
    """cached_tt_cpu_train_fused_sgd has its own 1.25: with --threshold 1.5 it is judged at 1.5 (README),
    so 1.4x slower passes; at the default 1.2 its own 1.25 holds, and 1.3x slower fails (confirmed)."""
    name = "cached_tt_cpu_train_fused_sgd"
    code, decision = _record_then_gate(gate_dir, monkeypatch, name, {name: 1e-3}, {name: 1.4e-3}, "--threshold", "1.5")
    (v,) = decision["verdicts"]
    assert code == 0 and v["threshold"] == 1.5 and v["verdict"] == "pass" and v["ratio"] == pytest.approx(1.4)
    code, decision = _record_then_gate(gate_dir, monkeypatch, name, {name: 1e-3}, {name: 1.3e-3})
    (v,) = decision["verdicts"]
    assert code == 1 and v["threshold"] == 1.25 and v["verdict"] == "REGRESSION"


def test_a_regression_is_exit_1_even_where_another_point_lacks_a_baseline_and_one_is_required(gate_dir, monkeypatch):
    fwd, step = "tt_cpu_forward", "tt_cpu_train_fused_sgd"
    monkeypatch.setattr(run, "run_benchmarks", _canned({fwd: 1e-3}))
    assert run.main([f"--points={fwd}", "--baseline-dir", str(gate_dir), "--update-baseline", "--baseline-runs", "1",
                     "--out", str(gate_dir / "a")]) == 0
    slower = _canned({fwd: 2e-3, step: 1e-3})
    monkeypatch.setattr(run, "run_benchmarks", slower)
    code = run.main([f"--points={fwd},{step}", "--baseline-dir", str(gate_dir), "--require-baseline",
                     "--out", str(gate_dir / "b")])
    assert code == run.EXIT_REGRESSION  # the regression, not exit 3: a missing baseline must not hide it
    assert slower.calls == [[fwd, step], [fwd]]  # the suspect alone measured again
    verdicts = {v["metric"]: v["verdict"] for v in json.loads((gate_dir / "b" / "gate.json").read_text())
                ["decision"]["verdicts"]}
    assert verdicts == {fwd: "REGRESSION", step: "no baseline"}


# --- results: resume, twins, column types ----------------------------------------------------------------

def _dict_cfg(*overrides: str):
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=["table=tiny", *overrides])


def test_a_point_measured_with_redo_is_skipped_by_a_later_run_without_it(tmp_path):
    """redo says whether to measure again, not what is measured: a run resuming without it skips the point."""
    assert claim_point(tmp_path, _dict_cfg("impl=dense", "redo=true"), redo=True)
    (tmp_path / RESULTS_FILE).write_text("metric,median\nx,1\n")
    assert not claim_point(tmp_path, _dict_cfg("impl=dense", "redo=false"))


def test_a_twin_in_a_directory_this_run_refused_is_not_used(tmp_path):
    """The sweep aggregates no refused directory: a point measured there must be measured in this job."""
    assert claim_point(tmp_path / "0", _dict_cfg("impl=dense", "tt.rank=4"))
    (tmp_path / "0" / RESULTS_FILE).write_text("metric,median\nx,1\n")
    mark_run(tmp_path / "0")
    mine = _dict_cfg("impl=dense", "tt.rank=8")
    assert measured_twin(tmp_path / "1", mine) == (tmp_path / "0").resolve()
    refusal_file(tmp_path / "0").write_text("PointRefused: test\n")
    assert measured_twin(tmp_path / "1", mine) is None


def test_a_column_integer_in_one_job_and_fractional_in_another_stays_a_float(tmp_path):
    write_rows([{"metric": "m", "x": 4, "median": 1.0}], tmp_path / "0" / RESULTS_FILE)
    write_rows([{"metric": "m", "x": 4.5, "median": 2.0}], tmp_path / "1" / RESULTS_FILE)
    df = collect(tmp_path)
    assert [float(v) for v in df["x"]] == [4.0, 4.5] and not pd.api.types.is_integer_dtype(df["x"])


# --- paper claims: tolerances as their rules say ----------------------------------------------------------

def test_a_table2_reduction_more_than_one_off_the_printed_digit_disagrees():
    df = pd.DataFrame(tt_shapes_rows(BenchConfig()))
    hit = (df["num_embeddings"] == 10131227) & (df["tt_rank"] == 32) & (df["metric"] == "memory_reduction")
    assert df.loc[hit, "median"].round().item() == 327  # the paper's 327x (10131227 x 16 / 495360 = 327.2)
    df.loc[hit, "median"] += 1.5
    by_claim = {c["claim"]: c["agrees"] for c in table2_claims(df)}
    assert by_claim["Table 2: 10,131,227 x 16, R = 32: p-shapes, TT parameters, memory reduction"] == "no"
    assert by_claim["Table 2: 10,131,227 x 16, R = 16: p-shapes, TT parameters, memory reduction"] == "yes"


def test_the_share_of_the_7_largest_tables_is_a_yes_from_99_percent_on():
    """6.1: "the 7 largest tables constitutes 99% of the model"; a share of 99.2% agrees, 98.8% does not."""
    def share_verdict(uncompressed_rest: float) -> str:
        rows = [{"dataset": "kaggle", "tt_tables": k, "tt_rank": 32, "metric": m, "median": v}
                for k, vals in ((0, {"model_bytes": 1000.0, "uncompressed_bytes": 1000.0, "reduction": 1.0}),
                                (7, {"model_bytes": 20.0, "uncompressed_bytes": uncompressed_rest, "reduction": 50.0}))
                for m, v in vals.items()]
        return next(c["agrees"] for c in fig5_claims(pd.DataFrame(rows))
                    if c["claim"].startswith("6.1: the 7 largest tables") and "(kaggle)" in c["claim"])

    assert share_verdict(8.0) == "yes" and share_verdict(10.0) == "yes" and share_verdict(12.0) == "no"


@pytest.mark.parametrize("off,verdict", [(1.015, "yes"), (0.985, "yes"), (1.03, "no"), (0.97, "no")])
def test_a_figure5_reduction_agrees_within_2_percent_of_the_papers(off, verdict):
    """Figure 5 / 6.1: Kaggle with 5 TT tables, 48x; the rule is "within 2%"."""
    rows = [{"dataset": "kaggle", "tt_tables": 5, "tt_rank": 32, "metric": m, "median": v}
            for m, v in (("model_bytes", 1e6), ("uncompressed_bytes", 5e5), ("reduction", 48 * off))]
    (c,) = [c for c in fig5_claims(pd.DataFrame(rows)) if c["claim"].startswith("Fig 5 / 6.1: kaggle, 5 largest")]
    assert c["paper"] == 48 and c["rule"] == "within 2%" and c["agrees"] == verdict
