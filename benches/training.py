"""End-to-end DLRM training experiments (paper Figures 6, 7, 10 and Table 1): train, time, evaluate.

:func:`train_rows` is the rows function of ``task=train_dlrm``: it builds the click data
(synthetic with a planted ground truth, or Criteo files), the DLRM of ``dlrm.dataset`` with its
``dlrm.tt_tables`` largest tables in TT format (``tt.rank``, ``tt.init``, ``tt.d``; an LFU cache
with ``cache.enabled``), trains it for ``dlrm.iterations`` SGD steps of ``dlrm.batch_size``
samples and evaluates it on the held-out set. It runs on the CPU: ``device`` other than cpu is a
config error (benches.config).

What is timed, per iteration (``time.perf_counter``; the batch is drawn before the clock starts):

- ``time_per_iteration``: the whole step: zero grads, forward, BCE loss, backward, SGD steps;
- ``embedding_time``: the embedding part of it: the lookups of all 26 tables (forward), their
  backward (TT cores: the fused sparse SGD inside backward; cache rows likewise; nn.EmbeddingBag:
  sparse gradients) and the SGD step of the nn.EmbeddingBag tables. The step runs the
  embeddings' backward on its own: the MLP part's backward stops at a detached copy of the
  embedding output, whose gradient is then passed to the embeddings' backward. That is the same
  arithmetic as one backward (one extra autograd call);
- ``other_time``: the rest (bottom/top MLP, interaction, loss, their backward and SGD step).

The first ``dlrm.timing_warmup`` iterations train but are left out of the time statistics;
``train_time`` is the sum over all iterations. ``dlrm.compare_to`` trains a second model on the
same batches, iteration by iteration (alternating which goes first), so the two are timed under
the same machine load: ``uncompressed`` (all tables nn.EmbeddingBag) or ``tt`` (the same TT model
without its cache). Its rows carry ``model=<compare_to>``, and the paired ratios
(``time_vs_reference``: per-iteration time ratio; ``accuracy_vs_reference``: difference in points)
go on the main model's rows.

Evaluation (after training, ``model.eval()``, no cache counting): ``accuracy`` (%, threshold 0.5),
``bce`` and ``auc`` on the held-out set (all three NaN, and the notes say so, when the model
diverged: NaN logits); with synthetic data also the planted model's (``bayes_accuracy``,
``bayes_bce``, ``bayes_auc``), the best any model can score there. ``hit_ratio`` is read before the
evaluation: the training lookups after the cache's warm-up only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ttrec.cache import CachedTTEmbeddingBag
from ttrec.dlrm import ARCHS, DENSE_INITS, DLRM, binary_metrics, build_dlrm, table_sizes
from ttrec.optim import check_lr
from ttrec.synthetic_clicks import ClickBatch, CriteoClicks, SyntheticClicks
from ttrec.tt import TTEmbeddingBag

from .callbacks import _clock
from .config import BenchConfig, existing_file
from .environment import CpuWait, capture, steady_heap
from .timing import Stats

__all__ = ["build_data", "build_model", "Trainer", "train_rows"]

log = logging.getLogger("ttrec.bench")

# points that differ only in settings a model does not have (tt.* and cache.* with 0 TT tables)
# are trained once per process; later jobs of a sweep reuse the rows
_SAME_POINT: dict[str, list[dict]] = {}


def build_data(cfg: BenchConfig):
    """The click data of ``cfg.dlrm``: SyntheticClicks, or CriteoClicks for ``source=criteo``."""
    d = cfg.dlrm
    rows = table_sizes(d.dataset.value, d.scale_down)
    if d.source.value == "criteo":
        eval_path = None if d.criteo_eval_path is None else existing_file("dlrm.criteo_eval_path", d.criteo_eval_path)
        return CriteoClicks(existing_file("dlrm.criteo_path", d.criteo_path), rows, batch_size(cfg), d.eval_samples,
                            eval_path=eval_path,
                            mapping=d.criteo_mapping.value)
    return SyntheticClicks(rows, batch_size(cfg), d.eval_samples, seed=cfg.seed, zipf_alpha=d.zipf_alpha)


def batch_size(cfg: BenchConfig) -> int:
    return cfg.dlrm.batch_size or ARCHS[cfg.dlrm.dataset.value].batch_size


def learning_rate(cfg: BenchConfig) -> float:
    return cfg.dlrm.lr or ARCHS[cfg.dlrm.dataset.value].learning_rate


def build_model(cfg: BenchConfig, variant: str = "main") -> DLRM:
    """The DLRM of ``cfg``; ``variant`` "uncompressed" (no TT tables) or "tt" (no cache) for
    ``dlrm.compare_to``. Seeded by ``cfg.seed``: the variants start from the same MLP weights."""
    d = cfg.dlrm
    tt_tables = 0 if variant == "uncompressed" else d.tt_tables
    cached = cfg.cache.enabled and variant == "main" and tt_tables > 0
    return build_dlrm(d.dataset.value, table_sizes(d.dataset.value, d.scale_down), tt_tables, seed=cfg.seed,
                      tt_rank=cfg.tt.rank, tt_init=cfg.tt.init.value, tt_d=cfg.tt.d, dense_init=d.dense_init.value,
                      learning_rate=learning_rate(cfg), fused=True,
                      cache_fraction=cfg.cache.fraction if cached else None,
                      cache_warmup_iters=cfg.cache.warmup_iters, cache_refresh_every=cfg.cache.refresh_every)


@dataclass
class Trainer:
    """A model, its two SGD optimizers (MLPs; embedding tables with autograd gradients) and the
    per-iteration times (seconds) and losses of its training so far."""

    model: DLRM
    lr: float
    total: list[float] = field(default_factory=list)
    embedding: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_lr(self.lr, "lr")  # the SGD step's
        fused = set()  # learning rates of the updates inside backward (TT cores, cache rows)
        for t in self.model.tables:
            if isinstance(t, CachedTTEmbeddingBag):
                fused |= {t.learning_rate} if t.cache_optimizer is not None else set()
                t = t.tt
            if isinstance(t, TTEmbeddingBag) and t.optimizer is not None:
                fused.add(t.learning_rate)
        if fused - {self.lr}:
            raise ValueError(f"lr: got {self.lr}; the model's fused TT tables step with learning_rate "
                             f"{sorted(fused)} inside backward (build_dlrm(learning_rate=...)): they must be the same")
        self.mlp_opt = torch.optim.SGD(self.model.mlp_parameters(), lr=self.lr)
        emb = self.model.embedding_parameters()
        self.emb_opt = torch.optim.SGD(emb, lr=self.lr) if emb else None

    def step(self, batch: ClickBatch) -> None:
        """One SGD step on ``batch``, timed in total and for its embedding part (module docstring)."""
        m = self.model
        t_start = time.perf_counter()
        self.mlp_opt.zero_grad(set_to_none=True)  # MLP work: in the total, not the embedding part
        t0 = time.perf_counter()
        if self.emb_opt is not None:
            self.emb_opt.zero_grad(set_to_none=True)
        emb = m.embed(batch.sparse)
        t1 = time.perf_counter()
        emb_in = emb.detach().requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(m.interact(batch.dense, emb_in), batch.labels)
        loss.backward()
        t2 = time.perf_counter()
        emb.backward(emb_in.grad)
        if self.emb_opt is not None:
            self.emb_opt.step()
        t3 = time.perf_counter()
        self.mlp_opt.step()
        t4 = time.perf_counter()
        self.total.append(t4 - t_start)
        self.embedding.append((t1 - t0) + (t3 - t2))
        self.losses.append(float(loss.detach()))

    @torch.no_grad()
    def evaluate(self, held_out: ClickBatch, eval_batch_size: int) -> dict[str, float]:
        """:func:`ttrec.dlrm.binary_metrics` of the model (eval mode, no gradients) on ``held_out``,
        in chunks of ``eval_batch_size`` samples. Parameters, cache contents and the model's mode
        (train or eval) are left as they were; a cache's hit counters do count these lookups (read
        :meth:`hit_ratio` before)."""
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: got {eval_batch_size!r}; must be an int >= 1")
        was_training = self.model.training
        self.model.eval()
        try:
            logits = torch.cat([self.model(b.dense, b.sparse) for b in held_out.split(eval_batch_size)])
        finally:
            self.model.train(was_training)
        return binary_metrics(logits, held_out.labels)

    def hit_ratio(self) -> float | None:
        """Mean over the cached tables of hits / lookups since each cache was filled (None: no cache).
        CachedTTEmbeddingBag counts eval-mode lookups too: after :meth:`evaluate` this mixes in the
        held-out set."""
        cached = [t for t in self.model.tables if isinstance(t, CachedTTEmbeddingBag)]
        if not cached:
            return None
        ratios = [t.hit_ratio() for t in cached]  # every table sees the same lookups per iteration
        return sum(ratios) / len(ratios)


def _stat_row(metric: str, unit: str, stats: Stats, note: str | None = None) -> dict:
    return {"metric": metric, "unit": unit, "median": stats.median, "q1": stats.q1, "q3": stats.q3,
            "iqr": stats.iqr, "n": stats.n, "note": note}


def _value_row(metric: str, unit: str, value: float | None, note: str | None = None) -> dict:
    ok = value is not None and not (isinstance(value, float) and math.isnan(value))
    return {"metric": metric, "unit": unit, "median": value, "q1": value, "q3": value, "iqr": 0.0 if ok else None,
            "n": 1 if ok else 0, "note": note}


def point_columns(cfg: BenchConfig, model: DLRM, experiment: str, variant: str) -> dict:
    d, arch = cfg.dlrm, ARCHS[cfg.dlrm.dataset.value]
    tt = [t.tt if isinstance(t, CachedTTEmbeddingBag) else t for t in model.tables
          if isinstance(t, (TTEmbeddingBag, CachedTTEmbeddingBag))]
    cached = any(isinstance(t, CachedTTEmbeddingBag) for t in model.tables)
    bottom, top = arch.describe()
    rows = table_sizes(d.dataset.value, d.scale_down)
    return {
        "experiment": experiment,
        "model": variant,
        "dataset": d.dataset.value,
        "source": d.source.value,
        "scale_down": d.scale_down,
        "num_tables": len(rows),
        "largest_table_rows": max(rows),
        "total_rows": sum(rows),
        "tt_tables": len(tt),
        "tt_rank": cfg.tt.rank if tt else None,
        "tt_init": cfg.tt.init.value if tt else None,
        "tt_d": cfg.tt.d if tt else None,
        "backend": tt[0].resolved_backend() if tt else "aten",
        "dense_init": d.dense_init.value,
        "dense_init_label": DENSE_INITS[d.dense_init.value][0],
        "cache_enabled": cached,
        "cache_fraction": cfg.cache.fraction if cached else None,
        "cache_warmup_iters": cfg.cache.warmup_iters if cached else None,
        "cache_warmup_share": cfg.cache.warmup_iters / d.iterations if cached else None,
        "cache_refresh_every": cfg.cache.refresh_every if cached else None,
        "embedding_dim": arch.embedding_dim,
        "bottom_mlp": bottom,
        "top_mlp": top,
        "batch_size": batch_size(cfg),
        "lr": learning_rate(cfg),
        "iterations": d.iterations,
        "timing_warmup": d.timing_warmup,
        "eval_samples": d.eval_samples,
        "zipf_alpha": d.zipf_alpha if d.source.value == "synthetic" else None,
        "criteo_path": d.criteo_path if d.source.value == "criteo" else None,
        "criteo_eval_path": d.criteo_eval_path if d.source.value == "criteo" else None,
        "criteo_mapping": d.criteo_mapping.value if d.source.value == "criteo" else None,
        "eval_batch_size": d.eval_batch_size,
        "compare_to": d.compare_to.value,
        "model_bytes": model.embedding_bytes(),
        "uncompressed_bytes": sum(rows) * arch.embedding_dim * 4,
        "seed": cfg.seed,
    }


def _model_rows(trainer: Trainer, metrics: dict[str, float], skip: int, held_out: int,
                hit: float | None) -> list[dict]:
    """The rows of one trained model; ``hit``: its cache hit ratio over training (None: no cache)."""
    t = slice(skip, None)
    total, emb = trainer.total[t], trainer.embedding[t]
    other = [a - b for a, b in zip(total, emb)]
    ms = lambda xs: Stats.of([x * 1e3 for x in xs])  # noqa: E731
    once = f"one evaluation on {held_out:,} held-out samples"
    if metrics.get("nan_logits"):
        once += f"; diverged: {metrics['nan_logits']:,} held-out logits are NaN"
        se_note = once
    else:
        se = 100 * math.sqrt(max(metrics["accuracy"] / 100 * (1 - metrics["accuracy"] / 100), 0) / held_out)
        se_note = f"{once}; binomial std error {se:.2f} points"
    tail = trainer.losses[-max(1, len(trainer.losses) // 10):]
    rows = [
        _stat_row("time_per_iteration", "ms", ms(total), "whole training step (perf_counter), batch drawn outside"),
        _stat_row("embedding_time", "ms", ms(emb), "lookups + their backward (fused TT SGD) + nn.EmbeddingBag SGD step"),
        _stat_row("other_time", "ms", ms(other), "MLPs, interaction, loss, their backward and SGD step"),
        _stat_row("embedding_share", "fraction", Stats.of([e / a for e, a in zip(emb, total)])),
        _value_row("train_time", "s", sum(trainer.total), "sum over all iterations, timing warm-up included"),
        _value_row("accuracy", "%", metrics["accuracy"], se_note),
        _value_row("bce", "nats", metrics["bce"], once),
        _value_row("auc", "1", metrics["auc"], once),
        _value_row("train_loss", "nats", sum(tail) / len(tail), f"mean BCE of the last {len(tail)} iterations"),
    ]
    if hit is not None:
        rows.append(_value_row("hit_ratio", "fraction", hit, "cache hits / lookups of the cached tables after warm-up"))
    return rows


def _same_point_key(cfg: BenchConfig) -> str | None:
    """A key naming what is trained when TT settings do not apply (0 TT tables), else None."""
    if cfg.dlrm.tt_tables != 0:
        return None
    from dataclasses import asdict
    return json.dumps({"dlrm": asdict(cfg.dlrm), "seed": cfg.seed, "threads": cfg.timing.threads}, default=str,
                      sort_keys=True)


def train_rows(cfg: BenchConfig, experiment: str = "none") -> list[dict]:
    """Train, time and evaluate the point of ``cfg``; tidy rows, one per (model, metric)."""
    if cfg.cache.enabled and cfg.dlrm.tt_tables > 0 and cfg.cache.warmup_iters >= cfg.dlrm.iterations:
        raise ValueError(f"cache.warmup_iters: got {cfg.cache.warmup_iters} with dlrm.iterations={cfg.dlrm.iterations};"
                         " the cache is filled at training iteration warmup_iters + 1, so it must be < dlrm.iterations "
                         "(else the cached model never uses its cache)")
    key = _same_point_key(cfg)
    if key is not None and key in _SAME_POINT:
        log.info("0 TT tables: tt.* / cache.* do not change the model; rows reused from this sweep's earlier job")
        return [dict(r, experiment=experiment,
                     note=((r.get("note") or "") + "; reused: same model as an earlier job (0 TT tables)").lstrip("; "))
                for r in _SAME_POINT[key]]
    d = cfg.dlrm
    steady_heap()  # before anything is timed: see benches.environment.steady_heap
    torch.set_num_threads(cfg.timing.threads)
    torch.manual_seed(cfg.seed)
    t_setup = time.monotonic()
    data = build_data(cfg)
    lr = learning_rate(cfg)
    trainers = {"main": Trainer(build_model(cfg), lr)}
    ref = d.compare_to.value
    if ref != "none":
        trainers[ref] = Trainer(build_model(cfg, ref), lr)
    log.info("dlrm %s: %d TT tables (rank %s, init %s), cache %s, batch %d, %d iterations; data + model built in %s",
             d.dataset.value, d.tt_tables, cfg.tt.rank, cfg.tt.init.value, cfg.cache.enabled, batch_size(cfg),
             d.iterations, _clock(time.monotonic() - t_setup))
    start, every = time.monotonic(), max(1, d.iterations // 10)
    order = list(trainers.values())
    with CpuWait() as wait:  # whether other work kept its threads off the CPUs: a note on the time rows
        for it in range(d.iterations):
            batch = data.next_batch()
            for tr in (order if it % 2 == 0 else order[::-1]):
                tr.step(batch)
            if (it + 1) % every == 0 or it + 1 == d.iterations:
                elapsed = time.monotonic() - start
                main = trainers["main"]
                recent = main.losses[-every:]
                log.info("[train %d/%d] loss %.4f, %.1f ms/iteration | elapsed %s, left ~%s", it + 1, d.iterations,
                         sum(recent) / len(recent), 1e3 * sum(main.total[-every:]) / len(main.total[-every:]),
                         _clock(elapsed), _clock(elapsed / (it + 1) * (d.iterations - it - 1)))
    if (busy := wait.note()) is not None:
        log.warning("%s", busy)
    held_out = data.eval_set
    hits = {name: tr.hit_ratio() for name, tr in trainers.items()}  # before evaluate counts the held-out lookups
    metrics = {name: tr.evaluate(held_out, d.eval_batch_size) for name, tr in trainers.items()}
    env = {**capture(), "cpu_wait": wait.threads}
    rows = []
    skip = min(d.timing_warmup, d.iterations - 1)
    for name, tr in trainers.items():
        point = point_columns(cfg, tr.model, experiment, name)
        rows += [{**point, **r, **env} for r in _model_rows(tr, metrics[name], skip, len(held_out), hits[name])]
    if ref != "none":
        main, other = trainers["main"], trainers[ref]
        ratio = Stats.of([a / b for a, b in zip(main.total[skip:], other.total[skip:])])
        point = point_columns(cfg, main.model, experiment, "main")
        rows.append({**point, **_stat_row("time_vs_reference", "x", ratio,
                                          f"per-iteration time / the {ref} model's on the same batch, interleaved"),
                     **env})
        rows.append({**point, **_value_row("accuracy_vs_reference", "points",
                                           metrics["main"]["accuracy"] - metrics[ref]["accuracy"],
                                           f"accuracy minus the {ref} model's, same batches and held-out set"), **env})
    bayes = data.bayes_metrics()
    if bayes is not None:
        point = point_columns(cfg, trainers["main"].model, experiment, "planted")
        note = f"the planted model on the same {len(held_out):,} held-out samples (Bayes-optimal)"
        rows += [{**point, **_value_row(f"bayes_{m}", u, bayes[m], note), **env}
                 for m, u in (("accuracy", "%"), ("bce", "nats"), ("auc", "1"))]
        rows.append({**point, **_value_row("bayes_accuracy_expected", "%", bayes["accuracy_expected"],
                                           "mean of max(p, 1 - p) on the held-out samples"), **env})
    acc = metrics["main"]
    log.info("dlrm done: accuracy %.3f%%, auc %.4f, %.1f ms/iteration (median)%s", acc["accuracy"], acc["auc"],
             1e3 * Stats.of(trainers["main"].total[skip:]).median,
             f"; Bayes accuracy {bayes['accuracy']:.3f}%" if bayes else "")
    if busy is not None:
        rows = [dict(r, note=f"{busy}; {r['note']}" if r.get("note") else busy) if r["metric"] in _TIMED else r
                for r in rows]
    if key is not None:
        _SAME_POINT[key] = rows
    return rows


_TIMED = {"time_per_iteration", "embedding_time", "other_time", "embedding_share", "train_time", "time_vs_reference"}
