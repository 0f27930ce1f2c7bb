"""CPU-kernel experiment: the native TT-EmbeddingBag kernel against every other implementation,
all in one process, reported as ratios (timings on shared machines are noisy: compare within a run).

    python -m benches.cpu_kernel [--scale paper|smoke] [--threads 2] [--out DIR]
    nox -s kernel -- --scale paper

Every point is measured by the bench app's own ``measure_point`` (same timing protocol, same tidy
rows); sgemm calibration, the cores' FMA peak (timed in the forward's interleaved rounds: the ceiling
under the sgemm, see benches.environment.fma_peak) and peak transient memory add rows of their own. Writes ``results.csv``
and ``report.md`` into the output directory (default ``outputs/cpu_kernel/<time>``) and prints the
report. Units: time in ms, throughput in lookups/s, GFLOP/s, memory in bytes/MiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .app import build_point, config_columns, measure_point, point_columns, step_for_memory_probe, upstream_gradient
from .config import (Backend, BenchConfig, ImplConfig, Impl, Mode, ModeConfig, TableConfig, TimingConfig, TTConfig,
                     WorkloadConfig, Distribution)
from .environment import capture, fma_peak, steady_heap, thread_round_trip_ns, usable_cpus
from .memory import measure_in_child
from .results import RESULTS_FILE, new_run_dir, write_rows
from .timing import Stats, measure

SCALES = {
    # rows, batch (lookups per batch at pooling 1), ranks, poolings
    "paper": dict(table=TableConfig("kaggle_largest", 10_131_227, 16), batch=65_536, ranks=(8, 16, 32, 64),
                  poolings=(1, 10, 100), target_time_s=2.0, rounds=15, block_s=0.25, train_batches=(512, 2048, 8192),
                  stream_lookups=1 << 23),
    "smoke": dict(table=TableConfig("small", 100_000, 16), batch=512, ranks=(8,), poolings=(1, 10),
                  target_time_s=0.05, rounds=3, block_s=0.01, train_batches=(64, 256), stream_lookups=2048),
}
# The training steps are timed twice: replaying one batch (the suite's default) and on a stream of distinct
# batches holding the scale's stream_lookups lookups (timing.stream_lookups; 8.4 million at paper scale, 128
# batches of 65,536), as a training run feeds the table. A replayed batch keeps nn.EmbeddingBag's touched rows in
# the caches between steps; the TT cores stay cached either way.
STREAM = " (batch stream)"  # the label suffix of a step timed on the stream
GRID_STREAMED = ("native", "dense")  # the rank x pooling grid's implementations also timed on the stream
DENSE = "nn.EmbeddingBag sparse + SGD"
FMA_PEAK = "fma peak"  # the cores' FMA loop in the forward's rounds (benches.environment.fma_peak)
# The training steps (label, implementation, config keywords), each replayed and the fused one and
# nn.EmbeddingBag also on the stream: the sequential points and the interleaved rounds alike
TRAIN_KINDS = [(label + suffix, impl, {**kw, "stream": bool(suffix)})
               for suffix in ("", STREAM)
               for label, impl, kw in (("native fused SGD", "native", {"fused": True}),
                                       ("native autograd + SGD", "native", {}), (DENSE, "dense", {}))
               if not (suffix and label == "native autograd + SGD")]


# In the training rounds only: the fused step's two native calls with every argument prepared once
# (ttrec.cpu.ops.native_calls_step), replaying the fused step's batch: the fused step less its Python path
KERNEL_ALONE = "native calls alone (fused SGD)"


def dense_of(label: str) -> str:
    """The nn.EmbeddingBag step a training step's label is compared with: the one timed the same way."""
    return DENSE + STREAM if label.endswith(STREAM) else DENSE


IMPLS = {  # label -> impl config
    "native": ImplConfig(Impl.tt, Backend.cpu),
    "reference": ImplConfig(Impl.tt, Backend.torch),
    "t3nsor": ImplConfig(Impl.t3nsor),
    "tltorch": ImplConfig(Impl.tltorch),
    "dense": ImplConfig(Impl.dense, sparse=True),
}


def _cfg(scale: dict, label: str, rank: int, pooling: int, batch: int, mode: str = "forward", fused: bool = False,
         distribution: str = "uniform", threads: int = 2, slow: bool = False, stream: bool = False) -> BenchConfig:
    target = scale["target_time_s"]
    calls = (dict(warmup=1, min_repeats=3, max_repeats=5, target_time_s=target / 2) if slow
             else dict(warmup=2, min_repeats=10, max_repeats=100, target_time_s=target))
    timing = TimingConfig(**calls, threads=threads, stream_lookups=scale["stream_lookups"] if stream else 0)
    return BenchConfig(
        impl=dataclasses.replace(IMPLS[label]), table=dataclasses.replace(scale["table"]),
        tt=TTConfig(rank=rank), timing=timing,
        workload=WorkloadConfig(distribution=Distribution(distribution), batch_size=batch, pooling_factor=pooling),
        mode=ModeConfig(name=Mode(mode), fused=fused, lr=0.01))


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, block_s: float,
                states: list[tuple[float | None, float | None]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each step, one value per round: the median of a short block of calls
    (about ``block_s``), the steps taking turns within every round (order rotated each round).
    On a machine whose speed drifts (here an sgemm read 92-173 GFLOP/s within hours on a quiet
    machine), ratios of the same round cancel the drift that a sgemm measured once, minutes before
    the kernel, would not. With ``states``, each round's thread round trip before and after it
    (ns or None, benches.environment.thread_round_trip_ns) is appended there: see round_states."""
    labels = list(steps)
    out: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(rounds):
        before = thread_round_trip_ns() if states is not None else None
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            out[k].append(measure(steps[k], warmup=1, min_repeats=3, max_repeats=50, target_time_s=block_s).median)
        if states is not None:
            states.append((before, thread_round_trip_ns()))
    return out


# A round is "near" when both its probes are at most NEAR_NS, "far" when both exceed it. On the Zen 4 VM
# the round trip reads 50-100 ns with the vCPUs near and 300-1,400 ns far; on bare metal cores that share
# an L3 answer well under 150 ns. An absolute bound, not one relative to the run's fastest probe: a run
# spent wholly far apart (run 2026-12-04k, fastest probe 329 ns) would otherwise count all its rounds near.
NEAR_NS = 150.0


def round_states(states: list[tuple[float | None, float | None]]) -> list[str | None]:
    """Per round: "near" (both probes at most NEAR_NS), "far" (both above), None (mixed, or not probed)."""
    out = []
    for a, b in states:
        if a is None or b is None:
            out.append(None)
        else:
            far = (a > NEAR_NS, b > NEAR_NS)
            out.append("far" if all(far) else "near" if not any(far) else None)
    return out


def _probed(states: list[tuple[float | None, float | None]]) -> list[float]:
    """The probes that read a value, before and after each round in turn."""
    return [x for pair in states for x in pair if x is not None]


def _split_line(what: str, describe: Callable[[list[int]], str], states: list[str | None]) -> str:
    """A headline again over the near and over the far rounds (see round_states); ``describe``
    gives it for a list of round numbers."""
    parts = []
    for state in ("near", "far"):
        picked = [r for r, s in enumerate(states) if s == state]
        parts.append(f"{state} ({len(picked)} rounds): " + (describe(picked) if picked else "none"))
    mixed = sum(s is None for s in states)
    return f"{what} by the vCPUs' state, " + "; ".join(parts) + f"; {mixed} mixed or unprobed."


def _median(rows: list[dict], metric: str) -> float:
    return next(r["median"] for r in rows if r["metric"] == metric)


def sgemm_candidates(n: int) -> dict[str, Callable[[], object]]:
    """Large fp32 GEMMs (n x n x n) by each BLAS in this process: torch.mm (torch's BLAS, MKL in the
    x86 wheels) and numpy.matmul (numpy's, OpenBLAS in its wheels). The experiment takes the faster
    as the sgemm limit: no one BLAS is fastest everywhere (on AMD CPUs MKL takes its path for
    non-Intel processors, and MKL_VERBOSE names no AVX-512 there; on the Zen 4 VM numpy's OpenBLAS
    read 176-202 GFLOP/s on 2 threads against MKL's 150-182, reports/cpu_kernel runs 2026-12-04a-b)."""
    import numpy as np
    from threadpoolctl import threadpool_info

    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()  # the same data, read by numpy's BLAS
    torch_blas = "mkl" if torch.backends.mkl.is_available() else "its BLAS"
    np_blas = next((f"{i['internal_api']} {i['version']}" for i in threadpool_info()
                    if i["user_api"] == "blas" and "numpy" in i["filepath"]), "its BLAS")
    return {f"torch.mm ({torch_blas})": lambda: torch.mm(a, b), f"numpy.matmul ({np_blas})": lambda: np.matmul(an, bn)}


def run(scale_name: str, threads: int, out_dir: Path, log=print) -> pd.DataFrame:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):  # numpy's BLAS on the threads asked for
        return _run(scale_name, threads, out_dir, log)


def _run(scale_name: str, threads: int, out_dir: Path, log=print) -> pd.DataFrame:
    scale = SCALES[scale_name]
    torch.set_num_threads(threads)
    steady_heap()  # (build_point does it too; here first, so that env records it)
    rows: list[dict] = []
    env = capture()

    def point(label, **kw):
        cfg = _cfg(scale, label, threads=threads, slow=label in ("reference", "t3nsor", "tltorch"), **kw)
        r = measure_point(cfg, experiment="cpu_kernel")
        name = label + (STREAM if kw.get("stream") else "")
        log(f"  {name:9s} {kw}: {_median(r, 'throughput'):,.0f} lookups/s")
        for x in r:
            x["label"] = name
        rows.extend(r)
        return r

    # sgemm calibration, same process: the faster of torch's and numpy's BLAS (see sgemm_candidates)
    n = 2048 if scale_name == "paper" else 512
    sgemm_flops = 2 * n**3
    candidates = sgemm_candidates(n)
    measured = {}  # candidate -> its row
    for name, fn in candidates.items():
        g = measure(fn, warmup=2, min_repeats=10, target_time_s=1.0).map(lambda s: sgemm_flops / s / 1e9)
        measured[name] = {"experiment": "cpu_kernel", "label": f"sgemm {name}", "impl": "sgemm candidate",
                          "metric": "gflops", "unit": "GFLOP/s", "median": g.median, "q1": g.q1, "q3": g.q3, "n": g.n,
                          "batch_size": n, **env}
        log(f"sgemm {n}x{n}, {name}: {g.median:.1f} GFLOP/s")
    gflops = {name: r["median"] for name, r in measured.items()}
    sgemm_name = max(gflops, key=gflops.get)
    sgemm_fn = candidates[sgemm_name]
    rows += [*measured.values(), {**measured[sgemm_name], "label": "sgemm", "impl": "sgemm",
                                  "note": f"the faster candidate: {sgemm_name}"}]

    from ttrec.cpu import ops

    B = scale["batch"]
    log("forward, R=32, uniform, pooling 1:")
    fwd = {"native": point("native", rank=32, pooling=1, batch=B)}
    phases = {"forward (uniform)": {}}  # first in the report; the profiled calls after the rounds fill it
    sort_ways = {"inference forward": ops.sort_way()}  # per key width: prefix bits here, the whole key in training
    fwd.update({label: point(label, rank=32, pooling=1, batch=B) for label in IMPLS if label != "native"})
    log("training step, R=32, Zipf(1.05) permuted, pooling 1:")
    train = {}
    for label, impl, kw in TRAIN_KINDS:
        train[label] = point(impl, rank=32, pooling=1, batch=B, mode="train", distribution="zipf", **kw)
        if label == "native fused SGD":
            sort_ways["training"] = ops.sort_way()
    log(f"headline ratios in {scale['rounds']} interleaved rounds (sgemm / native forward; training steps):")
    # the config columns of each interleaved step's rows, by (label, lookups per batch)
    columns: dict[tuple[str, int], dict] = {}

    def built(label: str, cfg: BenchConfig) -> Callable[[], object]:
        module, batch, step = build_point(cfg)
        columns[label, cfg.workload.batch_size] = point_columns(cfg, module, batch, "cpu_kernel", len(step.batches))
        return step

    native_fwd = built("native", _cfg(scale, "native", rank=32, pooling=1, batch=B, threads=threads))
    # each round's thread round trips (see interleaved); not probed with one thread: where the vCPUs sit
    # then moves no step (each round is recorded unprobed)
    fwd_states, train_states = [], []
    probe = threads > 1
    # the cores' FMA peak (benches.environment.fma_peak) taking turns with them: the ceiling under the sgemm
    # (not with more threads than CPUs: that would time their contention)
    peak = fma_peak(threads) if threads <= usable_cpus() else None
    fwd_steps = {"sgemm": sgemm_fn, "native": native_fwd, **({} if peak is None else {FMA_PEAK: peak[0]})}
    fwd_rounds = interleaved(fwd_steps, scale["rounds"], scale["block_s"], fwd_states if probe else None)
    phases["forward (uniform)"] = _median_phases(native_fwd, PROFILE_CALLS)
    train_steps = {label: built(label, _cfg(scale, impl, rank=32, pooling=1, batch=B, mode="train", distribution="zipf",
                                            threads=threads, **kw))
                   for label, impl, kw in TRAIN_KINDS}
    train_steps[KERNEL_ALONE] = kernel_alone(_cfg(scale, "native", rank=32, pooling=1, batch=B, mode="train",
                                                  distribution="zipf", threads=threads, fused=True), columns)
    train_rounds = interleaved(train_steps, scale["rounds"], scale["block_s"], train_states if probe else None)
    if not probe:
        fwd_states[:] = train_states[:] = [(None, None)] * scale["rounds"]
    step_profile = _median_step_phases(train_steps["native fused SGD"], PROFILE_CALLS)
    phases["training forward (Zipf)"], phases["training backward (Zipf)"] = step_profile["forward"], step_profile["backward"]
    step_parts = _median_step_parts(train_steps["native fused SGD"], PROFILE_CALLS)
    rows += [{**columns["native fused SGD", B], "label": "native fused SGD", "metric": "step_phase_time", "unit": "s",
              "median": seconds, "n": PROFILE_CALLS, "batch_size": B, "note": f"{call} {name}", **env}
             for call, name, seconds in _step_profile_rows(step_profile)]
    def measured_as(part: str) -> str:  # (the i2 buckets' phase is timed around both threads; the step around the call)
        return "the step, profiled" if part == "step" else "wall" if part.endswith("i2_buckets") else "per thread"

    rows += [{**columns["native fused SGD", B], "label": "native fused SGD", "metric": "step_part_time", "unit": "s",
              "median": seconds, "n": PROFILE_CALLS, "batch_size": B, "note": f"{part} ({measured_as(part)})", **env}
             for part, seconds in step_parts.items()]
    for group in (fwd_rounds, train_rounds):  # (the ratios themselves: the report, printed at the end)
        log("  round medians: " + ", ".join(f"{k} {1e3 * statistics.median(v):.3f} ms" for k, v in group.items()))
    del train_steps
    # smaller batches, as DLRM training feeds a table (per-call costs weigh more there): fused SGD
    # against nn.EmbeddingBag only, in rounds of their own
    log(f"training step by batch size ({', '.join(f'{b:,}' for b in scale['train_batches'])} lookups), "
        f"{scale['rounds']} interleaved rounds each:")
    by_batch, by_batch_reuse = {}, {}
    for b in scale["train_batches"]:
        points = {label: built(label, _cfg(scale, impl, rank=32, pooling=1, batch=b, mode="train", distribution="zipf",
                                           threads=threads, **kw))
                  for label, impl, kw in TRAIN_KINDS if not label.startswith("native autograd")}
        fused = columns["native fused SGD", b]  # (the same batch for both steps)
        by_batch_reuse[b] = {k: fused[k] for k in ("unique_row_ratio", "unique_prefix_ratio")}
        by_batch[b] = interleaved(points, scale["rounds"], scale["block_s"])
        del points
        log(f"  {b:,}: " + ", ".join(f"{k} {1e3 * statistics.median(v):.3f} ms" for k, v in by_batch[b].items()))
    rounds = {"n": scale["rounds"], "sgemm_flops": sgemm_flops, "forward": fwd_rounds, "train": train_rounds,
              "fma_flops": None if peak is None else peak[1],
              "step_profile": step_profile, "step_parts": step_parts,
              "train_by_batch": by_batch, "train_by_batch_reuse": by_batch_reuse,
              "forward_states": fwd_states, "train_states": train_states}
    if peak is not None:
        rate = _peak_rate(rounds) / 1e9
        rows.append({"experiment": "cpu_kernel", "label": FMA_PEAK, "impl": FMA_PEAK, "metric": "gflops",
                     "unit": "GFLOP/s", "median": rate, "n": len(fwd_rounds[FMA_PEAK]), "batch_size": B,
                     "note": f"median of {len(fwd_rounds[FMA_PEAK])} interleaved rounds; {peak[1]:.6g} FLOPs per call",
                     **env})
        log(f"FMA peak (interleaved): {rate:.1f} GFLOP/s")
    for batch, group in [(B, {**fwd_rounds, **train_rounds}), *by_batch.items()]:
        for label, times in group.items():
            rows.append({**columns.get((label, batch), {"experiment": "cpu_kernel", "impl": label}), "label": label,
                         "metric": "interleaved_round_time", "unit": "s", "median": statistics.median(times),
                         "n": len(times), "batch_size": batch,
                         "note": "per-round medians: " + " ".join(f"{t:.6g}" for t in times), **env})
    for label, probes in (("forward rounds", fwd_states), ("training rounds", train_states)):
        measured = _probed(probes)
        rows.append({"experiment": "cpu_kernel", "label": label, "impl": "probe", "metric": "thread_round_trip",
                     "unit": "ns", "median": statistics.median(measured) if measured else None, "n": len(measured),
                     "batch_size": B, "note": "per-round probes before/after: " + " ".join(
                         "/".join("None" if x is None else f"{x:.1f}" for x in pair) for pair in probes), **env})
    log("ranks x poolings (lookups per batch held at the batch size):")
    grid = []
    for rank in scale["ranks"]:
        for pooling in scale["poolings"]:
            for label, kw in [(label, {}) for label in IMPLS] + [(label, {"stream": True}) for label in GRID_STREAMED]:
                r = point(label, rank=rank, pooling=pooling, batch=max(1, B // pooling), **kw)
                grid.append({"rank": rank, "pooling": pooling, "impl": r[0]["label"], "lookups/s": _median(r, "throughput")})

    log("peak transient memory of one forward (fresh child process each):")
    mem = []
    for label in IMPLS:
        cfg = _cfg(scale, label, rank=32, pooling=1, batch=B, threads=threads)
        value, note = measure_in_child(step_for_memory_probe, cfg)
        out_bytes = B * scale["table"].embedding_dim * 4
        mem.append({"impl": label, "peak_transient_bytes": value, "output_bytes": out_bytes, "note": note})
        rows.append({**config_columns(cfg, "cpu_kernel"), "label": label, "metric": "peak_transient_memory",
                     "unit": "bytes", "median": value, "n": 1, "note": note, **env})
        log(f"  {label}: {value} bytes ({note})")

    env["sort_way"] = ", ".join(f"{k} {v}" for k, v in sort_ways.items())
    write_rows(rows, out_dir / RESULTS_FILE)
    report = _report(scale_name, scale, threads, gflops, sgemm_name, fwd, train, grid, mem, env, phases, rounds)
    (out_dir / "report.md").write_text(report)
    log(report)
    return pd.DataFrame(rows)


def kernel_alone(cfg: BenchConfig, columns: dict[tuple[str, int], dict]) -> Callable[[], None]:
    """The KERNEL_ALONE step of the fused training point ``cfg``: its module's cores (a module of its own,
    built as the fused step's, so the same cores and batch), its batch through make_bags once, its upstream
    gradient; records the point's columns under KERNEL_ALONE in ``columns``."""
    from ttrec.bags import make_bags
    from ttrec.cpu import ops

    module, batch, step = build_point(cfg)
    columns[KERNEL_ALONE, cfg.workload.batch_size] = point_columns(cfg, module, batch, "cpu_kernel", len(step.batches))
    bags = make_bags(batch.indices, batch.offsets, batch.per_sample_weights, num_embeddings=module.num_embeddings,
                     mode=module.mode)
    return ops.native_calls_step(module._core_list(), module.spec, bags, module.mode, upstream_gradient(step.batches, cfg),
                                 module.learning_rate)


PROFILE_CALLS = 30  # native forwards, and fused training steps, whose phase timers give the profiles (medians per phase)
# timed only with ops.set_profile(True), per thread: the forward's chains and last core, the backward's parts
# of its i2 buckets (the backward's last_core is a phase of its own, d = 2 and 4, always timed)
PROFILED_PHASES = {"forward": ("seconds_chains", "seconds_last_core"),
                   "backward": ("seconds_buckets_gather", "seconds_buckets_rows", "seconds_buckets_gemms")}


def _unprofiled(stats: dict[str, float], call: str) -> dict[str, float]:
    """A native ``call``'s ("forward", "backward") phase timers without those its profile was off for (they
    read 0 s, not the time taken)."""
    return {k: v for k, v in stats.items() if k not in PROFILED_PHASES[call]}


def _timed_calls(step: Callable[[], object], calls: int, read: Callable[[], dict]) -> list[dict]:
    """``calls`` calls of ``step``, each timed around it: per call, ``read()`` right after it (the native
    calls' phase timers) with ``seconds_call``, the call's time."""
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        step()
        t = time.perf_counter() - t0
        samples.append({**read(), "seconds_call": t})
    return samples


def _medians(samples: list[dict]) -> dict[str, float]:
    """The median of each key over the samples."""
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def _median_phases(step: Callable[[], object], calls: int) -> dict[str, float]:
    """The native forward's own phase timers with its per-thread profile on (ops.set_profile), median
    per phase over ``calls`` calls of ``step``, and ``seconds_call``: the median time of those calls,
    timed around ``step``."""
    from ttrec.cpu import ops

    ops.set_profile(True)
    try:
        return _medians(_timed_calls(step, calls, lambda: ops.last_stats("forward")))
    finally:
        ops.set_profile(False)


# The kernel's top-level phases, whose timers follow one another within a call (the forward's chains,
# last_core and sort_radix lie within chains_and_last_core and sort; every backward phase is top-level)
FORWARD_TOP_PHASES = ("sort", "chains_and_last_core", "pool")


def _median_step_phases(step: Callable[[], object], calls: int) -> dict:
    """Where a native fused training step's time goes, over ``calls`` calls of ``step`` (its
    per-thread profile off, as in the timed steps): ``forward`` and ``backward``, the medians of the two
    native calls' phase timers; ``step``, the median time of the steps, timed around ``step``; and
    ``outside``, the median over the steps of each one's time outside the two calls' top-level phases
    (the Python path: module, bag checks, autograd, the update's checks; and each call's entry and exit)."""
    from ttrec.cpu import ops

    samples = _timed_calls(step, calls, lambda: {call: _unprofiled(ops.last_stats(call), call)
                                                 for call in ("forward", "backward")})
    outside = [s["seconds_call"] - sum(s["forward"][f"seconds_{p}"] for p in FORWARD_TOP_PHASES)
               - sum(v for k, v in s["backward"].items() if k.startswith("seconds_")) for s in samples]
    return {"forward": _medians([s["forward"] for s in samples]), "backward": _medians([s["backward"] for s in samples]),
            "step": statistics.median(s["seconds_call"] for s in samples), "outside": statistics.median(outside)}


# The parts of a fused step that the kernel's per-thread profile times (d = 3): (call, phase)
STEP_PARTS = (("forward", "chains"), ("forward", "last_core"), ("backward", "i2_buckets"), ("backward", "buckets_gather"),
              ("backward", "buckets_rows"), ("backward", "buckets_gemms"))


def _median_step_parts(step: Callable[[], object], calls: int) -> dict[str, float]:
    """The fused step's parts per thread with the kernel's profile on (ops.set_profile; its clock reads make
    the step a little longer): over ``calls`` calls of ``step``, the median of each STEP_PARTS timer, keyed
    "<call> <phase>" (the chains, the last core and the bucket parts per thread, the mean over the threads;
    the i2 buckets' phase as a whole, wall time), and "step", the median step time."""
    from ttrec.cpu import ops

    def read() -> dict[str, float]:
        stats = {call: ops.last_stats(call) for call in ("forward", "backward")}
        return {f"{call} {phase}": stats[call][f"seconds_{phase}"] for call, phase in STEP_PARTS}

    ops.set_profile(True)
    try:
        parts = _medians(_timed_calls(step, calls, read))
    finally:
        ops.set_profile(False)
    parts["step"] = parts.pop("seconds_call")
    return parts


def _step_profile_rows(profile: dict) -> list[tuple[str, str, float]]:
    """(call, phase, seconds) of a step profile (_median_step_phases): its top-level phases that ran
    (a timer reading 0 s is off the call's path), then the step and the time outside the phases."""
    out = [("forward", p, profile["forward"][f"seconds_{p}"]) for p in FORWARD_TOP_PHASES]
    out += [("backward", k[len("seconds_"):], v) for k, v in profile["backward"].items() if k.startswith("seconds_")]
    return [r for r in out if r[2] > 0] + [("step", "total", profile["step"]), ("step", "outside_phases", profile["outside"])]


def _gap_lines(phases: dict[str, float], sgemm: float, threads: int, chain_flops: float, last_flops: float,
               lookups: int, peak: float | None = None) -> list[str]:
    """Where a forward's time goes against the 60% target: the chains' and the last core's rates per
    thread (their own timers) against the sgemm's rate per thread (and the cores' FMA peak per thread,
    ``peak`` GFLOP/s on ``threads`` threads, when timed), and the time budget."""
    from ttrec.cpu import ops

    per_thread = sgemm / threads
    kt = ops.threads_for(lookups)  # the threads the kernel ran (fewer than asked on small batches)
    t_chain, t_last = phases.get("seconds_chains", 0.0), phases.get("seconds_last_core", 0.0)
    if t_chain <= 0 or t_last <= 0:
        return ["", "(The kernel's per-thread chain and last-core timers read 0: no d = 3 plan ran.)"]
    t_forward = phases["seconds_call"]
    chain_rate = chain_flops / kt / t_chain / 1e9
    last_rate = last_flops / kt / t_last / 1e9
    budget = (chain_flops + last_flops) / (0.6 * sgemm * 1e9)
    chains_at_sgemm = chain_flops / (sgemm * 1e9)

    def of_peak(rate: float) -> str:
        return "" if peak is None else f" and {100 * rate / (peak / threads):.0f}% of the FMA peak's"
    return [
        "", "### Where the gap to the sgemm goes",
        "",
        f"From the median phase timers of {PROFILE_CALLS} native forwards right after the interleaved rounds "
        "(the machine may be in another state than in the rounds above), "
        f"against the sgemm's interleaved median ({sgemm:.1f} GFLOP/s on {_threads(threads)}, {per_thread:.1f} per "
        f"thread); the kernel ran {_threads(kt)}:",
        "",
        f"- chain GEMMs: {chain_flops / 1e6:.0f} MFLOP in {1e3 * t_chain:.2f} ms per thread = {chain_rate:.1f} GFLOP/s "
        f"per thread, **{100 * chain_rate / per_thread:.0f}%** of the sgemm's rate per thread{of_peak(chain_rate)};",
        f"- last core: {last_flops / 1e6:.0f} MFLOP ({lookups:,} rows) in {1e3 * t_last:.2f} ms per thread = "
        f"{last_rate:.1f} GFLOP/s per thread (**{100 * last_rate / per_thread:.0f}%**{of_peak(last_rate)}), "
        f"{1e9 * t_last * kt / lookups:.1f} ns per row and thread;",
        f"- sort phase {1e3 * phases['seconds_sort']:.2f} ms (radix passes {1e3 * phases['seconds_sort_radix']:.2f}; "
        f"the rest: the search for runs or middle-digit buckets, and the last-core slices; a forward that keeps no plan "
        f"finds each bucket's prefixes in the chains-and-last-core phase, outside its two parts); "
        f"pooling {1e3 * phases['seconds_pool']:.2f} ms;",
        f"- the whole call {1e3 * t_forward:.2f} ms (median of the same calls), of which the kernel's phases "
        f"{1e3 * (phases['seconds_sort'] + phases['seconds_chains_and_last_core'] + phases['seconds_pool']):.2f} ms; "
        "the rest is the Python call and the bag checks.",
        "",
        f"The 60% target needs a forward of {1e3 * budget:.2f} ms at this sgemm. The chains alone at the sgemm's rate "
        f"take {1e3 * chains_at_sgemm:.2f} ms, which leaves {1e3 * (budget - chains_at_sgemm):.2f} ms for the sort, "
        f"the last core and the rest; they took {1e3 * (t_forward - t_chain):.2f} ms here.",
    ]


def forward_work(table: TableConfig, rank: int, lookups: int, reuse: dict[str, float]) -> tuple[float, float]:
    """The FLOPs of a training forward's two parts with the reuse the native kernel exploits: (the prefix
    chains, once per distinct prefix; the last core's step, once per distinct row). The backward does twice
    each (a product's two operand gradients cost what the product did; a row's repeats are summed before
    them). ``reuse``: the batch's unique_prefix_ratio and unique_row_ratio (ttrec.workloads.batch_stats)."""
    chain, last = _chain_flops(table, rank)
    return reuse["unique_prefix_ratio"] * lookups * chain, reuse["unique_row_ratio"] * lookups * last


def train_step_flops(table: TableConfig, rank: int, lookups: int, reuse: dict[str, float]) -> float:
    """The arithmetic of one TT training step: the forward's (forward_work) and twice it in the backward.
    The update itself adds a few FLOPs per touched core entry: left out."""
    return 3 * sum(forward_work(table, rank, lookups, reuse))


# The interleaved sgemm's rate against its sequential calibration, outside which a run is flagged: the
# 43 stored runs whose reports give both (AMD EPYC and Intel Xeon VMs, to 2026-12-07g) read 0.91-1.10 but
# run 2026-12-07f, 0.47 (a slow stretch of the host during its forward rounds)
SPEED_CHANGE = (0.8, 1.25)


def _speed_change_lines(sequential: float, interleaved: float) -> list[str]:
    """A warning when the sgemm's interleaved rate (GFLOP/s) strays from its sequential calibration by more
    than SPEED_CHANGE allows: the machine's speed changed during the run; else nothing."""
    ratio = interleaved / sequential
    if SPEED_CHANGE[0] <= ratio <= SPEED_CHANGE[1]:
        return []
    return ["", f"**Warning: the machine's speed changed during this run.** The sgemm ran at {interleaved:.1f} GFLOP/s in "
            f"the interleaved rounds against {sequential:.1f} in its calibration before them ({ratio:.2f}x; runs read "
            f"{SPEED_CHANGE[0]}-{SPEED_CHANGE[1]}x when the machine holds its speed): a slow stretch of a VM's host, "
            "another load, or a change of clock. Its forward shares do not show the kernel's usual standing (the "
            "kernel and the sgemm need not slow alike); run the experiment again."]


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _probe_intro(fastest: float | None) -> str:
    if fastest is None:
        return ("(The rounds were not probed for the threads' round trip: one thread, fewer than two CPUs or no "
                "native kernel.)")
    return (f"Each round is probed before and after for the round trip of a cache line between two threads "
            f"(benches.environment.thread_round_trip_ns; on a VM it shows whether the hypervisor has put the two vCPUs "
            f"near each other or far apart): fastest probe of this run {fastest:.0f} ns; a round is far when both its "
            f"probes exceed {NEAR_NS:.0f} ns, near when neither does.")


def _peak_rate(rounds: dict) -> float | None:
    """The cores' FMA peak in FLOP/s over the forward's interleaved rounds (median), None if not timed."""
    times = rounds["forward"].get(FMA_PEAK)
    return rounds["fma_flops"] / statistics.median(times) if times and rounds.get("fma_flops") else None


def _peak_lines(rounds: dict, peak: float | None, useful: float, threads: int) -> list[str]:
    """The forward's rounds against the cores' FMA peak timed in them (``peak``, FLOP/s: _peak_rate;
    nothing when it was not timed)."""
    if peak is None:
        return []
    fwd = rounds["forward"]
    peaks = [rounds["fma_flops"] / t for t in fwd[FMA_PEAK]]  # per round, FLOP/s
    sgemm_share = _round_ratios([rounds["sgemm_flops"] / t for t in fwd["sgemm"]], peaks)
    native_share = _round_ratios([useful / t for t in fwd["native"]], peaks)
    return ["", f"The cores' FMA peak, timed in the same rounds (the native kernel's 16-float fused multiply-adds on "
            f"independent accumulators in registers, {_threads(threads)} together, no memory traffic; "
            f"benches.environment.fma_peak): **{peak / 1e9:.1f} GFLOP/s**, the ceiling of any GEMM here. Per-round "
            "ratios, median [quartiles]: the sgemm ran at **{:.0f}%** [{:.0f}–{:.0f}%] of it, ".format(
                *(100 * x for x in sgemm_share))
            + "the native forward's useful FLOPs at **{:.0f}%** [{:.0f}–{:.0f}%].".format(*(100 * x for x in native_share))]


def _round_ratios(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios num[r] / den[r], as every quartile of the suite
    (benches.timing.Stats: linear interpolation between order statistics, numpy's default), so they
    lie within the rounds' ratios (statistics' default "exclusive" method put the quartiles of two
    rounds outside both)."""
    s = Stats.of([x / y for x, y in zip(num, den)])
    return s.median, s.q1, s.q3


def _vs_dense(times: dict[str, list[float]], key: str, picked: list[int] | None = None, with_times: bool = False) -> str:
    """Step ``key``'s throughput against nn.EmbeddingBag timed the same way (:func:`dense_of`), from
    per-round times: "**median x** [quartiles]" of the per-round ratios over the rounds picked (all by
    default), with ``with_times`` also both steps' median times."""
    rounds = range(len(times[key])) if picked is None else picked
    dense, step = [times[dense_of(key)][r] for r in rounds], [times[key][r] for r in rounds]
    out = "**{:.2f}x** [{:.2f}–{:.2f}]".format(*_round_ratios(dense, step))
    if with_times:
        out += f" (steps {1e3 * statistics.median(step):.2f} against {1e3 * statistics.median(dense):.2f} ms)"
    return out


def _kernel_alone_lines(tr: dict[str, list[float]], states: list[str | None]) -> list[str]:
    """The fused step against its two native calls alone (KERNEL_ALONE) in the same rounds: the Python
    path's share, and the calls alone against nn.EmbeddingBag, over all rounds and by the vCPUs' state."""
    fused, alone = statistics.median(tr["native fused SGD"]), statistics.median(tr[KERNEL_ALONE])
    extra = [f - a for f, a in zip(tr["native fused SGD"], tr[KERNEL_ALONE])]
    return [f"The native calls alone (\"{KERNEL_ALONE}\": the fused step's forward and backward calls with every argument "
            "prepared once, ttrec.cpu.ops.native_calls_step; no module, make_bags, autograd or per-call checks), in the "
            f"same rounds: {1e3 * alone:.2f} ms against the fused step's {1e3 * fused:.2f} ms (round medians); the Python "
            f"path around the calls took **{1e3 * statistics.median(extra):.2f} ms** a step (median of the rounds' "
            f"differences, {100 * statistics.median(extra) / fused:.0f}% of the step). Throughput vs nn.EmbeddingBag: "
            + _vs_dense(tr, KERNEL_ALONE) + ".",
            "", _split_line("The native calls alone vs nn.EmbeddingBag", lambda picked: _vs_dense(
                tr, KERNEL_ALONE, picked, with_times=True), states)]


def _report(scale_name, scale, threads, gflops, sgemm_name, fwd, train, grid, mem, env, phases, rounds) -> str:
    tp = {k: _median(v, "throughput") for k, v in fwd.items()}
    sgemm = gflops[sgemm_name]
    probes = _probed(rounds["forward_states"] + rounds["train_states"])
    fastest = min(probes) if probes else None
    fwd_states, train_states = (round_states(rounds[k]) for k in ("forward_states", "train_states"))
    nat = fwd["native"][0]
    spec_prefix, spec_last = _chain_flops(scale["table"], 32)
    lookups = scale["batch"]
    chain_flops, last_flops = nat["unique_prefix_ratio"] * lookups * spec_prefix, lookups * spec_last
    useful = chain_flops + last_flops
    t_native = _median(fwd["native"], "time_per_batch") / 1e3
    useful_gflops = useful / t_native / 1e9
    peak = _peak_rate(rounds)  # FLOP/s, or None: the run timed no FMA peak
    sgemm_rate = rounds["sgemm_flops"] / statistics.median(rounds["forward"]["sgemm"])  # FLOP/s, interleaved
    t = scale["table"]
    lines = [
        f"# CPU kernel experiment ({scale_name} scale)",
        "",
        f"Table {t.num_embeddings:,} x {t.embedding_dim} (p, q suggested: {nat['tt_p_shapes']}, {nat['tt_q_shapes']}), "
        f"fp32, batch {lookups:,} lookups, {_threads(threads)}, {env['cpu_model']} ({env['cpu_count']} CPUs, {env['cpu_isa']}), "
        f"torch {env['torch']}, commit {env['git_sha'][:10]}{' (dirty)' if env['git_dirty'] == 'True' else ''}.",
        "Medians of repeated calls in one process; ratios are of medians.",
        f"Heap: {env.get('malloc', 'not recorded')} (benches.environment.steady_heap; README, Configuration).",
        f"The native kernel's sort ways: {env.get('sort_way', 'not recorded')} "
        "(chosen per key width by timing both on its first calls; README, native CPU kernel).",
        "",
        "## Forward, R = 32, uniform indices, pooling 1",
        "",
        "| implementation | time per batch (ms) | lookups/s | native speed-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, v in fwd.items():
        lines.append(f"| {k} | {_median(v, 'time_per_batch'):.2f} | {tp[k]:,.0f} | {tp['native'] / tp[k]:.2f}x |")
    lines += [
        "",
        f"Unique prefixes in the batch: {nat['unique_prefix_ratio']:.3f} of lookups; unique rows: {nat['unique_row_ratio']:.3f}.",
        f"Useful FLOPs (prefix chains of unique prefixes + last core per lookup): {useful / 1e6:.0f} MFLOP per batch -> "
        f"{useful_gflops:.1f} GFLOP/s = **{100 * useful_gflops / sgemm:.0f}%** of a {2048 if scale_name == 'paper' else 512}^3 "
        f"sgemm measured in this run ({sgemm:.1f} GFLOP/s, {sgemm_name}: the faster of "
        + ", ".join(f"{k} {v:.1f}" for k, v in gflops.items()) + " GFLOP/s).",
        "",
        f"Interleaved ({rounds['n']} rounds of sgemm and the native forward taking turns; per-round ratios, "
        "median [quartiles]): useful FLOPs = **{:.0f}%** [{:.0f}–{:.0f}%] of the sgemm's GFLOP/s.".format(
            *(100 * x for x in _round_ratios([useful / t for t in rounds["forward"]["native"]],
                                              [rounds["sgemm_flops"] / t for t in rounds["forward"]["sgemm"]]))),
        *_speed_change_lines(sgemm, sgemm_rate / 1e9),
        *_peak_lines(rounds, peak, useful, threads),
        "",
        _probe_intro(fastest),
        _split_line("Useful FLOPs / sgemm", lambda picked: "**{:.0f}%** [{:.0f}–{:.0f}%]".format(*(100 * x for x in _round_ratios(
            [useful / rounds["forward"]["native"][r] for r in picked],
            [rounds["sgemm_flops"] / rounds["forward"]["sgemm"][r] for r in picked]))), fwd_states),
        *_gap_lines(phases["forward (uniform)"], sgemm_rate / 1e9,
                    threads, chain_flops, last_flops, lookups, None if peak is None else peak / 1e9),
        "",
        "## Training step (forward + backward + SGD), R = 32, Zipf(1.05) scattered by a permutation, pooling 1",
        "",
        "| implementation | time per step (ms) | lookups/s | vs nn.EmbeddingBag |",
        "| --- | ---: | ---: | ---: |",
    ]
    tr = rounds["train"]
    for k, v in train.items():  # (each against nn.EmbeddingBag timed the same way: replayed, or on the stream)
        lines.append(f"| {k} | {_median(v, 'time_per_batch'):.2f} | {_median(v, 'throughput'):,.0f} | "
                     f"{_median(v, 'throughput') / _median(train[dense_of(k)], 'throughput'):.2f}x |")
    replayed = [k for k in tr if not k.endswith(STREAM) and k not in (DENSE, KERNEL_ALONE)]  # (the calls alone: below)
    streamed = [k for k in tr if k.endswith(STREAM) and k != DENSE + STREAM]
    k_stream = int(train["native fused SGD" + STREAM][0]["timed_batches"])  # (benches.app.stream_length)

    def ratios(keys: list[str]) -> str:
        return "; ".join(f"{k}: " + _vs_dense(tr, k) for k in keys)
    lines += ["", f"Interleaved ({rounds['n']} rounds, the {len(tr)} steps taking turns; throughput vs nn.EmbeddingBag "
              "timed the same way, per-round ratios, median [quartiles]): " + ratios(replayed) + ".",
              "", f"The steps marked \"{STREAM.strip()}\" take {k_stream:,} distinct batches of the workload in turn "
              f"({k_stream * lookups:,} lookups; timing.stream_lookups), as a training run feeds the table; the others "
              f"replay one batch, which keeps the rows it touches in the caches from step to step (nn.EmbeddingBag's "
              f"table rows; the TT cores stay cached either way). On the stream: " + ratios(streamed) + "."]

    def by_state(picked: list[int]) -> str:
        return ", ".join(f"{name} " + _vs_dense(tr, key, picked, with_times=True)
                         for key, name in (("native fused SGD", "fused SGD"), ("native fused SGD" + STREAM, "on the stream")))
    lines += ["", _split_line("Training step vs nn.EmbeddingBag", by_state, train_states)]
    if KERNEL_ALONE in tr:
        lines += ["", *_kernel_alone_lines(tr, train_states)]
    # each step in its quickest round: on a VM whose state swings (where the vCPUs sit, see
    # round_states; nn.EmbeddingBag's step swings most), the ratio when both run in its quickest state
    best = {k: min(v) for k, v in tr.items()}
    lines += ["", f"Each step in its fastest round of the {rounds['n']} (the machine's quietest state for it): " + "; ".join(
        f"{k} {1e3 * best[k]:.2f} ms" for k in tr) + ". Throughput vs nn.EmbeddingBag, fastest rounds: " + "; ".join(
        f"{k}: **{best[dense_of(k)] / best[k]:.2f}x**" for k in replayed + streamed) + "."]
    # the step's arithmetic at the cores' FMA peak (the least time any kernel doing it needs: against
    # nn.EmbeddingBag's step, the most such a kernel could reach here) and at the sgemm's rate (what a
    # kernel whose GEMMs ran at the sgemm's speed, and which did nothing else, would reach)
    dense_rounds = tr[DENSE]
    fused_row = train["native fused SGD"][0]
    step_flops = train_step_flops(t, 32, lookups, fused_row)
    floor = step_flops / sgemm_rate
    fused_med = statistics.median(tr["native fused SGD"])

    def bounds(at: float, bold: bool) -> str:
        """nn.EmbeddingBag's steps (round median, fastest round; replayed, then on the stream) over ``at`` seconds."""
        b = "**" if bold else ""
        return (f"{b}{statistics.median(dense_rounds) / at:.2f}x{b} and {b}{best[DENSE] / at:.2f}x{b} replayed, "
                f"{b}{statistics.median(tr[DENSE + STREAM]) / at:.2f}x{b} and {b}{best[DENSE + STREAM] / at:.2f}x{b} "
                "on the stream")

    lines += ["", "### The training step's arithmetic against the " + ("sgemm" if peak is None else "FMA peak and the sgemm"), "",
              f"Distinct prefixes {fused_row['unique_prefix_ratio']:.3f} and distinct rows {fused_row['unique_row_ratio']:.3f} "
              f"of the batch's lookups: the prefix chains once per distinct prefix and the last core once per distinct row "
              f"in the forward, twice each in the backward = {step_flops / 1e6:.0f} MFLOP per step. nn.EmbeddingBag's step "
              f"took {1e3 * statistics.median(dense_rounds):.2f} ms replaying its batch (round median; "
              f"{1e3 * best[DENSE]:.2f} ms in its fastest round) and {1e3 * statistics.median(tr[DENSE + STREAM]):.2f} ms "
              f"on the stream ({1e3 * best[DENSE + STREAM]:.2f} ms)."
              + ("" if peak is None else
                 f" At the cores' FMA peak ({peak / 1e9:.1f} GFLOP/s, in the forward's rounds) that arithmetic alone takes "
                 f"**{1e3 * step_flops / peak:.2f} ms**: no kernel doing it can pass {bounds(step_flops / peak, True)}.")
              + f" At the sgemm's interleaved rate ({sgemm_rate / 1e9:.1f} GFLOP/s) it takes **{1e3 * floor:.2f} ms**: a "
              f"kernel running it at the sgemm's rate and doing nothing else would reach {bounds(floor, peak is None)}. "
              f"The fused step ({1e3 * fused_med:.2f} ms round median) ran it at {step_flops / fused_med / 1e9:.1f} GFLOP/s, "
              f"**{100 * floor / fused_med:.0f}%** of the sgemm's rate"
              + ("." if peak is None else f" and **{100 * step_flops / peak / fused_med:.0f}%** of the peak.")]
    lines += ["", *_step_lines(rounds["step_profile"], floor, statistics.median(dense_rounds), fused_med)]
    if rounds.get("step_parts"):
        lines += ["", *_step_part_lines(rounds["step_parts"], t, lookups, fused_row,
                                        (peak, "the FMA peak's") if peak is not None else (sgemm_rate, "the sgemm's"),
                                        threads)]
    lines += ["", "### Training step by batch size (fused SGD vs nn.EmbeddingBag sparse + SGD)", "",
              f"Smaller batches, as DLRM training feeds one table; {rounds['n']} interleaved rounds per batch size "
              "(the four steps taking turns: each replaying one batch and on a stream of distinct batches holding "
              f"{scale['stream_lookups']:,} lookups), medians of the per-round times and of the per-round ratios "
              "[quartiles]. Arithmetic at the sgemm's rate: the step's FLOPs as above, at the sgemm's interleaved rate.", "",
              "| lookups per batch | native fused SGD (ms) | nn.EmbeddingBag (ms) | throughput vs nn.EmbeddingBag | "
              "on the stream: fused (ms) | nn.EmbeddingBag (ms) | throughput | arithmetic at the sgemm's rate (ms) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b, r in rounds["train_by_batch"].items():
        b_floor = train_step_flops(t, 32, b, rounds["train_by_batch_reuse"][b]) / sgemm_rate
        cells = [f"{1e3 * statistics.median(r[key]):.3f} | {1e3 * statistics.median(r[dense_of(key)]):.3f} | "
                 + _vs_dense(r, key) for key in ("native fused SGD", "native fused SGD" + STREAM)]
        lines.append(f"| {b:,} | " + " | ".join(cells) + f" | {1e3 * b_floor:.3f} |")
    g = pd.DataFrame(grid).pivot_table(index=["rank", "pooling"], columns="impl", values="lookups/s")
    g = g[[c for c in [*IMPLS, *(label + STREAM for label in GRID_STREAMED)] if c in g.columns]]
    lines += ["", "## Lookups/s by rank and pooling factor (forward; batch = lookups / pooling)", "",
              "Each point replays one batch (the suite's default), which keeps nn.EmbeddingBag's rows in the caches "
              "from call to call (the TT cores stay cached either way); the columns marked \"" + STREAM.strip() + "\" "
              "time the same forwards on a stream of distinct batches holding " + f"{scale['stream_lookups']:,} lookups, "
              "as the training step's above.", "",
              "| rank | pooling | " + " | ".join(g.columns) + " |", "| --- | --- |" + " ---: |" * len(g.columns)]
    for (rank, pooling), row in g.iterrows():
        lines.append(f"| {rank} | {pooling} | " + " | ".join(f"{v:,.0f}" for v in row.values) + " |")
    lines += ["", "## Peak transient memory of one forward (R = 32, pooling 1)", "",
              "| implementation | peak transient (MiB) | batch output (MiB) | ratio | how |", "| --- | ---: | ---: | ---: | --- |"]
    for m in mem:
        v, ob = m["peak_transient_bytes"], m["output_bytes"]
        ratio = "n/a" if v is None else f"{v / ob:.1f}x"
        lines.append(f"| {m['impl']} | {'n/a' if v is None else _mib(v)} | {_mib(ob)} | {ratio} | {m['note']} |")
    lines += ["", f"## Where the native kernel's time goes (its own phase timers: medians over {PROFILE_CALLS} calls of the "
              "uniform forward and of the fused training step)", "",
              "Forward parts: chains and last_core lie within chains_and_last_core (per thread: the mean over the "
              "threads; timed only in the profiled uniform forward), sort_radix within sort.", "",
              "| call | phase | ms |", "| --- | --- | ---: |"]
    not_run = {}  # a timer that reads exactly 0 s: its phase is not on this call's path
    for call, st in phases.items():
        for key, value in st.items():
            if key.startswith("seconds_"):
                if value == 0:
                    not_run.setdefault(call, []).append(key[len("seconds_"):])
                    continue
                lines.append(f"| {call} | {key[len('seconds_'):]} | {value * 1e3:.2f} |")
    if not_run:
        lines += ["", "Not on these calls' paths (their timers read 0 s): " + "; ".join(
            f"{call}: {', '.join(names)}" for call, names in not_run.items()) + " (the d = 3 backward reuses the "
            "sort and prefix chains its forward kept, and has no per-core phases of its own before the i2 buckets)."]
    return "\n".join(lines) + "\n"


def _step_lines(profile: dict, floor: float, dense: float, fused: float) -> list[str]:
    """The fused step's time by phase (a step profile, see _median_step_phases) against its arithmetic
    at the sgemm's rate (``floor``, seconds), nn.EmbeddingBag's step and the fused step in the rounds (their
    round medians, seconds: the profile's steps run after the rounds, in whatever state the machine is then)."""
    step, outside = profile["step"], profile["outside"]
    phases = [(call, name, v) for call, name, v in _step_profile_rows(profile) if call != "step"]
    small = [v for *_, v in phases if v < 0.005 * step]  # (listed in the phase table below)
    parts = "; ".join(f"{call} {name.replace('_', ' ')} {1e3 * v:.2f}" for call, name, v in phases if v >= 0.005 * step)
    if small:
        parts += f"; {len(small)} more below 0.5% of the step each, {1e3 * sum(small):.2f} together"
    return ["### Where the fused step's time goes", "",
            f"Medians over {PROFILE_CALLS} fused steps right after the rounds (replaying the batch): the step took "
            f"**{1e3 * step:.2f} ms** (in the rounds above {1e3 * fused:.2f} ms: these steps ran after them, in the "
            f"machine's state then), of which the native calls' phases (ms): {parts}; outside them "
            f"**{1e3 * outside:.2f} ms** ({100 * outside / step:.0f}% of the step; the median of each step's time less its "
            "phases): the Python path (the module, the bag checks, autograd's Function and engine, the update's checks) "
            "and the calls' entry and exit. The step's arithmetic would take "
            f"{1e3 * floor:.2f} ms at the sgemm's rate; nn.EmbeddingBag's step took {1e3 * dense:.2f} ms (round median)."]


def _step_part_lines(parts: dict[str, float], table: TableConfig, lookups: int, reuse: dict[str, float],
                     ref: tuple[float, str], threads: int) -> list[str]:
    """The fused step's parts per thread (a _median_step_parts profile) with their arithmetic's rate against
    ``ref`` (FLOP/s on ``threads`` threads, and its name): the forward's chains once per distinct prefix and its
    last core once per distinct row, the backward's per-row products (dP and dG_d) twice the last core's and its
    chain GEMMs (dG_2 and dP_1) twice the chains' (forward_work), split evenly over the threads the kernel ran;
    and what the i2 buckets spent outside their three timed parts."""
    from ttrec.cpu import ops

    kt = ops.threads_for(lookups)
    chains, last = forward_work(table, 32, lookups, reuse)
    ref_rate, ref_name = ref
    per_ref = ref_rate / threads

    def part(key: str, flops: float | None = None) -> str:
        t = parts[key]
        if flops is None:
            return f"{1e3 * t:.2f} ms"
        rate = flops / kt / t if t > 0 else 0.0
        return f"{1e3 * t:.2f} ms ({flops / kt / 1e6:.0f} MFLOP per thread: {rate / 1e9:.1f} GFLOP/s, **{100 * rate / per_ref:.0f}%** of {ref_name} per thread)"

    timed = sum(parts[f"backward buckets_{k}"] for k in ("gather", "rows", "gemms"))
    return ["Per thread, from " + f"{PROFILE_CALLS} more fused steps with the kernel's per-thread timers on (ops.set_profile; "
            f"{1e3 * parts['step']:.2f} ms a step; the kernel ran {_threads(kt)}; each part the mean over them):",
            "",
            f"- forward: chain GEMMs {part('forward chains', chains)}; last core {part('forward last_core', last)};",
            f"- backward, its i2 buckets ({1e3 * parts['backward i2_buckets']:.2f} ms wall): the upstream gradient rows' gather "
            f"{part('backward buckets_gather')}; the per-row products (dP and dG_3) {part('backward buckets_rows', 2 * last)}; "
            f"the chain GEMMs (dG_2 and dP_1) {part('backward buckets_gemms', 2 * chains)}; the rest "
            f"{1e3 * (parts['backward i2_buckets'] - timed):.2f} ms (the G_2 slices, the stacked G_1 rows, the dG_1 sums, "
            "the threads' wait for each other at the end)."]


def _mib(n_bytes: float) -> str:
    """Bytes in MiB, with three decimals below 1 MiB (a smoke batch's output, 32 KiB, is not 0.0)."""
    return f"{n_bytes / 2**20:.{1 if n_bytes >= 2**20 else 3}f}"


def _chain_flops(table: TableConfig, rank: int) -> tuple[int, int]:
    from ttrec import TTSpec

    return TTSpec.suggest(table.num_embeddings, table.embedding_dim, rank).chain_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper",
                        help="paper: Kaggle's largest table (10,131,227 x 16), batch 65,536, ranks 8-64, poolings "
                             "1-100 (about 5 min on 2 CPUs); smoke: a 100,000-row table, for tests (default paper)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads of every implementation and of the sgemm (default 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for results.csv and report.md (default outputs/cpu_kernel/<time>)")
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= usable_cpus():
        parser.error(f"--threads: got {args.threads}; allowed: 1 to {usable_cpus()}, the CPUs this process may run on "
                     "(more threads than CPUs time the contention, not the kernels)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: got {str(args.out)!r}, an existing file; allowed: a directory (made if missing)")
    try:  # before anything is measured: a directory that cannot be made is a usage error
        out = args.out or new_run_dir(Path("outputs/cpu_kernel"))
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: got {str(args.out or 'outputs/cpu_kernel/<time>')!r}, which cannot be created ({exc})")
    print(f"[cpu_kernel] scale={args.scale} threads={args.threads} -> {out}", file=sys.stderr)
    run(args.scale, args.threads, out, log=lambda s: print(s, flush=True))
    print(f"[cpu_kernel] report: {out / 'report.md'}, rows: {out / RESULTS_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
