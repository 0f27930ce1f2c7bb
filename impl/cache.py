"""LFU cache of hot rows in front of a TTEmbeddingBag (TT-Rec paper, section 4.2).

The most frequently looked-up rows are kept uncompressed in a dense (capacity, embedding_dim)
parameter and trained directly (SGD/Adagrad); every other lookup is served, and trained, by the TT
cores. :class:`CachedTTEmbeddingBag` wraps a :class:`ttrec.TTEmbeddingBag` (composition rather than
a ``cache=`` option on it: the cache is a second parameter set with its own state machine, counter
and optimizer state, and the wrapped module stays usable, and timeable, on its own).

Life cycle, counted in training-mode forward calls t = 1, 2, ... (``module.train()``):

1. warm-up, t <= warmup_iters: every lookup is served by the TT cores and counted;
2. populate, at the start of call warmup_iters + 1: the top-k counted rows (k = capacity, from
   ``cache_fraction`` of the table) are materialized from the cores into the cache;
3. refresh, at the start of every ``refresh_every``-th call after that (0: never): the top-k is
   re-selected from the cumulative counts. Rows that stay keep their slot and trained values; new
   rows take the freed slots, materialized from the cores; evicted rows are discarded (the paper's
   rule) or, with ``write_back_steps`` > 0, written back into the cores first (see
   :meth:`CachedTTEmbeddingBag._write_back`).

Populate and refresh happen at the start of a forward call, never between a forward and its
backward, so a backward always updates the rows its forward read. In eval mode nothing is counted
and the cache does not change. ``populate()``, ``refresh()`` and ``set_cached_rows()`` do the same
explicitly. ``state_dict()`` holds the life cycle too (``_extra_state``: the call count, the refresh
count and the counter's counts), so a loaded module continues as the saved one would have.

No stale mappings: which row a slot holds is one array, ``slot_rows`` (-1: empty); the lookup map
(rows sorted, with their slots) is rebuilt from it on every change, and a slot's weights and
optimizer state are rewritten whenever its row changes. (The reference code's hash table could keep
a slot for an evicted row.)

Forward: lookups are partitioned into cached and TT parts, each compacted with its bag structure
(offsets from a running count of the part's lookups); the TT part goes through the wrapped
module's backend (native CPU kernel, torch reference or CUDA) and the cached part through
``F.embedding_bag`` on the cache; both are sum-pooled with the bag's mean scale (1 / full bag size)
folded into per-lookup weights, then added. Hit rate = lookups served from the cache / lookups.

Training the cache rows: ``optimizer=None`` gives ``cache_weight`` a gradient through autograd
(sparse with ``sparse=True``) for a torch optimizer; ``"sgd"`` / ``"adagrad"`` update the touched
rows inside backward (the CUDA SGD step uses the ``tt_cache_sgd`` kernel). The TT cores train as the
wrapped module is configured (autograd gradients or its fused update). After a refresh, register
a torch optimizer with :meth:`track_optimizer` so that the state of reassigned slots is reset.

Row -> slot map: ``slot_map="dense"`` is one int64 per row (-1: not cached), a single gather per
lookup and the input of the CUDA ``tt_cache_partition`` kernel; ``"sorted"`` keeps the cached rows
sorted with their slots (24 bytes per cached row) and binary-searches them (about 5x slower here);
``"auto"`` is dense when it needs at most ``DENSE_SLOT_MAP_MAX_BYTES``.

Counting (bounded memory): ``counter="exact"`` keeps one int64 count per row (8 N bytes);
``"bounded"`` keeps a Misra-Gries summary of ``counter_slots`` (row, count) pairs (16 m bytes),
merged batch by batch (Agarwal et al., mergeable summaries): after n lookups every row with
frequency > n / (m + 1) is tracked, and each estimate is at most n / (m + 1) below the true count.
``"auto"`` takes the exact counter when it needs at most ``EXACT_COUNTER_MAX_BYTES``.
"""

from __future__ import annotations

import math
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .autograd_guards import fused_update_once
from .bags import Bags, make_bags
from .optim import FUSED_OPTIMIZERS, check_eps, check_lr, check_optimizer
from .cuda import loader as cuda_loader
from .tt import TTEmbeddingBag, check_flag

__all__ = ["CachedTTEmbeddingBag", "ExactCounter", "BoundedCounter", "make_counter", "cache_capacity",
           "COUNTERS", "SLOT_MAPS", "CACHE_OPTIMIZERS", "EXACT_COUNTER_MAX_BYTES", "DENSE_SLOT_MAP_MAX_BYTES"]

COUNTERS = ("auto", "exact", "bounded")
SLOT_MAPS = ("auto", "dense", "sorted")
CACHE_OPTIMIZERS = (None, *FUSED_OPTIMIZERS)
EXACT_COUNTER_MAX_BYTES = 64 << 20
DENSE_SLOT_MAP_MAX_BYTES = 32 << 20
_DENSE_GRAD_MAX = 1 << 20  # cache entries up to which the fused step forms a dense (capacity, D) gradient
_MATERIALIZE_CHUNK = 1 << 16  # rows materialized from the cores per backend call


def _row_ids(param: str, rows, num_embeddings: int, device: torch.device) -> torch.Tensor:
    """``rows`` (a tensor or sequence of integer row ids) as int64 on ``device``; a float or bool dtype
    (which a cast would truncate to row ids), another device or a row outside [0, num_embeddings)
    is refused, naming ``param``."""
    rows = torch.as_tensor(rows)
    if rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{param}: got dtype {rows.dtype}; row ids must be int32 or int64")
    if rows.device != device:
        raise ValueError(f"{param}: got device {rows.device}; the module is on {device}")
    rows = rows.to(torch.int64)
    if rows.numel():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"{param}: got row {lo if lo < 0 else hi}; rows must be in "
                             f"[0, num_embeddings={num_embeddings})")
    return rows


def cache_capacity(num_embeddings: int, cache_fraction: float) -> int:
    """k = ceil(cache_fraction * num_embeddings), at least 1 and at most the table."""
    return max(1, min(num_embeddings, math.ceil(cache_fraction * num_embeddings - 1e-9)))


# ---- frequency counting ----

class Counter(Protocol):
    total: int

    def observe(self, indices: torch.Tensor) -> None: ...
    def top(self, k: int) -> torch.Tensor: ...
    def memory_bytes(self) -> int: ...


def _top_by_count(rows: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """The (at most) k rows with the largest positive counts; ties go to the smaller row id.
    Returned sorted by row id."""
    pos = counts > 0
    rows, counts = rows[pos], counts[pos]
    if rows.numel() > k:
        kth = torch.topk(counts, k, sorted=False).values.min()
        above = counts > kth
        tied = torch.nonzero(counts == kth).flatten()
        tied = tied[torch.argsort(rows[tied], stable=True)][: k - int(above.sum())]
        rows = torch.cat([rows[above], rows[tied]])
    return torch.sort(rows).values


class ExactCounter:
    """One int64 count per row (8 bytes per row). On CUDA the ``tt_count_rows`` kernel counts."""

    kind = "exact"

    def __init__(self, num_embeddings: int, device=None, use_cuda_kernel: bool = False) -> None:
        self.counts = torch.zeros(num_embeddings, dtype=torch.int64, device=device)
        self.total = 0
        self._cuda = use_cuda_kernel

    def observe(self, indices: torch.Tensor) -> None:
        if self._cuda:
            cuda_loader.count_rows(indices, self.counts)
        else:
            self.counts.index_add_(0, indices, torch.ones_like(indices))
        self.total += indices.numel()

    def top(self, k: int) -> torch.Tensor:
        return _top_by_count(torch.arange(self.counts.numel(), device=self.counts.device), self.counts, k)

    def estimate(self, rows: torch.Tensor) -> torch.Tensor:
        return self.counts[rows]

    def memory_bytes(self) -> int:
        return self.counts.numel() * self.counts.element_size()

    def payload(self) -> torch.Tensor:
        """The counts as one int64 tensor (what the module's state_dict keeps)."""
        return self.counts.clone()

    def load_payload(self, payload: torch.Tensor, total: int) -> None:
        if payload.numel() != self.counts.numel():
            raise ValueError(f"state_dict: the exact counter's state has {payload.numel()} counts; this table has "
                             f"{self.counts.numel()} rows")
        self.counts = payload.to(self.counts.device, copy=True)
        self.total = total

    def apply_(self, fn) -> None:
        """Move the counts as nn.Module moves a buffer (fn: the function .to()/.cuda() apply)."""
        self.counts = fn(self.counts)


class BoundedCounter:
    """Misra-Gries summary with ``slots`` (row, count) pairs, merged one batch at a time.

    Merge rule: add the batch's exact (row, count) summary to the tracked pairs; if more than
    ``slots`` rows remain, subtract the (slots + 1)-th largest count from all and drop those <= 0.
    Bound after n lookups: true - n / (slots + 1) <= estimate <= true, so any row with frequency
    above n / (slots + 1) is tracked. Memory: 16 * slots bytes, plus O(slots + batch) transient.
    """

    kind = "bounded"

    def __init__(self, slots: int, device=None) -> None:
        if slots < 1:
            raise ValueError(f"counter_slots: got {slots}; must be >= 1")
        self.slots = slots
        self.rows = torch.empty(0, dtype=torch.int64, device=device)
        self.counts = torch.empty(0, dtype=torch.int64, device=device)
        self.total = 0

    def observe(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        rows, inv = torch.unique(torch.cat([self.rows, indices]), return_inverse=True)
        counts = torch.zeros(rows.numel(), dtype=torch.int64, device=rows.device)
        counts.index_add_(0, inv[: self.rows.numel()], self.counts)
        counts.index_add_(0, inv[self.rows.numel():], torch.ones_like(indices))
        if rows.numel() > self.slots:
            cut = torch.topk(counts, self.slots + 1).values[-1]
            counts = counts - cut
            keep = counts > 0
            rows, counts = rows[keep], counts[keep]
        self.rows, self.counts = rows, counts
        self.total += indices.numel()

    def top(self, k: int) -> torch.Tensor:
        return _top_by_count(self.rows, self.counts, k)

    def estimate(self, rows: torch.Tensor) -> torch.Tensor:
        if self.rows.numel() == 0:
            return torch.zeros_like(rows)
        pos = torch.searchsorted(self.rows, rows).clamp(max=self.rows.numel() - 1)
        found = self.rows[pos] == rows
        return torch.where(found, self.counts[pos], torch.zeros_like(rows))

    def error_bound(self) -> float:
        """n / (slots + 1): how far below the true count an estimate can be."""
        return self.total / (self.slots + 1)

    def memory_bytes(self) -> int:
        return 16 * self.slots

    def payload(self) -> torch.Tensor:
        """The tracked rows, then their counts, as one int64 tensor (what the module's state_dict keeps)."""
        return torch.cat([self.rows, self.counts])

    def load_payload(self, payload: torch.Tensor, total: int) -> None:
        m = payload.numel() // 2
        if payload.numel() % 2 or m > self.slots:
            raise ValueError(f"state_dict: the bounded counter's state has {payload.numel()} entries; this counter "
                             f"keeps at most {self.slots} (row, count) pairs")
        self.rows = payload[:m].to(self.rows.device, copy=True)
        self.counts = payload[m:].to(self.counts.device, copy=True)
        self.total = total

    def apply_(self, fn) -> None:
        """Move the summary as nn.Module moves a buffer (fn: the function .to()/.cuda() apply)."""
        self.rows, self.counts = fn(self.rows), fn(self.counts)


def make_counter(kind: str, num_embeddings: int, capacity: int, counter_slots: int | None = None, device=None,
                 use_cuda_kernel: bool = False) -> ExactCounter | BoundedCounter:
    """``kind`` in COUNTERS; the bounded counter has ``counter_slots`` pairs (default max(4k, 1024),
    and never more than the table). ``counter_slots`` with ``kind="exact"`` is an error (only the
    bounded counter reads it); with ``"auto"`` it is used if the bounded counter is chosen."""
    if kind not in COUNTERS:
        raise ValueError(f"counter: got {kind!r}; allowed: {COUNTERS}")
    if counter_slots is not None:
        if isinstance(counter_slots, bool) or not isinstance(counter_slots, int) or counter_slots < 1:
            raise ValueError(f"counter_slots: got {counter_slots!r}; must be None or an int >= 1")
        if kind == "exact":
            raise ValueError(f"counter_slots: got {counter_slots}; only counter='bounded' (or 'auto' choosing it) "
                             "reads it, counter='exact' keeps one count per row")
    if kind == "auto":
        kind = "exact" if 8 * num_embeddings <= EXACT_COUNTER_MAX_BYTES else "bounded"
    if kind == "exact":
        return ExactCounter(num_embeddings, device, use_cuda_kernel)
    slots = counter_slots if counter_slots is not None else min(num_embeddings, max(4 * capacity, 1024))
    if slots < capacity:
        raise ValueError(f"counter_slots: got {slots}; must be >= the cache capacity {capacity} "
                         "(the summary must be able to name every cached row)")
    return BoundedCounter(slots, device)


# ---- the module ----

class _FusedCacheRows(torch.autograd.Function):
    """Pooled cached rows; backward runs the cache's optimizer step instead of returning the rows'
    gradient. The per-lookup weights still get theirs (d out[bag] / d w = the row the forward read)."""

    @staticmethod
    def forward(ctx, module, slots, offsets, weights, bag_of, bags, grad_slot, cache_weight):
        ctx.module, ctx.slots, ctx.weights, ctx.bag_of = module, slots, weights, bag_of
        ctx.bags, ctx.grad_slot = bags, grad_slot
        # the rows as read now: the backward's step (or another forward's) changes them in place
        ctx.rows_read = cache_weight.detach().index_select(0, slots) if ctx.needs_input_grad[3] else None
        return F.embedding_bag(slots, cache_weight.detach(), offsets, mode="sum", per_sample_weights=weights,
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, grad_out):
        grad_weights = None
        if ctx.rows_read is not None:
            grad_weights = (grad_out.index_select(0, ctx.bag_of) * ctx.rows_read.to(grad_out.dtype)).sum(1)
        fused_update_once(ctx, "LFU cache", lambda: ctx.module._fused_step(ctx.slots, ctx.weights, ctx.bag_of,
                                                                              grad_out, ctx.bags, ctx.grad_slot))
        return None, None, None, grad_weights, None, None, None, None


class CachedTTEmbeddingBag(nn.Module):
    """A TTEmbeddingBag with an LFU cache of its hottest rows, stored uncompressed.

    Args:
        tt: the wrapped TTEmbeddingBag (its mode, backend and core optimizer are used as they are).
        cache_fraction: capacity as a fraction of num_embeddings, in (0, 1] (paper: 0.01%-10%).
        warmup_iters: training-mode forward calls served by the TT cores alone before populating.
        refresh_every: re-select the top-k every this many training calls after populating; 0: never.
        optimizer: None (autograd gradient for ``cache_weight``), "sgd" or "adagrad" (fused update of
            the cached rows in backward) with ``learning_rate`` and Adagrad's ``eps``.
        sparse: with optimizer None, give ``cache_weight`` a sparse gradient.
        counter: "auto", "exact" or "bounded"; counter_slots: the bounded counter's size.
        slot_map: "auto", "dense" or "sorted" (see the module docstring).
        write_back_steps: 0 discards evicted rows' trained values (the paper); > 0 runs that many
            gradient steps pulling the cores' version of each evicted row towards its cached value.
    """

    def __init__(self, tt: TTEmbeddingBag, cache_fraction: float = 0.001, warmup_iters: int = 100,
                 refresh_every: int = 0, optimizer: str | None = None, learning_rate: float = 0.01,
                 eps: float = 1e-10, sparse: bool = True, counter: str = "auto", counter_slots: int | None = None,
                 slot_map: str = "auto", write_back_steps: int = 0) -> None:
        super().__init__()
        if not isinstance(tt, TTEmbeddingBag):
            raise TypeError(f"tt: got {type(tt).__name__}; expected a ttrec.TTEmbeddingBag")
        if isinstance(cache_fraction, bool) or not isinstance(cache_fraction, (int, float)) \
                or not 0 < cache_fraction <= 1:
            raise ValueError(f"cache_fraction: got {cache_fraction!r}; must be in (0, 1]")
        for name, value in (("warmup_iters", warmup_iters), ("refresh_every", refresh_every),
                            ("write_back_steps", write_back_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: got {value!r}; must be an int >= 0")
        check_optimizer(optimizer, allow_none=True)  # one of CACHE_OPTIMIZERS
        check_lr(learning_rate)
        check_eps(eps)
        sparse = check_flag("sparse", sparse)  # ('False' reached F.embedding_bag after the warm-up)
        if counter not in COUNTERS:
            raise ValueError(f"counter: got {counter!r}; allowed: {COUNTERS}")
        if slot_map not in SLOT_MAPS:
            raise ValueError(f"slot_map: got {slot_map!r}; allowed: {SLOT_MAPS}")
        self.tt = tt
        self.spec, self.mode = tt.spec, tt.mode
        self.num_embeddings, self.embedding_dim = tt.num_embeddings, tt.embedding_dim
        self.include_last_offset = tt.include_last_offset
        self.cache_fraction, self.warmup_iters, self.refresh_every = float(cache_fraction), warmup_iters, refresh_every
        self.cache_optimizer, self.learning_rate, self.eps, self.sparse = optimizer, learning_rate, eps, sparse
        self.write_back_steps = write_back_steps
        self.capacity = cache_capacity(self.num_embeddings, cache_fraction)
        core = tt.tt_cores[0]
        self.cache_weight = nn.Parameter(torch.zeros(self.capacity, self.embedding_dim, dtype=core.dtype,
                                                     device=core.device))
        self.register_buffer("slot_rows", torch.full((self.capacity,), -1, dtype=torch.int64, device=core.device))
        self.register_buffer("_sorted_rows", torch.empty(0, dtype=torch.int64, device=core.device), persistent=False)
        self.register_buffer("_sorted_slots", torch.empty(0, dtype=torch.int64, device=core.device), persistent=False)
        if slot_map == "auto":
            slot_map = "dense" if 8 * self.num_embeddings <= DENSE_SLOT_MAP_MAX_BYTES else "sorted"
        self.slot_map = slot_map
        self.register_buffer("_row_slot", torch.full((self.num_embeddings,), -1, dtype=torch.int64, device=core.device)
                             if slot_map == "dense" else None, persistent=False)
        if optimizer == "adagrad":
            self.register_buffer("adagrad_state", torch.zeros_like(self.cache_weight.detach()))
        self.counter = make_counter(counter, self.num_embeddings, self.capacity, counter_slots, core.device,
                                    use_cuda_kernel=tt.resolved_backend() == "cuda")
        self.iteration = 0
        self.populated = False
        self.refreshes = 0
        self._tracked: list[weakref.ref] = []
        self.reset_stats()
        # the lookup maps are derived (not saved): rebuild them from slot_rows after load_state_dict
        self.register_load_state_dict_post_hook(CachedTTEmbeddingBag._after_load)

    # -- what the bench and users read --

    @property
    def optimizer(self) -> str | None:
        """The wrapped module's fused core optimizer (None: cores train through autograd)."""
        return self.tt.optimizer

    def resolved_backend(self) -> str:
        return self.tt.resolved_backend()

    @property
    def num_cached(self) -> int:
        return int(self._sorted_rows.numel())

    def cached_rows(self) -> torch.Tensor:
        """The rows in the cache, sorted (int64)."""
        return self._sorted_rows.clone()

    def reset_stats(self) -> None:
        """Zero the hit counters (lookups served from the cache, lookups served)."""
        self._hits = self._lookups = 0

    def hit_ratio(self) -> float:
        """Lookups served from the cache / lookups, over the forward calls since reset_stats() that ran
        with the cache populated (the warm-up's calls are not counted); NaN before any such lookup."""
        return self._hits / self._lookups if self._lookups else math.nan

    def cached_mask(self, indices: torch.Tensor) -> torch.Tensor:
        """bool per index (int32/int64 row ids in [0, num_embeddings)): is its row in the cache now."""
        return self._partition(_row_ids("indices", indices, self.num_embeddings, self.slot_rows.device))[0]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the cache (weights, optimizer state, slot map) and of the frequency counter."""
        weights = self.cache_weight.numel() * self.cache_weight.element_size()
        adagrad = self.cache_optimizer == "adagrad"
        state = self.adagrad_state.numel() * self.adagrad_state.element_size() if adagrad else 0
        slot_map = 8 * (self.slot_rows.numel() + self._sorted_rows.numel() + self._sorted_slots.numel()
                        + (self._row_slot.numel() if self._row_slot is not None else 0))
        return {"cache_bytes": weights + state + slot_map, "cache_weight_bytes": weights,
                "cache_state_bytes": state, "cache_map_bytes": slot_map, "counter_bytes": self.counter.memory_bytes()}

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Reset ``optimizer``'s per-row state (tensors shaped like cache_weight) of every slot whose
        row changes, so a row taking over a slot does not inherit its predecessor's Adagrad sum."""
        self._tracked.append(weakref.ref(optimizer))

    # -- life cycle --

    def observe(self, indices: torch.Tensor) -> None:
        """Count lookups (int32/int64 row ids in [0, num_embeddings)) towards the next populate/refresh."""
        self.counter.observe(_row_ids("indices", indices, self.num_embeddings, self.slot_rows.device).flatten())

    def populate(self) -> torch.Tensor:
        """Fill the cache with the top-k counted rows (same as refresh). Returns the cached rows."""
        return self.refresh()

    def refresh(self) -> torch.Tensor:
        """Re-select the top-k counted rows; kept rows keep their values. Returns the cached rows."""
        self.set_cached_rows(self.counter.top(self.capacity))
        self.refreshes += 1
        return self.cached_rows()

    @torch.no_grad()
    def set_cached_rows(self, rows: torch.Tensor) -> None:
        """Make exactly ``rows`` (distinct int32/int64 row ids, at most ``capacity``) the cached rows."""
        device = self.slot_rows.device
        rows = _row_ids("rows", torch.as_tensor(rows).to(device), self.num_embeddings, device)
        new = torch.unique(rows)
        if new.numel() != rows.numel():
            raise ValueError("rows: the cached rows must be distinct")
        if new.numel() > self.capacity:
            raise ValueError(f"rows: got {new.numel()} rows; the cache holds at most {self.capacity}")
        old = self.slot_rows
        occupied = old >= 0
        kept = occupied & torch.isin(old, new)
        evicted_slots = torch.nonzero(occupied & ~kept).flatten()
        if self.write_back_steps and evicted_slots.numel():
            self._write_back(old[evicted_slots], self.cache_weight[evicted_slots])
        incoming = new[~torch.isin(new, old[kept])]
        free = torch.nonzero(~kept).flatten()  # ascending; enough: |kept| + |incoming| = |new| <= capacity
        fill, emptied = free[: incoming.numel()], free[incoming.numel():]
        self.slot_rows[fill] = incoming
        self.slot_rows[emptied] = -1
        if incoming.numel():
            self.cache_weight[fill] = self._materialize(incoming)
        self.cache_weight[emptied] = 0
        changed = torch.cat([fill, emptied])
        if self.cache_optimizer == "adagrad":
            self.adagrad_state[changed] = 0
        self._reset_tracked_state(changed)
        self._rebuild_map()
        self.populated = True

    @torch.no_grad()
    def _rebuild_map(self) -> None:
        """Derive the row -> slot map from ``slot_rows``, the one record of which row a slot holds."""
        valid = torch.nonzero(self.slot_rows >= 0).flatten()
        order = torch.argsort(self.slot_rows[valid])
        if self._row_slot is not None:
            self._row_slot.fill_(-1)
        self._sorted_rows = self.slot_rows[valid][order].contiguous()
        self._sorted_slots = valid[order].contiguous()
        if self._row_slot is not None:
            self._row_slot[self._sorted_rows] = self._sorted_slots

    @staticmethod
    def _after_load(module: "CachedTTEmbeddingBag", incompatible_keys) -> None:
        module._rebuild_map()
        module.populated = module.populated or bool((module.slot_rows >= 0).any())

    # the life cycle in state_dict()["_extra_state"]: without it a loaded module restarted its
    # warm-up count and refreshed from counts begun at the load (evicting the hot rows it was trained on)
    _COUNTER_CODES = {"exact": 0, "bounded": 1}
    _HEAD = 5  # counter kind, iteration, refreshes, populated, lookups counted

    def get_extra_state(self) -> torch.Tensor:
        """The life cycle as one int64 tensor (state_dict() stays a dict of tensors): [counter kind
        (0 exact, 1 bounded), iteration, refreshes, populated, lookups counted], then the counter's
        counts (exact: one per row; bounded: its tracked rows, then their counts). The hit counters
        (statistics, see reset_stats) are not saved."""
        c = self.counter
        head = torch.tensor([self._COUNTER_CODES[c.kind], self.iteration, self.refreshes, int(self.populated),
                             c.total], dtype=torch.int64)
        return torch.cat([head.to(c.counts.device), c.payload()])

    def set_extra_state(self, state: torch.Tensor) -> None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or state.dim() != 1 \
                or state.numel() < self._HEAD:
            raise ValueError(f"state_dict: _extra_state must be the 1D int64 tensor get_extra_state() returns; "
                             f"got {type(state).__name__} {getattr(state, 'dtype', '')}")
        kind, iteration, refreshes, populated, total = state[: self._HEAD].tolist()
        if kind != self._COUNTER_CODES[self.counter.kind]:
            saved = {v: k for k, v in self._COUNTER_CODES.items()}.get(kind, kind)
            raise ValueError(f"state_dict: saved with counter={saved!r}; this module has counter={self.counter.kind!r}")
        self.counter.load_payload(state[self._HEAD:], total)
        self.iteration, self.refreshes, self.populated = iteration, refreshes, bool(populated)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda() move the counter's tensors like buffers; the CUDA counting kernel follows the backend
        super()._apply(fn, *args, **kwargs)
        self.counter.apply_(fn)
        if isinstance(self.counter, ExactCounter):
            self.counter._cuda = self.tt.resolved_backend() == "cuda"
        return self

    # torch.save(module) / pickle: a tracked optimizer is not part of the module (nor its pickle)
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_tracked"] = []
        return state

    def _reset_tracked_state(self, slots: torch.Tensor) -> None:
        alive = []
        for ref in self._tracked:
            opt = ref()
            if opt is None:
                continue
            alive.append(ref)
            for value in opt.state.get(self.cache_weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == self.cache_weight.shape:
                    value[slots] = 0
        self._tracked = alive

    @torch.no_grad()
    def _materialize(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (n,) of the TT table as (n, D), through the wrapped module's backend."""
        out = []
        for s in range(0, rows.numel(), _MATERIALIZE_CHUNK):
            r = rows[s:s + _MATERIALIZE_CHUNK].contiguous()
            offsets = torch.arange(r.numel() + 1, dtype=torch.int64, device=r.device)
            out.append(self._tt_pooled(Bags(r, offsets, None), "sum", fused=False))
        return torch.cat(out).to(self.cache_weight.dtype)

    def _write_back(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write evicted rows back into the cores: ``write_back_steps`` gradient steps (step size
        ``learning_rate``) on 0.5 * sum ||tt_row(cores, r) - cached_value(r)||^2 over the evicted rows.

        A heuristic, not an exact update: the rows' core slices are shared with other rows (a core-k
        slice with every row of the same digit i_k), so pulling an evicted row towards its trained
        value moves those rows too. In tests/test_cache.py, 100 steps bring two evicted rows of a
        600-row table to within 3% of their values but move the other 598 rows by more than their own
        norm. An exact write-back is a streaming TT re-decomposition (paper section 4.2); hence the
        default (0 steps) discards the values, as the paper does.
        """
        from .reference import tt_rows

        cores = [c.detach().clone().requires_grad_(True) for c in self.tt.tt_cores]
        target = values.detach().clone()
        with torch.enable_grad():
            for _ in range(self.write_back_steps):
                loss = 0.5 * (tt_rows(cores, self.spec, rows) - target).pow(2).sum()
                grads = torch.autograd.grad(loss, cores)
                with torch.no_grad():
                    for c, g in zip(cores, grads):
                        c -= self.learning_rate * g
        with torch.no_grad():
            for p, c in zip(self.tt.tt_cores, cores):
                p.copy_(c)

    # -- forward --

    def _advance(self, indices: torch.Tensor) -> None:
        t = self.iteration + 1
        if not self.populated and t > self.warmup_iters:
            self.populate()
        elif self.populated and self.refresh_every and t > self.warmup_iters + 1 \
                and (t - self.warmup_iters - 1) % self.refresh_every == 0:
            self.refresh()
        self.iteration = t
        if not self.populated or self.refresh_every:
            self.counter.observe(indices)  # (checked by make_bags)

    def _partition(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit, slot) per lookup; slot is -1 where not hit with the dense map, else meaningful where hit."""
        if self._row_slot is not None:
            if self.resolved_backend() == "cuda":
                slot, cached = cuda_loader.cache_partition(indices, self._row_slot)
                return cached.bool(), slot
            slot = self._row_slot[indices]
            return slot >= 0, slot
        keys = self._sorted_rows
        if keys.numel() == 0:
            return torch.zeros_like(indices, dtype=torch.bool), torch.zeros_like(indices)
        pos = torch.searchsorted(keys, indices).clamp_(max=keys.numel() - 1)
        return keys[pos] == indices, self._sorted_slots[pos]

    def _tt_pooled(self, bags: Bags, mode: str, fused: bool = True) -> torch.Tensor:
        """The wrapped module's backend on ``bags`` (TTEmbeddingBag.forward's dispatch, checks included)."""
        return self.tt._pooled(bags, mode, fused)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """nn.EmbeddingBag's forward: (num_bags, embedding_dim)."""
        bags = make_bags(input, offsets, per_sample_weights, num_embeddings=self.num_embeddings,
                         mode=self.mode, include_last_offset=self.include_last_offset)
        if bags.indices.device != self.slot_rows.device:
            raise ValueError(f"input: got device {bags.indices.device}; the module is on {self.slot_rows.device}")
        if self.training:
            self._advance(bags.indices)
        if not self.populated:
            return self._tt_pooled(bags, self.mode)
        hit, slot = self._partition(bags.indices)
        miss = ~hit
        hit_pos, miss_pos = torch.nonzero(hit).squeeze(1), torch.nonzero(miss).squeeze(1)
        self._hits += hit_pos.numel()
        self._lookups += bags.num_lookups
        # offsets of each part: how many of its lookups come before each bag's start
        before = torch.zeros(bags.num_lookups + 1, dtype=torch.int64, device=hit.device)
        torch.cumsum(miss, 0, out=before[1:])
        tt_offsets = before[bags.offsets]
        cache_offsets = bags.offsets - tt_offsets
        w = bags.weights_as(self.cache_weight.dtype)
        fused = self.cache_optimizer is not None
        bag_ids = bags.bag_ids() if fused or self.mode == "mean" else None
        if self.mode == "mean":
            w = (1.0 / bags.bag_sizes().clamp(min=1).to(self.cache_weight.dtype))[bag_ids]
        w_tt = None if w is None else w.index_select(0, miss_pos)
        w_c = None if w is None else w.index_select(0, hit_pos).to(self.cache_weight.dtype)
        tt_idx = bags.indices.index_select(0, miss_pos)
        if tt_idx.numel() or not hit_pos.numel():  # (no lookups at all: the TT part keeps the output in the graph)
            out = self._tt_pooled(Bags(tt_idx, tt_offsets, w_tt), "sum")
        else:
            out = torch.zeros(bags.num_bags, self.embedding_dim, dtype=self.cache_weight.dtype, device=hit.device)
        c_slots = slot.index_select(0, hit_pos)
        if c_slots.numel() == 0:
            return out
        if not fused:
            cached = F.embedding_bag(c_slots, self.cache_weight, cache_offsets, mode="sum", per_sample_weights=w_c,
                                     include_last_offset=True, sparse=self.sparse)
        else:
            cuda_sgd = self.cache_optimizer == "sgd" and self.resolved_backend() == "cuda"
            grad_slot = slot.where(hit, -1) if cuda_sgd else None  # the tt_cache_sgd kernel's input
            cached = _FusedCacheRows.apply(self, c_slots, cache_offsets, w_c, bag_ids.index_select(0, hit_pos), bags,
                                           grad_slot, self.cache_weight)
        return out + cached

    @torch.no_grad()
    def _fused_step(self, slots, weights, bag_of, grad_out, bags, grad_slot) -> None:
        """SGD/Adagrad on the cached rows read by one forward, from the pooled output's gradient.

        slots, weights, bag_of: per cached lookup, its slot, weight (mean scale folded in) and bag."""
        grad_out = grad_out.to(self.cache_weight.dtype)
        if grad_slot is not None:
            cuda_loader.cache_sgd(self.cache_weight.data, grad_slot, bags, self.mode, grad_out, self.learning_rate)
            return
        w = self.cache_weight.data
        if w.numel() <= _DENSE_GRAD_MAX:
            # the (capacity, D) gradient as one sparse (capacity x bags) @ grad_out product; untouched
            # rows get exactly 0, which leaves them (and their Adagrad sums) unchanged
            values = torch.ones_like(slots, dtype=grad_out.dtype) if weights is None else weights.to(grad_out.dtype)
            a = torch.sparse_coo_tensor(torch.stack([slots, bag_of]), values, (w.shape[0], grad_out.shape[0]),
                                        check_invariants=False)
            grad = torch.sparse.mm(a, grad_out)
            if self.cache_optimizer == "sgd":
                w.add_(grad, alpha=-self.learning_rate)
            else:
                self.adagrad_state.addcmul_(grad, grad)
                w.addcdiv_(grad, self.adagrad_state.sqrt().add_(self.eps), value=-self.learning_rate)
            return
        g = grad_out[bag_of]
        if weights is not None:
            g = g * weights.unsqueeze(1).to(g.dtype)
        if self.cache_optimizer == "sgd":  # index_add_ sums a row's lookups: no de-duplication needed
            w.index_add_(0, slots, g, alpha=-self.learning_rate)
            return
        uniq, inv = torch.unique(slots, return_inverse=True)
        grad = torch.zeros(uniq.numel(), self.embedding_dim, dtype=g.dtype, device=g.device).index_add_(0, inv, g)
        state = self.adagrad_state
        state.index_add_(0, uniq, grad * grad)  # torch.optim.Adagrad: h += g^2; w -= lr g / (sqrt(h) + eps)
        w.index_add_(0, uniq, grad / (state[uniq].sqrt() + self.eps), alpha=-self.learning_rate)

    def full_weight(self) -> torch.Tensor:
        """The logical table (num_embeddings, D): the cores' rows with cached rows substituted."""
        with torch.no_grad():
            table = self.tt.full_weight().clone()
            table[self._sorted_rows] = self.cache_weight[self._sorted_slots].to(table.dtype)
        return table

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity} ({self.cache_fraction:g} of {self.num_embeddings}), "
                f"warmup_iters={self.warmup_iters}, refresh_every={self.refresh_every}, "
                f"optimizer={self.cache_optimizer!r}, counter={self.counter.kind!r}")
