"""The cache experiments' share of the bench app: workload streams, the cached module's warm-up,
its result columns, same-process comparisons, the top-k stability analysis (paper Figure 9) and
the break-even hit rate (Figure 12).

The app (:mod:`benches.app`) calls in here when ``cache.enabled`` or ``task=topk_stability``;
nothing here times anything except through :func:`benches.app.measure_point`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from ttrec.cache import CachedTTEmbeddingBag, ExactCounter, cache_capacity, make_counter
from ttrec.criteo import feature_batches
from ttrec.workloads import Batch, WorkloadStream

from .config import BenchConfig, CacheUpdate, Distribution, Impl, ImplConfig, existing_file
from .environment import capture

__all__ = ["workload_stream", "build_cached", "warm_up", "workload_axes", "workload_columns", "comparison_configs",
           "stability_rows", "break_even"]


# ---- workloads ----

def workload_stream(cfg: BenchConfig) -> Iterator[Batch]:
    """The point's batches: a synthetic :class:`WorkloadStream`, or one feature of a Criteo file."""
    w = cfg.workload
    if w.distribution == Distribution.criteo:
        return feature_batches(existing_file("workload.criteo_path", w.criteo_path), w.criteo_feature, cfg.table.num_embeddings, w.batch_size,
                               w.criteo_mapping.value, repeat=True, device=cfg.device)
    return WorkloadStream(w.record(), cfg.table.num_embeddings, device=cfg.device)


# ---- the cached module ----

def build_cached(tt: torch.nn.Module, cfg: BenchConfig) -> CachedTTEmbeddingBag:
    """Wrap the TT module in the LFU cache of ``cfg.cache``; the cache rows train with mode.optimizer
    (settings a timed cache would not act on are refused by the config: BenchConfig._check_timed_cache)."""
    c, m = cfg.cache, cfg.mode
    fused = c.update == CacheUpdate.fused or (c.update == CacheUpdate.auto and m.fused)
    return CachedTTEmbeddingBag(tt, cache_fraction=c.fraction, warmup_iters=c.warmup_iters,
                                refresh_every=c.refresh_every, optimizer=m.optimizer.value if fused else None,
                                learning_rate=m.lr, counter=c.counter.value, counter_slots=c.counter_slots,
                                write_back_steps=c.write_back_steps)


def warm_up(module: CachedTTEmbeddingBag, stream: Iterator[Batch], cfg: BenchConfig,
            build_step: Callable) -> dict:
    """Run the warm-up (train: training steps; forward: forwards) on the next ``warmup_iters``
    batches of ``stream``, populate the cache, and measure the hit ratio on ``eval_batches``
    further batches. Leaves the module in train mode for mode=train, else in eval mode."""
    c = cfg.cache
    module.train()
    for _ in range(c.warmup_iters):
        batch = next(stream)
        if cfg.mode.name.value == "train":
            build_step(module, batch, cfg)()
        else:
            with torch.no_grad():
                module(batch.indices, batch.offsets, batch.per_sample_weights)
    if not module.populated:
        module.populate()
    module.eval()
    module.reset_stats()
    with torch.no_grad():
        for _ in range(c.eval_batches):
            batch = next(stream)
            module(batch.indices, batch.offsets, batch.per_sample_weights)
    held_out = module.hit_ratio() if c.eval_batches else math.nan
    module.reset_stats()
    module.train(cfg.mode.name.value == "train")
    return {"held_out_hit_ratio": held_out}


def workload_axes(cfg: BenchConfig) -> dict:
    """The workload's config values as result columns (every ``workload.*`` key); a key the
    distribution does not read is None (Zipf's for zipf, the hot set's for hot_set, the synthetic
    generator's for anything but criteo, the Criteo file's for criteo only)."""
    w = cfg.workload
    zipf, hot, criteo = (w.distribution == d for d in (Distribution.zipf, Distribution.hot_set, Distribution.criteo))
    synthetic = not criteo
    return {
        "batch_size": w.batch_size,
        "pooling_factor": w.pooling_factor if synthetic else None,  # a Criteo feature: one value per sample
        "pooling": w.pooling.value,
        "distribution": w.distribution.value,
        "zipf_alpha": w.zipf_alpha if zipf else None,
        "permute": w.permute if zipf else None,
        "weighted": w.weighted,
        "workload_seed": w.seed if synthetic else None,
        "pooling_sigma": w.pooling_sigma if synthetic else None,
        "pooling_distribution": w.pooling_distribution.value if synthetic else None,
        "hit_rate": w.hit_rate if hot else None,
        "hot_fraction": w.hot_fraction if hot else None,
        "reuse_fraction": w.reuse_fraction if synthetic else None,
        "criteo_path": w.criteo_path if criteo else None,
        "criteo_feature": w.criteo_feature if criteo else None,
        "criteo_mapping": w.criteo_mapping.value if criteo else None,
    }


def workload_columns(cfg: BenchConfig, module: torch.nn.Module, batch: Batch) -> dict:
    """Columns every timed row gets besides :func:`workload_axes`: the measured mean pooling factor,
    and the cache's parameters, memory and measured hit ratios (None without a cache).

    ``cache_rows`` is the capacity k (ceil(fraction * rows)); the warm-up may have found fewer distinct
    rows to fill it with. ``cache_bytes`` (weights, Adagrad state, slot map) and ``counter_bytes`` are
    bytes; ``hit_ratio`` is the timed batch's share of lookups whose row is cached after timing,
    ``held_out_hit_ratio`` the warm-up's measurement on ``cache.eval_batches`` further batches."""
    cols = {
        "measured_pooling_factor": batch.num_lookups / max(1, batch.offsets.numel()),
        "task": cfg.task.value,
    }
    cached = isinstance(module, CachedTTEmbeddingBag)
    c = cfg.cache
    cols.update({
        "cache_enabled": cached,
        "cache_fraction": c.fraction if cached else None,
        "cache_rows": module.capacity if cached else None,
        "cache_warmup_iters": c.warmup_iters if cached else None,
        "cache_refresh_every": c.refresh_every if cached else None,
        "cache_counter": module.counter.kind if cached else None,
        "cache_counter_slots": getattr(module.counter, "slots", None) if cached else None,  # bounded only
        "cache_update": (module.cache_optimizer or "autograd") if cached else None,
        "cache_write_back_steps": c.write_back_steps if cached else None,
        "cache_eval_batches": c.eval_batches if cached else None,
        "hit_ratio": float(module.cached_mask(batch.indices).float().mean()) if cached and batch.num_lookups else None,
        "held_out_hit_ratio": None,
        "cache_bytes": None, "counter_bytes": None,
    })
    if cached:
        cols.update({k: module.memory_bytes()[k] for k in ("cache_bytes", "counter_bytes")})
        cols.update(getattr(module, "bench_columns", {}))
    return cols


def comparison_configs(cfg: BenchConfig) -> list[BenchConfig]:
    """With cache.compare: the same point without the cache (TT alone) and as nn.EmbeddingBag."""
    if not (cfg.cache.enabled and cfg.cache.compare):
        return []
    off = dataclasses.replace(cfg.cache, enabled=False)
    tt_alone = dataclasses.replace(cfg, cache=off)
    dense = dataclasses.replace(cfg, cache=off, impl=ImplConfig(name=Impl.dense, sparse=True),
                                mode=dataclasses.replace(cfg.mode, fused=False))
    return [tt_alone, dense]


# ---- Figure 9: stability of the top-k set over a stream ----

def _overlap(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(torch.isin(a, b).sum())


def stability_rows(cfg: BenchConfig, experiment: str = "none") -> list[dict]:
    """Count the stream's lookups; at ``stability_windows`` evenly spaced points of
    ``stability_batches`` batches take the top-k (k from cache.fraction) of the cumulative counts.

    Metrics per window (unit: fraction):
    - ``topk_change``: |S_t minus S_prev| / |S_t|, the share of the top-k new since the last window;
    - ``topk_window_hit_ratio``: the share of the window's lookups whose row is in S_prev (the hit
      ratio a cache holding the previous top-k would have had);
    - ``topk_recall_bounded``: |S_t and B_t| / |S_t|, B_t the top-k of the bounded counter;
    - ``topk_window_hit_ratio_bounded``: as topk_window_hit_ratio, for B_prev.
    """
    c, t = cfg.cache, cfg.table
    torch.set_num_threads(cfg.timing.threads)
    n = t.num_embeddings
    k = cache_capacity(n, c.fraction)
    stream = workload_stream(cfg)
    exact = ExactCounter(n, device=cfg.device)
    bounded = make_counter("bounded", n, k, c.counter_slots, device=cfg.device)
    ends = sorted({max(1, round(c.stability_batches * (i + 1) / c.stability_windows))
                   for i in range(c.stability_windows)})
    base = {
        "experiment": experiment, "task": cfg.task.value, "table": t.name, "num_embeddings": n,
        "embedding_dim": t.embedding_dim, **workload_axes(cfg),
        "cache_fraction": c.fraction, "topk_rows": k, "counter_slots": bounded.slots,
        "counter_bytes": bounded.memory_bytes(), "exact_counter_bytes": exact.memory_bytes(),
        "stability_batches": c.stability_batches, "device": cfg.device, "seed": cfg.seed,
    }
    env = capture()
    rows: list[dict] = []
    prev = prev_b = None
    window_hits = window_hits_b = window_lookups = 0
    for step in range(1, c.stability_batches + 1):
        batch = next(stream)
        if prev is not None:
            window_hits += _overlap(batch.indices, prev)
            window_hits_b += _overlap(batch.indices, prev_b)
        window_lookups += batch.num_lookups
        exact.observe(batch.indices)
        bounded.observe(batch.indices)
        if step not in ends:
            continue
        top, top_b = exact.top(k), bounded.top(k)
        size = max(1, top.numel())
        metrics = {
            "topk_change": (top.numel() - _overlap(top, prev)) / size if prev is not None else None,
            "topk_window_hit_ratio": window_hits / max(1, window_lookups) if prev is not None else None,
            "topk_recall_bounded": _overlap(top, top_b) / size,
            "topk_window_hit_ratio_bounded": window_hits_b / max(1, window_lookups) if prev is not None else None,
        }
        point = {**base, "window": ends.index(step), "window_end_batch": step, "progress": step / c.stability_batches,
                 "lookups_seen": exact.total, "topk_size": int(top.numel())}
        for name, value in metrics.items():
            if value is None:
                continue
            rows.append({**point, "metric": name, "unit": "fraction", "median": value, "q1": value, "q3": value,
                         "iqr": 0.0, "n": 1, "note": None, **env})
        prev, prev_b, window_hits, window_hits_b, window_lookups = top, top_b, 0, 0, 0
    return rows


# ---- Figure 12: break-even hit rate ----

BREAK_EVEN_COLUMNS = ["mode", "tt_rank", "pooling_factor", "break_even_hit_ratio", "reached", "max_hit_ratio",
                      "time_ratio_at_max_hit"]


def break_even(df: pd.DataFrame, metric: str = "time_per_lookup") -> pd.DataFrame:
    """Per (mode, tt_rank, pooling_factor): the hit ratio from which TT + cache is as fast as
    nn.EmbeddingBag timed in the same job and stays so at every higher measured hit ratio (it
    overtakes), by linear interpolation between the measured points around that last crossing. A
    crossing that a higher hit ratio undoes is not a break-even (on the Zen 4 VM, rank 16, pooling
    10: faster at 0.25-0.5, slower again at 0.75-0.95, faster at 0.99).

    Columns: mode, tt_rank, pooling_factor, break_even_hit_ratio (NaN when never reached, i.e. slower
    at the highest measured hit ratio; the smallest measured hit ratio when never slower), reached
    (bool), max_hit_ratio, and the time ratio TT+cache / nn.EmbeddingBag at the highest measured hit ratio.
    """
    d = df[df["metric"] == metric]
    cached = d[d["cache_enabled"] == True]  # noqa: E712 (a column of bools read back from CSV)
    dense = d[d["impl"] == "dense"].groupby("job_dir")["median"].median().rename("dense")
    joined = cached.join(dense, on="job_dir").dropna(subset=["dense", "hit_ratio"])
    out = []
    for (mode, rank, pooling), g in joined.groupby(["mode", "tt_rank", "pooling_factor"]):
        g = g.groupby("hit_ratio")[["median", "dense"]].median().sort_index()
        x, gap = g.index.to_numpy(float), (g["median"] - g["dense"]).to_numpy(float)
        slower = np.nonzero(gap > 0)[0]
        value, reached = math.nan, False
        if not slower.size:
            value, reached = x[0], True
        elif slower[-1] < len(x) - 1:  # from the point after the last slower one on, never slower
            i = slower[-1] + 1
            value = x[i - 1] + (x[i] - x[i - 1]) * gap[i - 1] / (gap[i - 1] - gap[i])
            reached = True
        out.append({"mode": mode, "tt_rank": rank, "pooling_factor": pooling, "break_even_hit_ratio": value,
                    "reached": reached, "max_hit_ratio": x[-1],
                    "time_ratio_at_max_hit": float(g["median"].iloc[-1] / g["dense"].iloc[-1])})
    return pd.DataFrame(out, columns=BREAK_EVEN_COLUMNS)  # (no row: no TT + cache job that timed nn.EmbeddingBag too)
