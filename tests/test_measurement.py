"""The timing protocol, what the result rows record, the GPU telemetry fallbacks, the memory probe and the
threads' round-trip probe."""

import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import torch

from benches.environment import fma_peak, thread_round_trip_ns, usable_cpus
from benches.gpu import nvml_telemetry
from benches.memory import measure_in_child
from benches import timing
from benches.timing import Stats, measure

from .native_reference import assert_fma_loop_does_what_it_counts


_ROOT = Path(__file__).resolve().parents[1]


def _fresh_python(code: str, *args: str, env: dict | None = None, timeout: float = 120) -> list[str]:
    """The stdout lines of ``code`` run in a new interpreter at the repository root (PYTHONPATH set to
    it, ``env`` added to this environment); fails the test if it exits with an error."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(_ROOT), **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_stats_quantiles_are_the_closed_form_ones():
    s = Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.q1, s.median, s.q3, s.n) == (2.0, 3.0, 4.0, 5)
    assert s.iqr == 2.0
    inv = s.map(lambda x: 1 / x)  # order flips: quantiles recomputed on the mapped samples
    assert inv.median == pytest.approx(1 / 3) and inv.q1 == pytest.approx(1 / 4) and inv.q3 == pytest.approx(1 / 2)
    assert Stats.of([7.0]).median == 7.0


@pytest.mark.parametrize("min_repeats,max_repeats,target,expected", [(3, 10, 0.0, 3), (3, 10, 1e9, 10), (4, 4, 1.0, 4)])
def test_repeats_are_clamped(min_repeats, max_repeats, target, expected):
    calls = []
    s = measure(lambda: calls.append(1), warmup=2, min_repeats=min_repeats, max_repeats=max_repeats,
                target_time_s=target)
    assert s.n == expected and len(calls) == 2 + expected
    assert s.median == statistics.median(s.samples)


@pytest.mark.parametrize("warmup", [1, 2, 5])
def test_timed_calls_fill_the_target_when_the_first_call_is_slow(monkeypatch, warmup):
    """A fake clock: the first call takes 50 ms, every later one 1 ms. The timed calls must take
    target_time_s together (0.3 s: 300 calls), not the few that an estimate spoilt by the cold first
    call allows (the average of two warm-up calls, 25.5 ms, gave 11 calls: 0.011 s)."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    calls = []

    def fn():
        now[0] += 0.05 if not calls else 0.001
        calls.append(1)

    s = measure(fn, warmup=warmup, min_repeats=3, max_repeats=10_000, target_time_s=0.3)
    assert 0.3 <= sum(s.samples) <= 0.3 + 0.0015 and s.n in (300, 301)
    assert max(s.samples) == pytest.approx(0.001) and len(calls) == warmup + s.n  # the slow call untimed
    calls.clear()
    assert measure(fn, warmup=warmup, min_repeats=3, max_repeats=20, target_time_s=0.3).n == 20  # the bound


@pytest.mark.parametrize("kwargs,needle", [({"warmup": 0}, "warmup"), ({"min_repeats": 5, "max_repeats": 2}, "max_repeats"),
                                           ({"flush_l2": True}, "flush_l2")])
def test_bad_timing_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        measure(lambda: None, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_nvml_fields_say_why_they_are_missing_without_a_gpu():
    t = nvml_telemetry()
    assert set(t) == {"gpu_sm_clock_mhz", "gpu_power_w", "gpu_temperature_c", "gpu_throttle_reasons"}
    assert all(v.startswith("not available: no GPU") for v in t.values())


def _sum_of_ones(n_bytes: int):  # module level: measure_in_child's spawned process imports it
    return lambda: torch.ones(n_bytes // 4).sum()


def test_peak_transient_bytes_sees_a_known_allocation():
    # in a fresh process, as every product measurement is taken (benches.memory.measure_in_child):
    # in this long-lived test process the rise once read 0 in a full CI run (Zen 3 VM, Linux
    # 6.18), the 64 MiB apparently served from memory that earlier tests had left resident
    n = 64 << 20  # 64 MiB, touched
    got, note = measure_in_child(_sum_of_ones, n)
    assert got is not None and n * 0.9 <= got <= n * 1.5, (got, note)
    assert note == "peak RSS rise in a fresh process"


def test_memory_metric_in_a_bench_point(tmp_path):
    from hydra import compose, initialize_config_dir

    from benches.app import measure_point
    from benches.config import register, to_objects
    from tests.test_bench_app import CONF, QUICK

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = to_objects(compose(config_name="bench", overrides=[
            "impl=t3nsor", "table=small", "tt.rank=8", "workload.batch_size=64", "timing.memory=true", *QUICK]))
    rows = measure_point(cfg)
    mem = [r for r in rows if r["metric"] == "peak_transient_memory"]
    assert len(mem) == 1 and mem[0]["unit"] == "bytes"
    # decompress-on-the-fly rebuilds the full 100,000 x 16 fp32 table (6.4 MB) in the forward
    assert mem[0]["median"] >= 100_000 * 16 * 4, mem[0]["note"]
    assert all(r["gpu_sm_clock_mhz"].startswith("not available") for r in rows) or torch.cuda.is_available()


def _probe_runs() -> bool:
    from ttrec.cpu import build

    return build.unavailable_reason() is None and usable_cpus() >= 2


@pytest.mark.skipif(not _probe_runs(), reason="needs the native kernel and two CPUs")
def test_thread_round_trip_probe_reads_a_latency_and_keeps_its_budget():
    """The probe returns a cache-line round trip (tens to thousands of ns on the VMs here) and
    stops at its time budget: asked for a billion trips, which take at least 50 s at 50 ns each,
    it returns after about 20 ms (5 s allowed for a loaded machine)."""
    from ttrec.cpu import build

    t0 = time.perf_counter()
    ns = thread_round_trip_ns(trips=10**9, budget_s=0.02)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0
    # a mean trip no longer than the whole call (not a fixed bound: on a loaded machine one trip can
    # wait out a scheduler slice, 11.6 ms read once under load 12)
    assert ns is not None and 5.0 < ns <= elapsed * 1e9
    assert build.library().tt_thread_round_trip_ns(1, 1.0) > 0  # one trip is enough for a value


@pytest.mark.skipif(not _probe_runs(), reason="needs the native kernel and two CPUs")
def test_thread_round_trip_probe_says_none_when_openmp_grants_one_thread():
    """With one OpenMP thread there is no partner to answer: the kernel returns -1 at once (no
    spin without end) and the probe None."""
    code = "from benches.environment import thread_round_trip_ns; print(thread_round_trip_ns())"
    assert _fresh_python(code, env={"OMP_THREAD_LIMIT": "1"})[-1] == "None"


def _kernel_builds() -> bool:
    from ttrec.cpu import build

    return build.unavailable_reason() is None


def fma_chains_of_build() -> int:
    """The accumulators per thread of the -march=native kernel's FMA loop: 12 zmm with AVX-512, 6 ymm pairs with AVX2."""
    from ttrec.cpu import build

    return 12 if "avx512f" in build.cpu_flags() else 6


@pytest.mark.skipif(not _kernel_builds(), reason="needs the native kernel")
@pytest.mark.parametrize("threads", [1, 2])
def test_fma_peak_loop_does_the_multiply_adds_it_counts(threads):
    from ttrec.cpu import build

    assert_fma_loop_does_what_it_counts(build.library(), threads, fma_chains_of_build())
    # no threads: nothing run, -1
    import ctypes

    flops, checksum = ctypes.c_double(7.0), ctypes.c_double(7.0)
    assert build.library().tt_fma_peak_gflops(0, 100, 1.0, 1.0, 1.0, ctypes.byref(flops), ctypes.byref(checksum)) == -1
    assert flops.value == checksum.value == 0


@pytest.mark.skipif(not _kernel_builds(), reason="needs the native kernel")
def test_fma_peak_loop_stops_at_its_time_budget():
    """Asked for 2^40 iterations (hours), with a 20 ms budget it returns at once (5 s allowed for a
    loaded machine); in a child process with a timeout, so a broken budget fails instead of hanging."""
    code = ("import ctypes, time; from ttrec.cpu import build; f, c = ctypes.c_double(), ctypes.c_double(); "
            "t = time.perf_counter(); build.library().tt_fma_peak_gflops(2, 1 << 40, 0.02, 1.0, 1.0, ctypes.byref(f), "
            "ctypes.byref(c)); print(time.perf_counter() - t, f.value)")
    seconds, flops = map(float, _fresh_python(code, timeout=60)[-1].split())
    assert seconds < 5.0 and 0 < flops < 1e13


@pytest.mark.skipif(not _kernel_builds(), reason="needs the native kernel")
def test_fma_peak_step_and_its_arguments():
    """benches.environment.fma_peak: a timed callable and the FLOPs of one call (closed form for the
    build's chain count); bad arguments name themselves, their value and what is allowed; with one
    OpenMP thread granted, asking for two gives None (the kernel says -1), not a rate of one core
    presented as two."""
    run, flops = fma_peak(1, iterations=1000)
    assert flops == 1000 * 2 * 16 * fma_chains_of_build() and run() > 0
    cpus = usable_cpus()
    for kw, message in (({"threads": 0}, f"threads: got 0; allowed: an int in [1, {cpus}]"),
                        ({"threads": True}, f"threads: got True; allowed: an int in [1, {cpus}]"),
                        ({"threads": 1.0}, f"threads: got 1.0; allowed: an int in [1, {cpus}]"),
                        ({"threads": 2**32 + 1}, f"threads: got {2**32 + 1}; allowed: an int in [1, {cpus}]"),
                        ({"threads": cpus + 1}, f"threads: got {cpus + 1}; allowed: an int in [1, {cpus}]"),
                        ({"threads": 1, "iterations": 0}, "iterations: got 0; allowed: an int in [1, 2**32]"),
                        ({"threads": 1, "iterations": 2**32 + 1}, f"iterations: got {2**32 + 1}; allowed: an int in [1, 2**32]"),
                        ({"threads": 1, "iterations": 2.5}, "iterations: got 2.5; allowed: an int in [1, 2**32]")):
        with pytest.raises(ValueError, match=re.escape(message)):
            fma_peak(**kw)
    if cpus >= 2:
        code = "from benches.environment import fma_peak; print(fma_peak(2, iterations=100))"
        assert _fresh_python(code, env={"OMP_THREAD_LIMIT": "1"})[-1] == "None"


# Every setting of a timed point (task=time), by where it shows in the result rows. RECORDED: the
# point column that changes with it (base overrides, the change, the column). NOT_A_POINT_COLUMN:
# why a setting has no point column (README "What you get" says the same).
_CRITEO = ["workload.distribution=criteo", "workload.criteo_path={a}"]
RECORDED = {
    "impl.name": ([], "impl=t3nsor", "impl"),
    "impl.backend": (["impl.backend=torch"], "impl.backend=cpu", "backend"),
    "impl.sparse": (["impl=dense", "mode=train"], "impl.sparse=false", "sparse"),
    "table.name": ([], "table.name=mine", "table"),
    "table.num_embeddings": ([], "table.num_embeddings=2000", "num_embeddings"),
    "table.embedding_dim": ([], "table.embedding_dim=8", "embedding_dim"),
    "tt.rank": ([], "tt.rank=8", "tt_rank"),
    "tt.d": ([], "tt.d=2", "tt_d"),
    "tt.init": ([], "tt.init=uniform", "init"),
    "tt.p_shapes": ([], "tt.p_shapes=[5,10,20]", "tt_p_shapes"),
    "tt.q_shapes": ([], "tt.q_shapes=[4,2,2]", "tt_q_shapes"),
    "workload.distribution": ([], "workload.distribution=zipf", "distribution"),
    "workload.zipf_alpha": (["workload.distribution=zipf"], "workload.zipf_alpha=1.5", "zipf_alpha"),
    "workload.permute": (["workload.distribution=zipf"], "workload.permute=false", "permute"),
    "workload.batch_size": ([], "workload.batch_size=32", "batch_size"),
    "workload.pooling_factor": ([], "workload.pooling_factor=3", "pooling_factor"),
    "workload.weighted": ([], "workload.weighted=true", "weighted"),
    "workload.pooling": ([], "workload.pooling=mean", "pooling"),
    "workload.seed": ([], "workload.seed=1", "workload_seed"),
    "workload.pooling_sigma": (["workload.pooling_distribution=normal"], "workload.pooling_sigma=1", "pooling_sigma"),
    "workload.pooling_distribution": ([], "workload.pooling_distribution=uniform", "pooling_distribution"),
    "workload.hit_rate": (["workload.distribution=hot_set"], "workload.hit_rate=0.5", "hit_rate"),
    "workload.hot_fraction": (["workload.distribution=hot_set"], "workload.hot_fraction=0.01", "hot_fraction"),
    "workload.reuse_fraction": (["cache=lfu"], "workload.reuse_fraction=0.5", "reuse_fraction"),
    "workload.criteo_path": (_CRITEO, "workload.criteo_path={b}", "criteo_path"),
    "workload.criteo_feature": (_CRITEO, "workload.criteo_feature=5", "criteo_feature"),
    "workload.criteo_mapping": (_CRITEO, "workload.criteo_mapping=dictionary", "criteo_mapping"),
    "timing.warmup": ([], "timing.warmup=3", "timing_warmup"),
    "timing.flush_l2": (["device=cuda"], "timing.flush_l2=true", "flush_l2"),
    "timing.stream_lookups": ([], "timing.stream_lookups=4096", "stream_lookups"),
    "mode.name": ([], "mode=train", "mode"),
    "mode.optimizer": (["mode=train"], "mode.optimizer=adagrad", "optimizer"),
    "mode.lr": (["mode=train"], "mode.lr=0.1", "lr"),
    "mode.fused": (["mode=train"], "mode.fused=true", "fused"),
    "cache.enabled": ([], "cache=lfu", "cache_enabled"),
    "cache.fraction": (["cache=lfu"], "cache.fraction=0.01", "cache_fraction"),
    "cache.warmup_iters": (["cache=lfu"], "cache.warmup_iters=2", "cache_warmup_iters"),
    "cache.update": (["cache=lfu", "mode=train"], "cache.update=fused", "cache_update"),
    "cache.counter": (["cache=lfu"], "cache.counter=bounded", "cache_counter"),
    "cache.counter_slots": (["cache=lfu", "cache.counter=bounded"], "cache.counter_slots=50", "cache_counter_slots"),
    "cache.write_back_steps": (["cache=lfu", "mode=train"], "cache.write_back_steps=1", "cache_write_back_steps"),
    "cache.eval_batches": (["cache=lfu"], "cache.eval_batches=1", "cache_eval_batches"),
    "device": ([], "device=cuda", "device"),
    "seed": ([], "seed=1", "seed"),
}
NOT_A_POINT_COLUMN = {
    "timing.min_repeats": "how many calls are timed: the n column",
    "timing.max_repeats": "how many calls are timed: the n column",
    "timing.target_time_s": "how many calls are timed: the n column",
    "timing.threads": "the environment column threads (torch's thread count when the row is written)",
    "timing.memory": "adds the peak_transient_memory row, measured after the timing",
    "cache.refresh_every": "task=train_dlrm's refreshes (a timed point refuses any but 0); its rows' cache_refresh_every",
    "cache.compare": "adds the comparison points' rows, each with its own impl and cache_enabled",
    "cache.stability_batches": "task=topk_stability's rows (stability_batches)",
    "cache.stability_windows": "task=topk_stability's rows (window)",
    "task": "the task column; each task writes its own rows",
    "redo": "where results go, not what is measured",
    "results_root": "where results go, not what is measured",
    "figures_dir": "where results go, not what is measured",
    "analysis": "the computed tasks' section",
    "scale": "sizes the presets through the keys above; the scale column names it",
    "dlrm": "task=train_dlrm's section (benches.training writes its rows)",
}
_SECTIONS = ("impl", "table", "tt", "workload", "timing", "mode", "cache")


def test_every_setting_of_a_timed_point_is_recorded_or_said_why_not():
    import dataclasses

    from benches.config import BenchConfig

    keys = set()
    for f in dataclasses.fields(BenchConfig):
        section = typing.get_type_hints(BenchConfig)[f.name]
        if f.name in _SECTIONS:
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(section)}
        else:
            keys.add(f.name)
    assert keys == set(RECORDED) | set(NOT_A_POINT_COLUMN) and not set(RECORDED) & set(NOT_A_POINT_COLUMN)


@pytest.mark.parametrize("key", sorted(RECORDED))
def test_a_setting_that_changes_the_measurement_changes_its_column(key, tmp_path):
    """Two points that differ in one setting differ in its column: results.csv files do not differ
    only in the measured values (impl.sparse, workload.criteo_mapping, timing.warmup and some cache
    settings were not recorded)."""
    from hydra import compose, initialize_config_dir

    from benches.app import build_point, point_columns
    from benches.config import register, to_objects
    from tests.test_bench_app import CONF
    from ttrec.tt import backend_status

    base, change, column = RECORDED[key]
    if "device=cuda" in base + [change] and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if key == "impl.backend" and backend_status("cpu") is not None:
        pytest.skip(f"the native CPU kernel is unavailable: {backend_status('cpu')}")
    from tests.test_training_experiments import _criteo_file

    files = {name: str(_criteo_file(tmp_path / name, 100, seed)) for seed, name in enumerate("ab")}
    register()

    def columns(*overrides):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = to_objects(compose(config_name="bench", overrides=[
                "table=tiny", "tt.rank=4", "workload.batch_size=64", "timing=quick",
                *(o.format(**files) for o in overrides)]))
        module, batch, _ = build_point(cfg)
        return point_columns(cfg, module, batch, "test")

    before, after = columns(*base), columns(*base, change)
    assert column in before and before[column] != after[column], (before.get(column), after.get(column))


def test_environment_columns_record_the_openmp_wait_policy(monkeypatch):
    """Every result row's environment says how OpenMP threads wait (PASSIVE changes timings on a
    shared machine), timed points' rows as well as DLRM training's."""
    from benches.environment import capture

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert capture()["omp_wait_policy"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert capture()["omp_wait_policy"] is None and capture()["threads"] == str(torch.get_num_threads())


# A step's pattern that glibc's moving thresholds punish: three 8 MiB blocks taken, written and given
# back, then again. The first cycle maps them (above the 128 KiB start threshold), which moves the mmap
# threshold to 8 MiB and the trim threshold to 16 MiB; from then on the blocks come from the heap and
# the 24 MiB freed at its top exceeds the trim threshold, so glibc gives it back and the next cycle
# faults it in again. Prints each cycle's minor page faults.
_HEAP_CYCLES = """
import ctypes, resource, sys
from benches.environment import steady_heap
setting = steady_heap() if sys.argv[1] == "steady" else "default"
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 8 << 20
faults = []
for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(n) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, n)
    for b in reversed(blocks):
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(setting, *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="steady_heap sets glibc's malloc thresholds; this libc is not glibc")
def test_steady_heap_gives_a_step_its_freed_memory_back_without_page_faults():
    """After steady_heap, blocks freed at the heap's top stay there: the second and later cycles of
    the same allocations fault in nothing. The control (the same cycles with glibc's defaults, in a
    fresh process too) faults in about 16 MiB every cycle, so the check can fail."""
    def cycles(mode):
        *setting, a, b, c, d, e = _fresh_python(_HEAP_CYCLES, mode)[-1].split()
        return " ".join(setting), [int(x) for x in (a, b, c, d, e)]

    setting, steady = cycles("steady")
    assert setting == "glibc mmap_threshold=33554432 trim_threshold=1073741824"
    assert steady[0] >= 3 * 2048 * 0.9  # the first cycle writes 24 MiB of fresh pages (4 KiB each)
    assert max(steady[1:]) < 64, steady
    setting, default = cycles("default")
    assert setting == "default" and min(default[2:]) >= 2048, default  # the control: 8+ MiB each cycle
    from benches.environment import capture, steady_heap

    assert steady_heap() == steady_heap() == capture()["malloc"]  # once per process, recorded in rows


def test_memory_probe_builds_its_point_on_the_default_heap_and_timed_points_on_the_steady_one():
    """The memory probe's child keeps glibc's default heap (its RSS-rise protocol needs freed blocks
    given back), a timed point's process gets steady_heap: checked in a fresh process, in that order."""
    code = """
from benches.app import build_point, step_for_memory_probe
from benches.cpu_kernel import SCALES, _cfg
from benches.environment import capture
cfg = _cfg(SCALES["smoke"], "native", 8, 1, 256)
step_for_memory_probe(cfg)
print(capture()["malloc"])
build_point(cfg)
print(capture()["malloc"])
"""
    probe, timed = _fresh_python(code, timeout=300)[-2:]
    assert probe == "default"
    if platform.libc_ver()[0] == "glibc":
        assert timed.startswith("glibc mmap_threshold=")


def test_cpu_wait_is_the_growth_of_the_threads_run_delay_over_the_wall_time(monkeypatch):
    """CpuWait: the per-thread growth of the run delay, summed, over wall seconds, kept to 3 decimals
    (the note reads the recorded value). A thread that ends takes only its own share along, one that
    starts counts from 0; None without schedstat or for a block under 0.05 s; the note only from 0.25
    threads and 20 ms of waiting in all, and it names oversubscription when torch runs more threads
    than there are usable CPUs."""
    import benches.environment as env

    def run(before, after, wall, torch_threads=1):
        clock = iter([100.0, 100.0 + wall])
        monkeypatch.setattr(env.time, "monotonic", lambda: next(clock))
        readings = iter([before, after])
        monkeypatch.setattr(env, "_run_delays_ns", lambda: next(readings))
        monkeypatch.setattr(env.torch, "get_num_threads", lambda: torch_threads)
        with env.CpuWait() as wait:
            pass
        return wait

    s = 10**9
    busy = run({"1": 3 * s, "2": 1 * s}, {"1": 4 * s, "2": int(1.5 * s)}, 1.0)  # 1.0 + 0.5 thread-s in 1 s
    assert busy.threads == 1.5
    assert busy.note().startswith("busy machine: this process's threads waited for a CPU 1.50 threads' worth")
    assert run({"1": 3 * s}, {"1": 3 * s + 2 * 10**7}, 2.0).threads == 0.01
    assert run({"1": 3 * s}, {"1": 3 * s + 2 * 10**7}, 2.0).note() is None
    # thread 2 ended (its 9 s of lifetime delay leave with it); thread 3 started and waited 0.2 s
    assert run({"1": s, "2": 9 * s}, {"1": int(1.3 * s), "3": int(0.2 * s)}, 1.0).threads == 0.5
    assert run({"1": 0}, {"1": 249_600_000}, 1.0).threads == 0.25  # 0.2496 recorded as 0.25 ...
    assert run({"1": 0}, {"1": 249_600_000}, 1.0).note() is not None  # ... and noted as recorded
    assert run({"1": 0}, {"1": 249_400_000}, 1.0).note() is None
    assert run({"1": 0}, {"1": s}, 0.04).threads is None  # too short to tell
    short = run({"1": 0}, {"1": 18_000_000}, 0.06)  # 0.3 threads, but 18 ms: one preempted slice
    assert short.threads == 0.3 and short.note() is None
    assert run({"1": 0}, {"1": 30_000_000}, 0.06).note() is not None  # 0.5 threads, 30 ms: two slices and more
    assert run(None, None, 1.0).threads is None and run(None, None, 1.0).note() is None
    over = run({"1": 0}, {"1": s}, 1.0, torch_threads=env.usable_cpus() + 2)
    assert over.note().startswith(f"oversubscribed: {env.usable_cpus() + 2} torch threads on {env.usable_cpus()} CPUs")


def _spinners(n: int, seconds: float) -> list[subprocess.Popen]:
    """``n`` processes spinning for ``seconds`` on this process's CPUs."""
    code = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


@pytest.mark.alone
@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="reads schedstat")
@pytest.mark.skipif(bool(os.environ.get("PYTEST_XDIST_WORKER")),
                    reason="needs the CPUs to itself: beside another worker's tests both halves wait (nox -s tests runs "
                           "it after the parallel pass)")
def test_cpu_wait_sees_threads_kept_off_the_cpus_by_other_processes():
    """This process's OpenMP threads (a matrix product on every usable CPU) against one spinning process
    per usable CPU: they wait about half the time (about 1 thread on 2 CPUs; the bar is lower, the
    scheduler may favour them); the same work alone, after the spinners ended, waits less by most of that."""
    from benches.environment import CpuWait

    a = torch.randn(256, 256)
    before = torch.get_num_threads()

    def measured() -> float:
        torch.set_num_threads(usable_cpus())
        try:
            with CpuWait() as wait:
                t = time.perf_counter()
                while time.perf_counter() - t < 0.5:
                    a @ a
        finally:
            torch.set_num_threads(before)
        return wait.threads

    others = _spinners(usable_cpus(), 3.0)
    try:
        time.sleep(0.3)  # the spinners' interpreters up
        contended = measured()
    finally:
        for child in others:
            child.kill()
            child.wait()
    assert contended is not None and contended > 0.3
    assert measured() < contended - 0.3  # (whatever else runs here waits on both)


def test_a_busy_machine_puts_a_note_on_the_timed_rows(monkeypatch):
    """measure_point records the threads' wait for a CPU in cpu_wait on every row, and when it reaches
    the note's bar, every timed metric carries the note."""
    import benches.app as app
    from benches.config import to_objects
    from .test_bench_app import QUICK, _compose

    class Busy:
        threads, torch_threads, waited_s = 1.5, 1, 1.5

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        note = app.CpuWait.note

    monkeypatch.setattr(app, "CpuWait", Busy)
    rows = app.measure_point(to_objects(_compose("impl=tt", "table=tiny", "workload.batch_size=8", *QUICK)))
    assert {r["cpu_wait"] for r in rows} == {1.5}
    assert {r["metric"] for r in rows} == {"time_per_batch", "time_per_lookup", "throughput", "gflops"}
    assert all(r["note"].startswith("busy machine: this process's threads waited for a CPU 1.50") for r in rows)


@pytest.mark.parametrize("impl", ["impl=tt", "impl=dense", "impl=t3nsor", "mode=train"])
def test_config_columns_are_point_columns_without_the_module(impl):
    """config_columns (rows measured without a module here: the CPU-kernel memory probe) gives the
    same columns, in the same order, as point_columns, and the same values wherever the config alone
    decides them."""
    from hydra import compose, initialize_config_dir

    from benches.app import build_point, config_columns, point_columns
    from benches.config import register, to_objects
    from tests.test_bench_app import CONF

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = to_objects(compose(config_name="bench", overrides=[
            "table=tiny", "tt.rank=4", "workload.batch_size=64", "timing=quick", impl]))
    module, batch, _ = build_point(cfg)
    point, config = point_columns(cfg, module, batch, "x"), config_columns(cfg, "x")
    assert list(point)[:len(config)] == list(config)
    decided = {k: v for k, v in config.items() if v is not None}
    assert decided == {k: point[k] for k in decided}
    assert {"mode", "distribution", "batch_size", "pooling_factor", "impl"} <= set(decided)
