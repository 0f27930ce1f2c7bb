"""Review of the measurement and result-storage protocols (benches.timing, results, environment, memory, gpu):
statistics against numpy/pandas, the repeat logic by call counts, result files, the memory child's answers,
environment capture where git or /proc/cpuinfo cannot tell. No timing is asserted."""

import os
import signal
import subprocess
import types

import numpy as np
import pandas as pd
import pytest
import torch

from benches import environment, timing
from benches.memory import measure_in_child
from benches.results import RESULTS_FILE, collect, write_rows
from benches.timing import Stats, measure


# --- Stats and the timing protocol -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 101])
def test_stats_are_numpys_and_pandas_quartiles_also_after_unit_maps(n):
    x = np.random.default_rng(n).lognormal(-7, 1, size=n)  # per-call seconds
    s = Stats.of(list(x))
    ref = np.quantile(x, [0.25, 0.5, 0.75])
    np.testing.assert_allclose([s.q1, s.median, s.q3], ref, rtol=1e-12)
    np.testing.assert_allclose(ref, pd.Series(x).quantile([0.25, 0.5, 0.75]).to_numpy(), rtol=1e-12)
    assert s.n == n and s.iqr == pytest.approx(ref[2] - ref[0], rel=1e-12, abs=0)
    lookups, flops = 4096, 1.5e9
    for f in (lambda t: t * 1e3, lambda t: t * 1e9 / lookups, lambda t: lookups / t, lambda t: flops / t / 1e9):
        m, y = s.map(f), f(x)
        np.testing.assert_allclose([m.q1, m.median, m.q3], np.quantile(y, [0.25, 0.5, 0.75]), rtol=1e-12)
        assert m.n == n


def test_stats_of_an_iterator_keeps_the_samples_it_counts_and_none_is_a_clear_error():
    s = Stats.of(x * 1.0 for x in (3, 1, 2))
    assert s.n == 3 and sorted(s.samples) == [1.0, 2.0, 3.0]
    assert s.map(lambda t: 2 * t).median == 4.0  # (the samples were lost: map had none to work on)
    with pytest.raises(ValueError, match="samples: got none"):
        Stats.of([])


def test_warmup_calls_are_untimed_and_a_raising_step_stops_the_measurement():
    calls, timed = [], []
    real = timing.time.perf_counter

    def clock():  # counts the calls made between two readings of the clock: the timed ones
        timed.append(len(calls))
        return real()

    fn = lambda: calls.append(1)  # noqa: E731
    orig = timing.time
    timing.time = types.SimpleNamespace(perf_counter=clock)
    try:
        s = measure(fn, warmup=3, min_repeats=4, max_repeats=4, target_time_s=0.0)
    finally:
        timing.time = orig
    assert s.n == 4 and len(calls) == 7
    assert timed[0] == 3 and all(b - a == 1 for a, b in zip(timed[::2], timed[1::2]))  # first timed call: the 4th

    def fails_on_third():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step failed")

    calls.clear()
    with pytest.raises(RuntimeError, match="step failed"):
        measure(fails_on_third, warmup=1, min_repeats=5, max_repeats=5, target_time_s=0.0)
    assert len(calls) == 3  # not retried, not swallowed


def test_the_gpu_protocol_times_and_synchronizes_the_device_it_is_given(monkeypatch):
    """device=cuda:1 while device 0 is current: the events must be recorded on device 1's stream and
    the synchronizes wait for device 1 (before: device 0's, with nothing on it). Faked CUDA: no GPU here."""
    current = [0]
    seen = {"record": [], "synchronize": [], "fn": []}

    class FakeDevice:
        def __init__(self, device):
            self.idx = int(str(device).partition(":")[2] or current[0])

        def __enter__(self):
            self.prev, current[0] = current[0], self.idx

        def __exit__(self, *exc):
            current[0] = self.prev

    class FakeEvent:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            seen["record"].append(current[0])

        def elapsed_time(self, end):
            return 1.0

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen["synchronize"].append(current[0]))
    s = measure(lambda: seen["fn"].append(current[0]), warmup=2, min_repeats=3, max_repeats=3, device="cuda:1")
    assert s.n == 3 and s.median == pytest.approx(1e-3)
    assert len(seen["record"]) == 6 and len(seen["synchronize"]) == 3 and len(seen["fn"]) == 5
    assert set(seen["record"]) == set(seen["synchronize"]) == set(seen["fn"]) == {1}
    assert current[0] == 0  # the caller's device is current again


# --- result files ------------------------------------------------------------------------------------------

def test_results_files_get_the_permissions_of_any_new_file(tmp_path):
    """tempfile.mkstemp makes 0600 files; renamed, the results were unreadable to other users."""
    old = os.umask(0o022)
    try:
        path = write_rows([{"metric": "x", "median": 1.0}], tmp_path / "0" / RESULTS_FILE)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == [RESULTS_FILE]  # no temp file left


def test_rows_without_columns_are_refused_not_written_as_a_file_that_breaks_collect(tmp_path):
    write_rows([{"metric": "x", "median": 1.0}], tmp_path / "0" / RESULTS_FILE)
    with pytest.raises(ValueError, match="rows: got 0 rows"):
        write_rows([], tmp_path / "1" / RESULTS_FILE)
    assert not (tmp_path / "1" / RESULTS_FILE).exists()
    assert list(collect(tmp_path)["median"]) == [1.0]  # the other jobs' results still aggregate


def test_csv_round_trip_keeps_ints_bools_missing_values_and_every_row(tmp_path):
    a = [{"impl": "tt", "tt_rank": 4, "param_bytes": 2**60 + 1, "fused": True, "median": 2.5, "note": None},
         {"impl": "dense", "tt_rank": None, "param_bytes": None, "fused": False, "median": float("nan"), "note": "x"}]
    b = [{"impl": "tt", "tt_rank": 8, "param_bytes": 3, "fused": True, "median": 1.0, "note": None}] * 3
    write_rows(a, tmp_path / "0" / RESULTS_FILE)
    write_rows(b, tmp_path / "1" / RESULTS_FILE)
    df = collect(tmp_path)
    assert len(df) == 5 and list(df["job_dir"]) == ["0", "0", "1", "1", "1"]
    assert str(df["tt_rank"].dtype) == "Int64" and df["tt_rank"].tolist()[:2] == [4, pd.NA]
    assert df["param_bytes"].iloc[0] == 2**60 + 1  # exact: not through a float
    assert df["fused"].tolist() == [True, False, True, True, True]
    assert np.isnan(df["median"].iloc[1]) and df["median"].iloc[0] == 2.5
    assert df["note"].isna().tolist() == [True, False, True, True, True]


# --- the memory child --------------------------------------------------------------------------------------

def _raises_long(n: int):  # module level: imported by the spawned child
    raise ValueError("x" * n)


def _step_raises(n: int):
    def step():
        raise RuntimeError("step failed")
    return step


def _step_killed(n: int):
    return lambda: os.kill(os.getpid(), signal.SIGKILL)


def _step_of_a_kept_input(n: int):
    buf = torch.ones(n // 4)  # allocated and touched before the call: part of the baseline, not of the call
    return lambda: buf.sum()


def test_a_child_error_longer_than_the_pipe_buffer_is_reported_not_taken_for_a_hang():
    """The child's answer was read only after it had ended; an answer larger than the pipe buffer
    (64 KiB) blocked it until the timeout, and the error was lost."""
    got, note = measure_in_child(_raises_long, 200_000, timeout_s=60)
    assert got is None and note == "not available: ValueError: " + "x" * 200_000


def test_the_child_result_when_the_step_raises_or_is_killed():
    assert measure_in_child(_step_raises, 0) == (None, "not available: RuntimeError: step failed")
    got, note = measure_in_child(_step_killed, 0)
    assert got is None and note == f"not available: the child exited with code {-signal.SIGKILL}"
    with pytest.raises(ValueError, match="timeout_s: got 0"):
        measure_in_child(_step_raises, 0, timeout_s=0)


def test_memory_of_an_input_made_before_the_call_is_subtracted():
    n = 64 << 20
    got, note = measure_in_child(_step_of_a_kept_input, n)
    assert got is not None and got < n / 4, (got, note)  # the 64 MiB input is the baseline's


# --- environment capture -----------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["no git", "not a repository"])
def test_git_dirty_is_unknown_when_git_cannot_tell(monkeypatch, failure):
    """Without git (or outside a repository, or refused for 'dubious ownership') the sha was 'unknown'
    but git_dirty 'False': a clean tree claimed."""
    def run(cmd, **kw):
        if failure == "no git":
            raise FileNotFoundError("git")
        return subprocess.CompletedProcess(cmd, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(environment.subprocess, "run", run)
    environment._static.cache_clear()
    try:
        env = environment.capture()
    finally:
        environment._static.cache_clear()
    assert env["git_sha"] == "unknown" and env["git_dirty"] == "unknown"


def test_git_dirty_still_reads_true_and_false(monkeypatch):
    for out, want in (("", "False"), (" M impl/tt.py", "True")):
        monkeypatch.setattr(environment, "_git", lambda *a, out=out: "abc" if a[0] == "rev-parse" else out)
        environment._static.cache_clear()
        try:
            assert environment.capture()["git_dirty"] == want
        finally:
            environment._static.cache_clear()


def test_cpu_isa_is_unknown_on_x86_when_the_flags_cannot_be_read(monkeypatch):
    """No /proc/cpuinfo flags (not Linux, or hidden) on an x86 CPU: its ISA is not known; it was
    recorded as 'x86_64', i.e. without AVX2, and the gate's baseline class followed it."""
    import ttrec.cpu.build as build

    monkeypatch.setattr(build, "cpu_flags", lambda: set())
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    assert environment._cpu_isa() == "unknown"
    monkeypatch.setattr(environment.platform, "machine", lambda: "aarch64")  # no x86 flags to read there
    assert environment._cpu_isa() == "aarch64"
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse2", "avx2", "fma"})
    monkeypatch.setattr(environment.platform, "machine", lambda: "x86_64")
    assert environment._cpu_isa() == "avx2"


def test_environment_without_proc_cpuinfo_degrades_to_unknown(monkeypatch):
    read_text = environment.Path.read_text

    def no_cpuinfo(p, *a, **kw):
        if str(p) == "/proc/cpuinfo":
            raise FileNotFoundError(p)
        return read_text(p, *a, **kw)

    monkeypatch.setattr(environment.Path, "read_text", no_cpuinfo)
    monkeypatch.setattr(environment.platform, "processor", lambda: "")
    assert environment._cpuinfo() == {}
    assert environment._cpu_model() == "unknown" and environment._cpu_family_model() == "unknown"
