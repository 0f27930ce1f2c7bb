"""The CPU-kernel experiment's report against independent computations: per-round ratios and their
quartiles (numpy), the useful-FLOP and training-step FLOP counts (a brute-force count of distinct
prefixes and rows), the sgemm's 2 n^3, the rounds' near/far states, the lookups/s and memory tables,
the command line, and the timing protocol's quantiles (numpy)."""

import dataclasses
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from benches import cpu_kernel
from benches.app import build_point
from benches.cpu_kernel import IMPLS, NEAR_NS, SCALES, _cfg, _report, _round_ratios, main, train_step_flops
from benches.environment import usable_cpus
from benches.timing import Stats, measure
from ttrec import TTSpec
from ttrec.baselines import tltorch_unavailable_reason
from ttrec.workloads import batch_stats


def _np_quartiles(x) -> tuple[float, float, float]:
    """numpy's median and quartiles (linear interpolation between order statistics)."""
    med, q1, q3 = np.percentile(np.asarray(x, dtype=np.float64), [50, 25, 75])
    return float(med), float(q1), float(q3)


# --- quantiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 15, 16])
def test_stats_quantiles_are_numpys(n):
    x = np.random.default_rng(n).lognormal(size=n).tolist()
    s = Stats.of(x)
    assert (s.median, s.q1, s.q3) == pytest.approx(_np_quartiles(x), rel=1e-12)
    assert s.n == n and s.iqr == pytest.approx(s.q3 - s.q1)
    inv = s.map(lambda v: 1 / v)
    assert (inv.median, inv.q1, inv.q3) == pytest.approx(_np_quartiles([1 / v for v in x]), rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 15])
def test_round_ratio_quartiles_are_numpys_and_lie_within_the_rounds(n):
    """The report's [quartiles] of per-round ratios are the suite's (Stats, numpy's); with two rounds
    (say, two near rounds) they were 0.75 and 2.25 for ratios 1 and 2, outside both."""
    rng = np.random.default_rng(100 + n)
    num, den = rng.uniform(1, 3, n).tolist(), rng.uniform(1, 3, n).tolist()
    ratios = [a / b for a, b in zip(num, den)]
    med, q1, q3 = _round_ratios(num, den)
    assert (med, q1, q3) == pytest.approx(_np_quartiles(ratios), rel=1e-12)
    assert min(ratios) <= q1 <= med <= q3 <= max(ratios)
    assert _round_ratios([1.0, 2.0], [1.0, 1.0]) == pytest.approx((1.5, 1.25, 1.75))


# --- the timing protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,needle", [({"target_time_s": float("nan")}, "target_time_s"),
                                           ({"target_time_s": -1.0}, "target_time_s"),
                                           ({"device": "gpu"}, "device"), ({"device": "mps"}, "device")])
def test_measure_refuses_a_target_or_device_it_cannot_honour(kwargs, needle):
    calls = []
    with pytest.raises(ValueError, match=needle):
        measure(lambda: calls.append(1), **kwargs)
    assert calls == []


def test_measure_times_between_min_and_max_repeats_and_keeps_the_samples():
    calls = []
    s = measure(lambda: calls.append(1), warmup=3, min_repeats=4, max_repeats=6, target_time_s=0.0)
    assert s.n == 4 == len(s.samples) and len(calls) == 3 + 4
    assert (s.median, s.q1, s.q3) == pytest.approx(_np_quartiles(s.samples))


# --- FLOP counts against a brute-force count --------------------------------------------------------


def _digits(index: int, p: tuple[int, ...]) -> tuple[int, ...]:
    """Row index -> TT digits (i_1, ..., i_d), the last digit running fastest."""
    out = []
    for pk in reversed(p):
        index, r = divmod(index, pk)
        out.append(r)
    return tuple(reversed(out))


def _brute_force_flops(spec: TTSpec, indices: list[int]) -> tuple[int, int, int]:
    """(useful forward FLOPs, training-step FLOPs, lookups) of d = 3 by counting distinct prefixes and rows:
    per distinct prefix the product G_1[i_1] G_2[i_2] ((q1 x R1) @ (R1 x q2 R2)); per lookup (forward)
    or per distinct row (training step) the last core ((q1 q2 x R2) @ (R2 x q3)); the step's backward
    twice the forward's products."""
    (_, _, q1, r1), (_, _, q2, r2), (_, _, q3, _) = spec.core_shapes
    prefixes = {_digits(i, spec.tt_p_shapes)[:-1] for i in indices}
    rows = set(indices)
    chain, last = 2 * q1 * r1 * q2 * r2, 2 * (q1 * q2) * r2 * q3
    forward = len(prefixes) * chain + len(indices) * last
    step = 3 * (len(prefixes) * chain + len(rows) * last)
    return forward, step, len(indices)


@pytest.mark.parametrize("distribution", ["uniform", "zipf"])
def test_training_step_flops_count_distinct_prefixes_and_rows(distribution):
    scale = SCALES["smoke"]
    module, batch, _ = build_point(_cfg(scale, "native", rank=32, pooling=1, batch=4096, mode="train",
                                        distribution=distribution))
    assert module.spec.d == 3 and module.spec.tt_p_shapes == TTSpec.suggest(100_000, 16, 32).tt_p_shapes
    indices = batch.indices.tolist()
    _, step, lookups = _brute_force_flops(module.spec, indices)
    got = train_step_flops(scale["table"], 32, lookups, batch_stats(batch, module.spec.tt_p_shapes))
    assert got == pytest.approx(step, rel=1e-12)


# --- the report, from inputs whose every number is known --------------------------------------------


def _rows(label: str, ms: float, lookups: int, **cols) -> list[dict]:
    return [{"label": label, "metric": "time_per_batch", "median": ms, **cols},
            {"label": label, "metric": "throughput", "median": lookups / (ms / 1e3), **cols}]


def _fake_run(batch_indices: list[int], spec: TTSpec, reuse: dict, train_reuse: dict):
    """Arguments of _report: a smoke-scale table, the forward's native time 1e-9 s per batch (so its
    useful GFLOP/s print its useful FLOPs), known per-round times and probes."""
    scale = dict(SCALES["smoke"], batch=len(batch_indices))
    B = scale["batch"]
    cols = {"tt_p_shapes": "x".join(map(str, spec.tt_p_shapes)), "tt_q_shapes": "x".join(map(str, spec.tt_q_shapes))}
    fwd_ms = {"native": 1e-6, "reference": 3.0, "t3nsor": 9.0, "tltorch": 4.0, "dense": 0.25}
    fwd = {k: _rows(k, ms, B, **cols, **reuse) for k, ms in fwd_ms.items()}
    train_ms = {"native fused SGD": 2.0, "native autograd + SGD": 2.5, "nn.EmbeddingBag sparse + SGD": 3.0,
                "native fused SGD (batch stream)": 2.1, "nn.EmbeddingBag sparse + SGD (batch stream)": 3.5}
    train = {k: _rows(k, ms, B, **cols, **train_reuse, timed_batches=4 if k.endswith("stream)") else 1)
             for k, ms in train_ms.items()}
    rng = np.random.default_rng(7)
    n = 6
    fwd_rounds = {"sgemm": rng.uniform(1e-3, 2e-3, n).tolist(), "native": rng.uniform(1e-4, 2e-4, n).tolist(),
                  "fma peak": rng.uniform(2e-3, 3e-3, n).tolist()}  # (its FLOPs per call: rounds["fma_flops"])
    train_rounds = {k: rng.uniform(1e-3, 4e-3, n).tolist() for k in train_ms}
    by_batch = {64: {k + suffix: rng.uniform(1e-4, 3e-4, n).tolist() for k in ("native fused SGD", "nn.EmbeddingBag sparse + SGD")
                     for suffix in ("", " (batch stream)")}}
    # forward: rounds 0, 1 near; 2, 3, 4 far; 5 mixed. Training: 0-3 far (one at the bound's edge), 4 near, 5 unprobed
    fwd_states = [(60.0, 70.0), (NEAR_NS, 80.0), (400.0, 500.0), (151.0, 900.0), (300.0, 200.0), (60.0, 500.0)]
    train_states = [(400.0, 500.0), (151.0, 152.0), (300.0, 200.0), (999.0, 151.0), (55.0, 65.0), (None, 60.0)]
    rounds = {"n": n, "sgemm_flops": 2 * 512**3, "forward": fwd_rounds, "train": train_rounds, "fma_flops": 6e8,
              "train_by_batch": by_batch, "train_by_batch_reuse": {64: {"unique_prefix_ratio": 0.5, "unique_row_ratio": 0.75}},
              "forward_states": fwd_states, "train_states": train_states,
              # the fused step's profile (benches.cpu_kernel._median_step_phases): 2 ms, 0.4 outside the phases
              "step_profile": {"forward": {"seconds_sort": 2e-4, "seconds_chains_and_last_core": 5e-4, "seconds_pool": 0.0,
                                           "seconds_sort_radix": 1e-4},
                               "backward": {"seconds_setup": 1e-6, "seconds_i2_buckets": 8.5e-4, "seconds_first_core": 4.9e-5},
                               "step": 2e-3, "outside": 4e-4},
              # its parts per thread (benches.cpu_kernel._median_step_parts)
              "step_parts": {"forward chains": 1e-4, "forward last_core": 5e-5, "backward i2_buckets": 8e-4,
                             "backward buckets_gather": 1e-5, "backward buckets_rows": 2e-4,
                             "backward buckets_gemms": 4e-4, "step": 2.1e-3}}
    grid = [{"rank": r, "pooling": p, "impl": k, "lookups/s": 1000.0 * r + p + i}
            for r in (8, 16) for p in (1, 10) for i, k in enumerate([*IMPLS, "native (batch stream)", "dense (batch stream)"])]
    mem = [{"impl": k, "peak_transient_bytes": (i + 1) * 3 * 2**20, "output_bytes": B * 16 * 4, "note": "fake"}
           for i, k in enumerate(IMPLS)]
    env = {"cpu_model": "cpu", "cpu_count": "2", "cpu_isa": "avx2", "torch": "x", "git_sha": "0" * 40, "git_dirty": "False"}
    gflops = {"torch.mm (a)": 90.0, "numpy.matmul (b)": 120.0}
    phases = {"forward (uniform)": {}}
    return dict(scale_name="smoke", scale=scale, threads=2, gflops=gflops, sgemm_name="numpy.matmul (b)", fwd=fwd,
                train=train, grid=grid, mem=mem, env=env, phases=phases, rounds=rounds)


def _bracket(med, q1, q3, pct=False, digits=2) -> str:
    if pct:
        return f"**{100 * med:.0f}%** [{100 * q1:.0f}–{100 * q3:.0f}%]"
    return f"**{med:.{digits}f}x** [{q1:.{digits}f}–{q3:.{digits}f}]"


def test_report_numbers_match_independent_computations():
    spec = TTSpec.suggest(100_000, 16, 32)
    _, batch, _ = build_point(_cfg(SCALES["smoke"], "native", rank=32, pooling=1, batch=512))
    indices = batch.indices.tolist()
    useful, _, B = _brute_force_flops(spec, indices)
    reuse = batch_stats(batch, spec.tt_p_shapes)
    train_reuse = {"unique_prefix_ratio": 0.25, "unique_row_ratio": 0.5}
    a = _fake_run(indices, spec, reuse, train_reuse)
    report = _report(**a)
    lines = report.splitlines()
    r = a["rounds"]

    # forward table: native lookups/s over each implementation's (>= 1: native faster)
    for k, ms in {"reference": 3.0, "t3nsor": 9.0, "tltorch": 4.0, "dense": 0.25}.items():
        assert any(x.startswith(f"| {k} | {ms:.2f} |") and x.endswith(f"| {ms / 1e-6:.2f}x |") for x in lines), k
    # useful FLOPs: the native forward takes 1e-9 s, so its GFLOP/s are its FLOPs
    assert f"-> {useful:.1f} GFLOP/s = **{100 * useful / 120.0:.0f}%**" in report
    assert f"{useful / 1e6:.0f} MFLOP per batch" in report
    # interleaved useful FLOPs / sgemm: per-round ratios of rates, sgemm at 2 n^3
    per_round = [(useful / tn) / (2 * 512**3 / ts) for tn, ts in zip(r["forward"]["native"], r["forward"]["sgemm"])]
    assert f"useful FLOPs = {_bracket(*_np_quartiles(per_round), pct=True)} of the sgemm's" in report
    # near / far: near = both probes <= 150 ns, far = both above
    fwd_near, fwd_far = [0, 1], [2, 3, 4]
    split = next(x for x in lines if x.startswith("Useful FLOPs / sgemm by the vCPUs' state"))
    assert f"near (2 rounds): {_bracket(*_np_quartiles([per_round[i] for i in fwd_near]), pct=True)}" in split
    assert f"far (3 rounds): {_bracket(*_np_quartiles([per_round[i] for i in fwd_far]), pct=True)}" in split
    assert split.endswith("; 1 mixed or unprobed.")
    assert "fastest probe of this run 55 ns" in report

    # training table: each step's throughput over nn.EmbeddingBag's (>= 1: faster than nn.EmbeddingBag)
    for k, ms in {"native fused SGD": 2.0, "native autograd + SGD": 2.5}.items():
        assert any(x.startswith(f"| {k} | {ms:.2f} |") and x.endswith(f"| {3.0 / ms:.2f}x |") for x in lines), k
    dense, fused = np.array(r["train"]["nn.EmbeddingBag sparse + SGD"]), np.array(r["train"]["native fused SGD"])
    auto = np.array(r["train"]["native autograd + SGD"])
    assert f"native fused SGD: {_bracket(*_np_quartiles(dense / fused))}" in report
    assert f"native autograd + SGD: {_bracket(*_np_quartiles(dense / auto))}" in report
    split = next(x for x in lines if x.startswith("Training step vs nn.EmbeddingBag by the vCPUs' state"))
    near, far = [4], [0, 1, 2, 3]
    assert f"near (1 rounds): fused SGD {_bracket(*_np_quartiles(dense[near] / fused[near]))}" in split
    assert (f"far (4 rounds): fused SGD {_bracket(*_np_quartiles(dense[far] / fused[far]))} (steps "
            f"{1e3 * np.median(fused[far]):.2f} against {1e3 * np.median(dense[far]):.2f} ms)") in split
    assert split.endswith("; 1 mixed or unprobed.")
    assert f"native fused SGD: **{dense.min() / fused.min():.2f}x**" in report.split("fastest rounds:")[1]
    # the step's arithmetic: 3 x (distinct prefixes x chain + distinct rows x last core), at the sgemm's round-median rate
    chain, last = 2 * 2 * 32 * 2 * 32, 2 * 4 * 32 * 4
    step = 3 * B * (0.25 * chain + 0.5 * last)
    rate = 2 * 512**3 / np.median(r["forward"]["sgemm"])
    assert f"= {step / 1e6:.0f} MFLOP per step" in report
    # the hard bound at the cores' FMA peak (its FLOPs per call over its rounds' median time), nn.EmbeddingBag's
    # round median and fastest round over it; then the same at the sgemm's rate, a kernel's practical ceiling
    peak = 6e8 / np.median(r["forward"]["fma peak"])
    st = " (batch stream)"
    dense_s, fused_s = (np.array(r["train"][k + st]) for k in ("nn.EmbeddingBag sparse + SGD", "native fused SGD"))
    assert (f"**{1e3 * step / peak:.2f} ms**: no kernel doing it can pass **{np.median(dense) / (step / peak):.2f}x** and "
            f"**{dense.min() / (step / peak):.2f}x** replayed, **{np.median(dense_s) / (step / peak):.2f}x** and "
            f"**{dense_s.min() / (step / peak):.2f}x** on the stream.") in report
    assert (f"**{1e3 * step / rate:.2f} ms**: a kernel running it at the sgemm's rate and doing nothing else would reach "
            f"{np.median(dense) / (step / rate):.2f}x and {dense.min() / (step / rate):.2f}x replayed") in report
    assert f"**{100 * step / peak / np.median(fused):.0f}%** of the peak." in report
    # the step's parts per thread: each part's FLOPs (forward: chains per distinct prefix, last core per distinct
    # row; backward twice each) over the threads the kernel ran, and their rate against the peak per thread (2 threads)
    from ttrec.cpu import ops

    kt = ops.threads_for(B)
    per_thread = peak / 2

    def part(ms, flops):
        rate = flops / kt / (ms / 1e3)
        return f"{ms:.2f} ms ({flops / kt / 1e6:.0f} MFLOP per thread: {rate / 1e9:.1f} GFLOP/s, **{100 * rate / per_thread:.0f}%**"

    parts = report.split("Per thread, from 30 more fused steps")[1].split("###")[0]
    assert f"{2.1:.2f} ms a step; the kernel ran {kt} thread" in parts
    assert f"chain GEMMs {part(0.1, B * 0.25 * chain)}" in parts
    assert f"last core {part(0.05, B * 0.5 * last)}" in parts
    assert f"the per-row products (dP and dG_3) {part(0.2, 2 * B * 0.5 * last)}" in parts
    assert f"the chain GEMMs (dG_2 and dP_1) {part(0.4, 2 * B * 0.25 * chain)}" in parts
    assert "(0.80 ms wall): the upstream gradient rows' gather 0.01 ms" in parts and "the rest 0.19 ms" in parts
    # the forward's rounds against the peak: per-round ratios of the sgemm's and the native forward's rates to it
    fma = 6e8 / np.array(r["forward"]["fma peak"])
    sg = 2 * 512**3 / np.array(r["forward"]["sgemm"])
    nat = useful / np.array(r["forward"]["native"])
    assert f"fma_peak): **{peak / 1e9:.1f} GFLOP/s**, the ceiling of any GEMM here" in report
    assert (f"the sgemm ran at {_bracket(*_np_quartiles(sg / fma), pct=True)} of it, the native forward's useful "
            f"FLOPs at {_bracket(*_np_quartiles(nat / fma), pct=True)}.") in report
    # on the stream: each stream step against nn.EmbeddingBag on the stream, never against a replayed step
    assert any(x.startswith(f"| native fused SGD{st} | 2.10 |") and x.endswith(f"| {3.5 / 2.1:.2f}x |") for x in lines)
    assert f"On the stream: native fused SGD{st}: {_bracket(*_np_quartiles(dense_s / fused_s))}." in report
    assert f"take 4 distinct batches of the workload in turn ({4 * B:,} lookups" in report
    assert (f"on the stream {_bracket(*_np_quartiles(dense_s[far] / fused_s[far]))} (steps "
            f"{1e3 * np.median(fused_s[far]):.2f} against {1e3 * np.median(dense_s[far]):.2f} ms)") in split
    assert f"native fused SGD{st}: **{dense_s.min() / fused_s.min():.2f}x**" in report.split("fastest rounds:")[1]
    row64 = next(x for x in lines if x.startswith("| 64 | "))
    d64, f64, d64s, f64s = (np.array(r["train_by_batch"][64][k]) for k in (
        "nn.EmbeddingBag sparse + SGD", "native fused SGD", "nn.EmbeddingBag sparse + SGD" + st, "native fused SGD" + st))
    assert row64.startswith(f"| 64 | {1e3 * np.median(f64):.3f} | {1e3 * np.median(d64):.3f} | "
                            f"{_bracket(*_np_quartiles(d64 / f64))} | {1e3 * np.median(f64s):.3f} | "
                            f"{1e3 * np.median(d64s):.3f} | {_bracket(*_np_quartiles(d64s / f64s))} |"), row64
    assert row64.endswith(f"| {1e3 * 3 * 64 * (0.5 * chain + 0.75 * last) / rate:.3f} |")

    # lookups/s grid: every cell where its rank, pooling and implementation say (the stream's columns last)
    columns = [*IMPLS, "native (batch stream)", "dense (batch stream)"]
    assert next(x for x in lines if x.startswith("| rank | pooling | ")) == "| rank | pooling | " + " | ".join(columns) + " |"
    for g in a["grid"]:
        row = next(x for x in lines if x.startswith(f"| {g['rank']} | {g['pooling']} | "))
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        assert cells[columns.index(g["impl"])] == f"{g['lookups/s']:,.0f}"


def test_report_without_the_fma_peak_bounds_at_the_sgemm():
    """A run whose FMA peak was not timed (no native kernel for it): no peak lines, and the step's bound
    is given at the sgemm's rate alone, still as what a kernel at that rate would reach."""
    spec = TTSpec.suggest(100_000, 16, 32)
    reuse = {"unique_prefix_ratio": 0.5, "unique_row_ratio": 1.0}
    a = _fake_run(list(range(512)), spec, reuse, {"unique_prefix_ratio": 0.25, "unique_row_ratio": 0.5})
    del a["rounds"]["forward"]["fma peak"], a["rounds"]["fma_flops"]
    report = _report(**a)
    assert "FMA peak" not in report and "no kernel doing it" not in report
    dense = np.array(a["rounds"]["train"]["nn.EmbeddingBag sparse + SGD"])
    rate = 2 * 512**3 / np.median(a["rounds"]["forward"]["sgemm"])
    step = 3 * 512 * (0.25 * 2 * 2 * 32 * 2 * 32 + 0.5 * 2 * 4 * 32 * 4)
    assert f"doing nothing else would reach **{np.median(dense) / (step / rate):.2f}x**" in report
    assert report.split("of the sgemm's rate")[1].startswith(".")
    # the step's parts per thread against the sgemm's rate per thread (2 threads)
    from ttrec.cpu import ops

    chains = 512 * 0.25 * 2 * 2 * 32 * 2 * 32 / ops.threads_for(512) / 1e-4
    assert f"GFLOP/s, **{100 * chains / (rate / 2):.0f}%** of the sgemm's per thread); last core" in report


def test_report_memory_table_against_the_batch_output():
    """Peak transient memory over the batch output, bags x D x 4 bytes; a smoke batch's output (512 x 16
    x 4 = 32 KiB) was printed as 0.0 MiB beside its ratio."""
    spec = TTSpec.suggest(100_000, 16, 32)
    indices = list(range(0, 100_000, 100_000 // 512))[:512]
    reuse = {"unique_prefix_ratio": 1.0, "unique_row_ratio": 1.0}
    a = _fake_run(indices, spec, reuse, reuse)
    lines = _report(**a).splitlines()
    out_bytes = 512 * 16 * 4
    for m in a["mem"]:
        row = next(x for x in lines if x.startswith(f"| {m['impl']} | ") and x.endswith("| fake |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(out_bytes / 2**20, abs=1e-3) and float(cells[2]) > 0
        assert cells[3] == f"{m['peak_transient_bytes'] / out_bytes:.1f}x"


def test_useful_flops_of_the_report_count_distinct_prefixes():
    """The forward's useful FLOPs: the chain once per distinct prefix (i_1, i_2) plus the last core once
    per lookup, counted by brute force on a Zipf batch (many repeated prefixes)."""
    spec = TTSpec.suggest(100_000, 16, 32)
    _, batch, _ = build_point(_cfg(SCALES["smoke"], "native", rank=32, pooling=1, batch=2048, distribution="zipf"))
    indices = batch.indices.tolist()
    useful, _, _ = _brute_force_flops(spec, indices)
    assert len({_digits(i, spec.tt_p_shapes)[:-1] for i in indices}) < 0.9 * len(indices)  # reuse to count
    a = _fake_run(indices, spec, batch_stats(batch, spec.tt_p_shapes), {"unique_prefix_ratio": 1, "unique_row_ratio": 1})
    assert f"-> {useful:.1f} GFLOP/s" in _report(**a)


# --- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [(["--threads", "0"], "--threads: got 0"),
                                         (["--threads", str(usable_cpus() + 1)], f"--threads: got {usable_cpus() + 1}"),
                                         (["--scale", "huge"], "--scale"), (["--threads", "two"], "--threads"),
                                         (["--out", "{file}"], "--out: got")])
def test_command_line_refuses_bad_arguments_before_measuring(argv, needle, tmp_path, capsys, monkeypatch):
    """More threads than usable CPUs would time contention, not kernels; an --out that is a file
    was a FileExistsError traceback from mkdir."""
    monkeypatch.setattr(cpu_kernel, "run", lambda *a, **k: pytest.fail("measured despite a bad argument"))
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as e:
        main([x.format(file=a_file) for x in argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert a_file.read_text() == "x"


# --- the experiment itself, at smoke scale: its report against its own results file -----------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if tltorch_unavailable_reason() is not None:
        pytest.skip(str(tltorch_unavailable_reason()))
    out = tmp_path_factory.mktemp("cpu_kernel")
    cpu_kernel.run("smoke", threads=min(2, usable_cpus()), out_dir=out, log=lambda s: None)
    return pd.read_csv(out / "results.csv"), (out / "report.md").read_text()


@pytest.mark.slow
def test_smoke_report_tables_match_its_results(smoke_run):
    stored, report = smoke_run
    lines = report.splitlines()
    scale = SCALES["smoke"]
    B, D = scale["batch"], scale["table"].embedding_dim
    # lookups/s: every point's throughput is its lookups (bags x pooling) per median batch time
    metrics = stored["metric"].tolist()
    for i, m in enumerate(metrics):
        if m == "time_per_batch":  # a point's rows: time_per_batch, time_per_lookup, throughput
            t, x = stored.iloc[i], stored.iloc[i + 2]
            assert x["metric"] == "throughput" and x["label"] == t["label"]
            # lookups/s x s/batch = lookups, exactly for an odd number of timed calls; for an even
            # number the medians average the middle two times a, b: r = (a + b)(1/a + 1/b) / 4 >= 1,
            # at most its value at the quartiles (numpy's linear quantiles: for n >= 4 the middle two
            # lie within [q1, q3]; for n = 2 the quartiles give a and b back exactly). Not a fixed
            # bound: under load the middle two calls can differ several-fold.
            lookups = t["batch_size"] * int(t["pooling_factor"])
            r = x["median"] * t["median"] / 1e3 / lookups
            if t["n"] % 2:
                assert r == pytest.approx(1, rel=1e-9), (t["label"], lookups, r)
            else:
                q1, q3 = t["q1"], t["q3"]
                a, b = (q1 - (q3 - q1) / 2, q3 + (q3 - q1) / 2) if t["n"] == 2 else (q1, q3)
                hi = (a + b) ** 2 / (4 * a * b)
                if t["n"] == 2:
                    assert r == pytest.approx(hi, rel=1e-9), (t["label"], lookups, r, hi)
                else:
                    assert 1 - 1e-9 <= r <= hi * (1 + 1e-9), (t["label"], lookups, r, hi)
    # the grid's cells are the stored throughputs of its points (dense reads no rank: its own rows in turn)
    for rank in scale["ranks"]:
        for pooling in scale["poolings"]:
            row = next(x for x in lines if x.startswith(f"| {rank} | {pooling} | "))
            cells = [c.strip() for c in row.strip("|").split("|")][2:]
            sel = stored[(stored["metric"] == "throughput") & (stored["pooling_factor"] == pooling)
                         & (stored["batch_size"] == max(1, B // pooling)) & (stored["mode"] == "forward")]
            native = sel[(sel["label"] == "native") & (sel["tt_rank"] == rank)]["median"]
            assert f"{native.iloc[-1]:,.0f}" == cells[0]
            # the stream's columns, last: the points timed on the stream (stream_lookups recorded)
            for col, label in ((5, "native (batch stream)"), (6, "dense (batch stream)")):
                streamed = sel[(sel["label"] == label) & ((sel["tt_rank"] == rank) | sel["tt_rank"].isna())]
                assert (streamed["stream_lookups"] == scale["stream_lookups"]).all() and len(streamed)
                assert f"{streamed['median'].iloc[-1]:,.0f}" == cells[col]
    # peak transient memory against the batch output: bags x D x 4 bytes
    mem = stored[stored["metric"] == "peak_transient_memory"]
    for _, m in mem.iterrows():
        row = next(x for x in lines if x.startswith(f"| {m['label']} | ") and "fresh process" in x)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(B * D * 4 / 2**20, abs=1e-3)
        assert cells[3] == f"{m['median'] / (B * D * 4):.1f}x"
    # forward table: native's lookups/s over each implementation's
    fwd = stored[(stored["metric"] == "throughput") & (stored["mode"] == "forward") & (stored["tt_rank"].isna()
                                                                                       | (stored["tt_rank"] == 32))]
    first = fwd.groupby("label")["median"].first()
    for label in IMPLS:
        assert any(x.startswith(f"| {label} | ") and x.endswith(f"| {first['native'] / first[label]:.2f}x |")
                   for x in lines), label
    # the sgemm's GFLOP/s are 2 n^3 per median time of its interleaved rounds
    rounds = stored[stored["metric"] == "interleaved_round_time"]
    sg = [float(v) for v in rounds.loc[rounds["label"] == "sgemm", "note"].iloc[0].split(":")[1].split()]
    assert f"({2 * 512**3 / np.median(sg) / 1e9:.1f} GFLOP/s on" in report


@pytest.mark.slow
def test_smoke_report_phase_table_has_no_untimed_phases(smoke_run):
    """The training calls run without the forward's per-thread profile: their chains and last_core
    timers read 0 s, which is not the time those phases took; the table leaves them out."""
    _, report = smoke_run
    table = report.split("## Where the native kernel's time goes")[1]
    rows = [x for x in table.splitlines() if x.startswith("| ")]
    assert any(x.startswith("| forward (uniform) | chains |") for x in rows)
    for phase in ("chains", "last_core"):
        assert not any(x.startswith(f"| training forward (Zipf) | {phase} |") for x in rows)
    assert any(x.startswith("| training forward (Zipf) | chains_and_last_core |") for x in rows)


@pytest.mark.slow
def test_smoke_report_quartiles_of_its_rounds_are_numpys(smoke_run):
    stored, report = smoke_run
    rounds = stored[stored["metric"] == "interleaved_round_time"]
    per = {(r["label"], r["batch_size"]): np.array([float(v) for v in r["note"].split(":")[1].split()])
           for _, r in rounds.iterrows()}
    B = SCALES["smoke"]["batch"]
    dense, fused = per["nn.EmbeddingBag sparse + SGD", B], per["native fused SGD", B]
    assert f"native fused SGD: {_bracket(*_np_quartiles(dense / fused))}" in report
    for b in SCALES["smoke"]["train_batches"]:
        row = next(x for x in report.splitlines() if x.startswith(f"| {b} | "))
        d, f = per["nn.EmbeddingBag sparse + SGD", b], per["native fused SGD", b]
        assert f"| {_bracket(*_np_quartiles(d / f))} |" in row


def test_train_step_flops_scale_with_the_spec():
    """train_step_flops with every lookup distinct: 3 x lookups x (chain + last) of the spec's own chain."""
    table = dataclasses.replace(SCALES["smoke"]["table"])
    for rank in (8, 32, 64):
        spec = TTSpec.suggest(table.num_embeddings, table.embedding_dim, rank)
        (_, _, q1, r1), (_, _, q2, r2), (_, _, q3, _) = spec.core_shapes
        want = 3 * 100 * (2 * q1 * r1 * q2 * r2 + 2 * q1 * q2 * r2 * q3)
        got = train_step_flops(table, rank, 100, {"unique_prefix_ratio": 1.0, "unique_row_ratio": 1.0})
        assert math.isclose(got, want)


def test_phase_table_lists_timers_that_ran_and_names_those_not_on_the_path():
    """The d = 3 backward's phases of other paths (setup, sort, gather_grad, ... read 0 s: the kept plan
    spares the sort and chains) were rows of '0.00 ms' beside the ones that ran."""
    spec = TTSpec.suggest(100_000, 16, 32)
    indices = list(range(512))
    reuse = {"unique_prefix_ratio": 1.0, "unique_row_ratio": 1.0}
    a = _fake_run(indices, spec, reuse, reuse)
    a["phases"] = {"training backward (Zipf)": {"lookups": 512, "seconds_setup": 0.0, "seconds_sort": 0.0,
                                                "seconds_first_core": 8e-5, "seconds_i2_buckets": 2.88e-3},
                   "forward (uniform)": {"seconds_pool": 3e-6}}
    lines = _report(**a).splitlines()
    rows = [x for x in lines if x.startswith("| training backward (Zipf) |") or x.startswith("| forward (uniform) |")]
    assert rows == ["| training backward (Zipf) | first_core | 0.08 |", "| training backward (Zipf) | i2_buckets | 2.88 |",
                    "| forward (uniform) | pool | 0.00 |"]  # (a phase that ran, however briefly, keeps its row)
    note = next(x for x in lines if x.startswith("Not on these calls' paths"))
    assert "training backward (Zipf): setup, sort (" in note


@pytest.mark.slow
def test_smoke_round_and_memory_rows_carry_their_points_settings(smoke_run):
    """The interleaved rounds' and the memory probe's rows name the point they timed (mode,
    distribution, implementation, rank, fused, the batch's reuse), as the measured points' rows do:
    results.csv alone tells the uniform forward's rounds from the Zipf training step's."""
    stored, _ = smoke_run
    B = SCALES["smoke"]["batch"]
    rounds = stored[stored["metric"] == "interleaved_round_time"].set_index(["label", "batch_size"])
    want = {"native": ("tt", "forward", "uniform", False), "native fused SGD": ("tt", "train", "zipf", True),
            "native autograd + SGD": ("tt", "train", "zipf", False),
            "nn.EmbeddingBag sparse + SGD": ("dense", "train", "zipf", False)}
    for label, (impl, mode, dist, fused) in want.items():
        r = rounds.loc[(label, B)]
        assert (r["impl"], r["mode"], r["distribution"], bool(r["fused"])) == (impl, mode, dist, fused), label
        assert r["tt_rank"] == 32 if impl == "tt" else pd.isna(r["tt_rank"])
        assert 0 < r["unique_row_ratio"] <= 1
    for b in SCALES["smoke"]["train_batches"]:
        r = rounds.loc[("native fused SGD", b)]
        assert (r["mode"], r["distribution"], r["pooling_factor"]) == ("train", "zipf", 1)
    assert rounds.loc[("sgemm", B), "impl"] == "sgemm"
    mem = stored[stored["metric"] == "peak_transient_memory"].set_index("label")
    assert (mem["mode"] == "forward").all() and (mem["distribution"] == "uniform").all()
    assert (mem["batch_size"] == B).all() and (mem["pooling_factor"] == 1).all()
    assert mem.loc["native", "impl"] == "tt" and mem.loc["native", "tt_rank"] == 32
    assert mem.loc["dense", "impl"] == "dense" and pd.isna(mem.loc["dense", "tt_rank"])


def test_fake_report_gives_the_fused_steps_time_by_phase():
    """The step's phases that ran, the small ones summed, and the time outside them with its share."""
    a = _fake_run(list(range(512)), TTSpec.suggest(100_000, 16, 32), {"unique_prefix_ratio": 0.5, "unique_row_ratio": 1.0},
                  {"unique_prefix_ratio": 0.25, "unique_row_ratio": 0.5})
    text = _report(**a).split("### Where the fused step's time goes")[1].split("###")[0]
    assert "the step took **2.00 ms**" in text and "outside them **0.40 ms** (20% of the step" in text
    # beside the profile's steps (run after the rounds), the fused step's round median, not nn.EmbeddingBag's
    fused = 1e3 * statistics.median(a["rounds"]["train"]["native fused SGD"])
    assert f"(in the rounds above {fused:.2f} ms: these steps ran after them" in text
    assert ("forward sort 0.20; forward chains and last core 0.50; backward i2 buckets 0.85; backward first core 0.05; "
            "1 more below 0.5% of the step each, 0.00 together;") in text
    assert "sort radix" not in text and "pool" not in text


def test_report_warns_when_the_sgemm_ran_at_another_speed_in_the_rounds():
    """A run whose interleaved sgemm strays from its calibration (a slow stretch of the host, as in run
    2026-12-07f) is flagged in its report with both readings; a run that held its speed is not."""
    a = _fake_run(list(range(512)), TTSpec.suggest(100_000, 16, 32), {"unique_prefix_ratio": 0.5, "unique_row_ratio": 1.0},
                  {"unique_prefix_ratio": 0.25, "unique_row_ratio": 0.5})
    interleaved = a["rounds"]["sgemm_flops"] / statistics.median(a["rounds"]["forward"]["sgemm"]) / 1e9
    for calibration, flagged in ((interleaved / 0.79, True), (interleaved / 0.81, False), (interleaved, False),
                                 (interleaved / 1.24, False), (interleaved / 1.26, True)):
        a["gflops"] = {"torch.mm (a)": 1.0, "numpy.matmul (b)": calibration}
        report = _report(**a)
        assert ("Warning: the machine's speed changed during this run" in report) == flagged, calibration
        if flagged:
            assert f"{interleaved:.1f} GFLOP/s in the interleaved rounds against {calibration:.1f}" in report


def test_report_kernel_alone_lines_match_independent_computations():
    """The fused step's native calls alone (cpu_kernel.KERNEL_ALONE), timed in the training rounds: the Python
    path is the median of the rounds' differences, and its ratios to nn.EmbeddingBag are per-round medians
    and quartiles (numpy), over all rounds and by the vCPUs' state; without that step the lines are absent."""
    spec = TTSpec.suggest(100_000, 16, 32)
    reuse = {"unique_prefix_ratio": 0.25, "unique_row_ratio": 0.5}
    a = _fake_run(list(range(512)), spec, reuse, reuse)
    assert "The native calls alone" not in _report(**a)
    tr = a["rounds"]["train"]
    alone = np.random.default_rng(7).uniform(0.5e-3, 1.5e-3, len(tr["native fused SGD"]))
    tr[cpu_kernel.KERNEL_ALONE] = alone.tolist()
    lines = _report(**a).splitlines()
    fused, dense = np.array(tr["native fused SGD"]), np.array(tr["nn.EmbeddingBag sparse + SGD"])
    line = next(x for x in lines if x.startswith("The native calls alone (\""))
    assert (f"{1e3 * np.median(alone):.2f} ms against the fused step's {1e3 * np.median(fused):.2f} ms (round medians); "
            f"the Python path around the calls took **{1e3 * np.median(fused - alone):.2f} ms** a step (median of the "
            f"rounds' differences, {100 * np.median(fused - alone) / np.median(fused):.0f}% of the step). Throughput vs "
            f"nn.EmbeddingBag: {_bracket(*_np_quartiles(dense / alone))}.") in line
    split = next(x for x in lines if x.startswith("The native calls alone vs nn.EmbeddingBag by the vCPUs' state"))
    near, far = [4], [0, 1, 2, 3]  # (_fake_run's training probes)
    assert (f"near (1 rounds): {_bracket(*_np_quartiles(dense[near] / alone[near]))} (steps "
            f"{1e3 * np.median(alone[near]):.2f} against {1e3 * np.median(dense[near]):.2f} ms)") in split
    assert f"far (4 rounds): {_bracket(*_np_quartiles(dense[far] / alone[far]))}" in split
    # the product's steps' headline lines leave it out (it is no training step a user runs)
    headline = next(x for x in lines if x.startswith("Interleaved (") and "native fused SGD:" in x)
    assert cpu_kernel.KERNEL_ALONE not in headline and "the 6 steps taking turns" in headline
