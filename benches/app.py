"""The bench app: config -> workload -> implementation -> measurement -> tidy rows -> results file.

Run: ``python -m benches.app [overrides]`` (one point) or ``python -m benches.app -m ...`` (a
sweep); ``nox -s bench`` wraps it. Each job writes ``results.csv`` into its own output directory;
the :mod:`benches.callbacks` callback aggregates a run or sweep and draws its figure.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import ttrec
from ttrec.workloads import Batch, batch_stats

from .cache_experiments import (build_cached, comparison_configs, stability_rows, warm_up, workload_axes,
                                workload_columns, workload_stream)
from . import analytic, paper, training
from .config import (BenchConfig, Task, check_output_dirs, check_override_keys, check_point, check_values, register,
                     to_objects)
from .environment import CpuWait, capture, steady_heap
from .gpu import cuda_peak_bytes, nvml_telemetry
from .memory import measure_in_child
from .callbacks import NOT_MEASURED, drop_job_log, own_job_log
from .results import (IGNORED_SECTIONS, RESULTS_FILE, PointRefused, claim_point, clear_failure, measured_twin,
                      mark_run, record_failure, record_twin, write_rows)
from .timing import Stats, measure

log = logging.getLogger("ttrec.bench")
register()


def build_module(cfg: BenchConfig) -> torch.nn.Module:
    t = cfg.tt
    module = ttrec.build_embedding(
        cfg.impl.name.value, cfg.table.num_embeddings, cfg.table.embedding_dim,
        tt_ranks=t.rank, tt_p_shapes=t.p_shapes, tt_q_shapes=t.q_shapes, d=t.d, init=t.init.value,
        backend=cfg.impl.backend.value, mode=cfg.workload.pooling.value, sparse=cfg.impl.sparse,
        seed=cfg.seed, device=cfg.device, optimizer=_fused_optimizer(cfg), learning_rate=cfg.mode.lr,
    )
    if (reason := getattr(module, "fallback_reason", lambda: None)()) is not None:  # impl.backend=auto on CPU
        log.warning("impl=tt runs the reference backend (pure PyTorch, far slower than the native kernel): %s "
                    "(impl.backend=cpu makes this an error, impl.backend=torch asks for the reference)", reason)
    return build_cached(module, cfg) if cfg.cache.enabled else module


def _fused_optimizer(cfg: BenchConfig) -> str | None:
    """The TT kernel's fused update when asked for; other implementations have none and step with
    torch.optim (a sweep over implementations keeps one mode; the ``fused`` column says what ran)."""
    m = cfg.mode
    if m.name.value != "train" or not m.fused or cfg.impl.name.value != "tt":
        return None
    return m.optimizer.value


def build_step(module: torch.nn.Module, batch: Batch | Sequence[Batch], cfg: BenchConfig) -> Callable[[], object]:
    """The timed callable: a forward (no autograd), or forward + backward + optimizer step. Given a
    sequence of batches (a stream: :func:`timed_batches`), each call takes the next one, in turn
    (warm-up calls included); the callable's ``batches`` attribute is that sequence."""
    batches = [batch] if isinstance(batch, Batch) else list(batch)
    step = _step(module, batches, cfg)
    step.batches = batches
    return step


def _step(module: torch.nn.Module, batches: list[Batch], cfg: BenchConfig) -> Callable[[], object]:
    calls = itertools.cycle([(b.indices, b.offsets, b.per_sample_weights) for b in batches])
    if cfg.mode.name.value == "forward":
        def forward():
            with torch.no_grad():
                return module(*next(calls))
        return forward
    grad_out = upstream_gradient(batches, cfg)
    if getattr(module, "optimizer", None) is not None:  # fused: the update runs inside backward
        def fused_step():
            module(*next(calls)).backward(grad_out)
        return fused_step
    opt_cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[cfg.mode.optimizer.value]
    opt = opt_cls(module.parameters(), lr=cfg.mode.lr)
    if hasattr(module, "track_optimizer"):  # the LFU cache resets the state of slots it reassigns
        module.track_optimizer(opt)

    def train_step():
        opt.zero_grad(set_to_none=True)
        module(*next(calls)).backward(grad_out)
        opt.step()
    return train_step


def upstream_gradient(batches: Sequence[Batch], cfg: BenchConfig) -> torch.Tensor:
    """The training steps' upstream gradient (bags x D): one for every batch of the stream (a training
    step's comes from the layers above, in cache either way); seeded, so the same for every implementation."""
    gen = torch.Generator().manual_seed(cfg.seed)
    grad_out = torch.randn(batches[0].offsets.numel(), cfg.table.embedding_dim, generator=gen).to(batches[0].indices.device)
    if any(b.offsets.numel() != grad_out.shape[0] for b in batches):
        raise ValueError(f"timing.stream_lookups: the timed batches hold different numbers of bags "
                         f"({sorted({b.offsets.numel() for b in batches})}); a stream needs batches of one size")
    return grad_out


def stream_length(cfg: BenchConfig, first: Batch) -> int:
    """How many distinct batches the calls take in turn: 1 (batch 0 replayed) unless
    ``timing.stream_lookups`` asks for a stream, then as many as hold that many lookups at batch 0's
    count (ceil; a batch without lookups is replayed alone)."""
    n, per_batch = cfg.timing.stream_lookups, first.num_lookups
    return 1 if n == 0 or per_batch == 0 else -(-n // per_batch)


def timed_batches(stream: Iterator[Batch], cfg: BenchConfig) -> list[Batch]:
    """Batches 0, 1, ... of the workload stream that the calls take in turn (:func:`stream_length`)."""
    first = next(stream)
    k = stream_length(cfg, first)
    if k > 1:
        log.info("drawing %d batches (%s lookups) for the timed stream (timing.stream_lookups=%d)", k,
                 f"{k * first.num_lookups:,}", cfg.timing.stream_lookups)
    return [first, *itertools.islice(stream, k - 1)]


def _table_bytes(cfg: BenchConfig) -> int:
    """The uncompressed table's fp32 bytes."""
    return cfg.table.num_embeddings * cfg.table.embedding_dim * 4


def config_columns(cfg: BenchConfig, experiment: str) -> dict:
    """The columns of :func:`point_columns` that the config alone gives, for rows measured without a
    module in this process (the CPU-kernel experiment's memory rows: each built in a child); the
    columns only a built module or batch gives are None (``backend`` of the TT backend chosen at run
    time, the TT shapes, the parameter bytes) or left out (the batch's measured ratios)."""
    impl = cfg.impl.name.value
    train = cfg.mode.name.value == "train"
    dense = impl == "dense"
    return {
        "experiment": experiment,
        "impl": impl,
        "backend": {"tt": None, "t3nsor": "torch", "dense": "aten", "tltorch": "tltorch"}[impl],
        "device": cfg.device,
        "table": cfg.table.name,
        "num_embeddings": cfg.table.num_embeddings,
        "embedding_dim": cfg.table.embedding_dim,
        "tt_p_shapes": None,
        "tt_q_shapes": None,
        "tt_rank": None if dense else cfg.tt.rank,
        "tt_d": None,
        "init": "uniform_dlrm" if dense else cfg.tt.init.value,
        "param_bytes": _table_bytes(cfg) if dense else None,
        "compression_ratio": 1.0 if dense else None,
        **workload_axes(cfg),
        "mode": cfg.mode.name.value,
        "optimizer": cfg.mode.optimizer.value if train else None,
        "lr": cfg.mode.lr if train else None,
        "fused": train and impl == "tt" and cfg.mode.fused,
        "sparse": cfg.impl.sparse if train and dense else None,  # nn.EmbeddingBag's gradient
        "seed": cfg.seed,
        "timing_warmup": cfg.timing.warmup,  # untimed calls before the timed ones (n: how many were timed)
        "flush_l2": cfg.timing.flush_l2,
        "stream_lookups": cfg.timing.stream_lookups,
    }


def point_columns(cfg: BenchConfig, module: torch.nn.Module, batch: Batch, experiment: str,
                  timed_batches: int = 1) -> dict:
    """The config values (and measured workload ratios) that identify one measured point;
    ``timed_batches``: how many distinct batches its calls took in turn (``len(step.batches)``)."""
    spec = getattr(module, "spec", None)
    is_tt = spec is not None
    impl = cfg.impl.name.value
    cols = config_columns(cfg, experiment)
    if impl == "tt":
        cols["backend"] = module.resolved_backend()
    cols["fused"] = bool(getattr(module, "optimizer", None))
    if is_tt:
        cols.update({"tt_p_shapes": "x".join(map(str, spec.tt_p_shapes)),
                     "tt_q_shapes": "x".join(map(str, spec.tt_q_shapes)), "tt_rank": cfg.tt.rank, "tt_d": spec.d,
                     "init": cfg.tt.init.value, "param_bytes": spec.param_bytes,
                     "compression_ratio": spec.compression_ratio})
    else:  # (a module without TT cores stores the whole table)
        cols.update({"tt_rank": None, "init": "uniform_dlrm", "param_bytes": _table_bytes(cfg), "compression_ratio": 1.0})
    cols.update(batch_stats(batch, spec.tt_p_shapes if is_tt else None))
    cols["timed_batches"] = timed_batches  # (the ratios above: of batch 0)
    cols.update(workload_columns(cfg, module, batch))
    return cols


def _metric(name: str, unit: str, stats: Stats, note: str | None = None) -> dict:
    return {"metric": name, "unit": unit, "median": stats.median, "q1": stats.q1, "q3": stats.q3,
            "iqr": stats.iqr, "n": stats.n, "note": note}


def build_point(cfg: BenchConfig, timed: bool = True) -> tuple[torch.nn.Module, Batch, Callable[[], object]]:
    """Workload batch, module and the step to time for one point (seeded: the same every time).

    ``timed``: the heap is fixed first (benches.environment.steady_heap). The memory probe's child
    passes False: its protocol (the rise of the resident high-water mark) needs glibc's default heap,
    which gives large freed blocks back to the system; the fixed one keeps what setup freed resident,
    so the probed call would reuse it and look free (the native forward read 5.0 MiB instead of 10.1)."""
    if timed:
        steady_heap()
    torch.set_num_threads(cfg.timing.threads)  # (cfg.device was checked with the config)
    torch.manual_seed(cfg.seed)
    stream = workload_stream(cfg)
    # batch 0 is timed (with timing.stream_lookups, batches 0..k-1 in turn; not in the memory probe's
    # child, whose one call needs one batch); a cache warms up on the batches after them
    batches = timed_batches(stream, cfg) if timed else [next(stream)]
    module = build_module(cfg)
    if cfg.cache.enabled:
        module.bench_columns = warm_up(module, stream, cfg, build_step)
    return module, batches[0], build_step(module, batches, cfg)


def step_for_memory_probe(cfg: BenchConfig) -> Callable[[], object]:
    """Module-level setup for :func:`benches.memory.measure_in_child` (runs in the child, on glibc's
    default heap: see build_point)."""
    return build_point(cfg, timed=False)[2]


def _memory_row(cfg: BenchConfig, step: Callable[[], object]) -> dict:
    if cfg.device.startswith("cuda"):
        value, note = cuda_peak_bytes(step, cfg.device), "CUDA caching allocator peak above current use"
    else:
        value, note = measure_in_child(step_for_memory_probe, cfg)
    return {"metric": "peak_transient_memory", "unit": "bytes", "median": value, "q1": value, "q3": value,
            "iqr": 0.0 if value is not None else None, "n": 1 if value is not None else 0, "note": note}


def measure_point(cfg: BenchConfig, experiment: str = "none") -> list[dict]:
    """Build and time one point; return its tidy rows (one per metric) with the environment."""
    module, batch, step = build_point(cfg)
    t = cfg.timing
    with CpuWait() as wait:  # whether other work kept its threads off the CPUs: a note on the rows if so
        stats = measure(step, warmup=t.warmup, min_repeats=t.min_repeats, max_repeats=t.max_repeats,
                        target_time_s=t.target_time_s, device=cfg.device, flush_l2=t.flush_l2)
    if (busy := wait.note()) is not None:
        log.warning("%s", busy)
    # (a stream: the mean lookups of its batches, which differ with a spread of bag sizes)
    lookups = max(1, sum(b.num_lookups for b in step.batches) / len(step.batches))
    metrics = [
        _metric("time_per_batch", "ms", stats.map(lambda s: s * 1e3), busy),
        _metric("time_per_lookup", "ns", stats.map(lambda s: s * 1e9 / lookups), busy),
        _metric("throughput", "lookups/s", stats.map(lambda s: lookups / s), busy),
    ]
    tt_like = cfg.impl.name.value in ("tt", "tltorch") and not cfg.cache.enabled  # cached lookups do no chain
    # forward FLOPs only make a rate of a forward: a training step's time also holds backward + update
    if getattr(module, "spec", None) is not None and tt_like and cfg.mode.name.value == "forward":
        flops = module.spec.flops_per_lookup() * lookups
        metrics.append(_metric("gflops", "GFLOP/s", stats.map(lambda s: flops / s / 1e9), busy))
    if t.memory or cfg.device.startswith("cuda"):
        metrics.append(_memory_row(cfg, step))
    point = point_columns(cfg, module, batch, experiment, len(step.batches))
    env = {**capture(), "cpu_wait": wait.threads,
           **nvml_telemetry(cfg.device)}
    rows = [{**point, **m, **env} for m in metrics]
    for variant in comparison_configs(cfg):  # cache.compare: TT alone and nn.EmbeddingBag, same batch
        rows += measure_point(variant, experiment)
    return rows


def _describe(rows: list[dict]) -> str:
    r = rows[0]
    per_lookup = next(x for x in rows if x["metric"] == "time_per_lookup")
    return (f"{r['impl']}[{r['backend']}] {r['mode']} rank={r['tt_rank']} pooling={r['pooling_factor']} "
            f"batch={r['batch_size']}: {per_lookup['median']:.1f} ns/lookup (IQR {per_lookup['iqr']:.1f}, n={per_lookup['n']})")


COMPUTED_TASKS = {  # task -> rows(cfg, experiment): experiments that compute rather than time
    Task.topk_stability: stability_rows,
    Task.tt_shapes: analytic.tt_shapes_rows,
    Task.model_size: analytic.model_size_rows,
    Task.init_distribution: analytic.init_distribution_rows,
    Task.train_dlrm: training.train_rows,  # trains and times a whole DLRM (not benches.timing.measure)
}


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> str | None:
    """One job. A job that fails writes its error and traceback to ``failed.txt`` in its directory.
    In a sweep the sweep goes on: its end aggregates the jobs that finished, then lists every failure
    and exits 1 (:class:`benches.callbacks.AggregateResults`). A single run prints the error on
    stderr and exits 1 (HYDRA_FULL_ERROR=1: raises, for the whole traceback on the console)."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    try:
        clear_failure(out)
        return _run(cfg, hc, out)  # (NOT_MEASURED: the sweep's time estimate leaves the job out)
    except Exception as exc:
        drop_job_log() if isinstance(exc, PointRefused) else own_job_log()  # (the directory is another run's)
        path = record_failure(out, exc)
        if hc.mode == RunMode.MULTIRUN:
            log.error("job %s failed: %s: %s (traceback: %s)", hc.job.num, type(exc).__name__, exc, path)
            return NOT_MEASURED if isinstance(exc, PointRefused) else None
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(traceback: {path})", file=sys.stderr)
        raise SystemExit(1) from None


def save_run_config(out: Path, cfg: DictConfig, hc: HydraConfig) -> None:
    """Hydra's record of the run in ``out/.hydra``: config.yaml (the job's config), hydra.yaml and
    overrides.yaml, as Hydra writes them (conf/bench.yaml turns Hydra's own copy off). Written once
    the job holds its point, so a run refused a directory leaves the measuring run's record alone."""
    run = out / ".hydra"
    run.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc)}), run / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), run / "overrides.yaml")


def _run(cfg: DictConfig, hc: HydraConfig, out: Path) -> str | None:
    bench, experiment = to_objects(cfg), hc.runtime.choices.get("experiment") or "none"
    check_point(bench, experiment)
    if bench.task in (Task.paper, Task.training):
        own_job_log()
        save_run_config(out, cfg, hc)  # the preset's own directory (each experiment's jobs write theirs)
    if bench.task == Task.paper:
        paper.run_all(bench, hc)
        return
    if bench.task == Task.training:
        paper.run_all(bench, hc, paper.TRAINING_EXPERIMENTS, label="training")
        return
    # a sweep over settings this implementation never reads (nn.EmbeddingBag over tt.rank) times it once;
    # not where the job's directory holds results already: claim_point skips them if they are this
    # point's and refuses them if not (left alone, the sweep would aggregate another point's results)
    if (bench.task == Task.time and hc.mode == RunMode.MULTIRUN and not bench.redo
            and not (out / RESULTS_FILE).exists() and (twin := measured_twin(out, cfg)) is not None):
        record_twin(out, cfg, twin)  # its point.yaml and twin.txt: a later run of another point is refused here
        own_job_log()  # (this job's own directory of the sweep)
        log.info("not measured again: impl=%s reads no %s setting, and this sweep measured the same point in %s "
                 "(redo=true measures it here too)", bench.impl.name.value,
                 "/".join(f"{k}.*" for k in IGNORED_SECTIONS[bench.impl.name.value]), twin)
        return NOT_MEASURED
    if not claim_point(out, cfg, redo=bench.redo):
        drop_job_log()  # the finished point's log is the run's that measured it
        mark_run(out)  # (a later job of this sweep may take it as its twin)
        log.info("already measured, skipped: %s (redo=true measures it again)", out / RESULTS_FILE)
        return NOT_MEASURED
    own_job_log()
    save_run_config(out, cfg, hc)
    if bench.task in COMPUTED_TASKS:
        torch.set_num_threads(bench.timing.threads)  # (their rows record it, as timed points' do)
        rows = COMPUTED_TASKS[bench.task](bench, experiment)
        path = write_rows([{**r, "scale": bench.scale.name} for r in rows], out / RESULTS_FILE)
        mark_run(out)
        log.info("%s: %d rows -> %s", bench.task.value, len(rows), path)
        return
    rows = measure_point(bench, experiment=experiment)
    path = write_rows([{**r, "scale": bench.scale.name} for r in rows], out / RESULTS_FILE)
    mark_run(out)
    log.info("%s -> %s", _describe(rows), path)


if __name__ == "__main__":
    if (problem := check_override_keys(sys.argv[1:])) is not None:  # before Hydra's less helpful message
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if (problem := check_output_dirs(sys.argv[1:])) is not None:  # Hydra creates the run directory first
        print(f"error: ValueError: {problem}", file=sys.stderr)
        sys.exit(1)
    if (problem := check_values(sys.argv[1:])) is not None:  # a bad value: before any directory or job
        print(f"error: ValueError: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; every finished point is on disk
        if not os.environ.get(paper.CHILD_ENV):  # (a preset's experiment process: its parent says it, once)
            print("\ninterrupted: finished points keep their results.csv; run the same command again to resume",
                  file=sys.stderr)
        sys.exit(130)
