"""The native CPU backend of TTEmbeddingBag: ctypes calls wrapped in an autograd Function.

Inputs reach here only as validated :class:`ttrec.bags.Bags`; this module checks what the kernel
itself needs (fp32, CPU, contiguous, d <= 4) before any pointer is passed to native code.
"""

from __future__ import annotations

import ctypes
import math
from functools import lru_cache

import numpy as np
import torch

from ..autograd_guards import fused_update_once, refuse_changed_batch, without_second_derivative
from ..bags import MODES, Bags, checked_for, in_memory, make_bags
from ..optim import check_eps, check_lr, check_optimizer
from ..shapes import TTSpec
from .build import TT_MAX_D, TTShape, TTStats, library, unavailable_reason
from . import plant

__all__ = ["forward", "backward", "sparse_update", "tt_bag_cpu", "last_stats", "set_profile", "sort_way", "last_sort_way",
           "force_sort_way", "check_supported", "spec_unsupported", "unavailable_reason", "DEFAULT_CHUNK_BYTES",
           "MIN_LOOKUPS_PER_THREAD",
           "threads_for", "SavedForward", "live_saved_forwards", "native_calls_step"]

DEFAULT_CHUNK_BYTES = 128 << 20  # scratch bound per chunk of lookups (bytes)
KERNEL = "native CPU kernel"  # its name in the backward's errors (ttrec.autograd_guards)
# A native call uses one thread per this many lookups at most (and at most torch's intra-op count).
# A second thread only pays with work to split: on a small batch its fork and joins cost more than
# it saves, and on a loaded machine a join can wait for the descheduled thread's next time slice
# (a 64-lookup forward on a 2-core VM, 200 calls: median 0.14-0.17 ms with 2 threads, slowest calls
# 4-8 ms; with 1 thread 0.12-0.14 ms, slowest 0.3-4 ms). A fused training step on Kaggle's largest
# table (R = 32, Zipf) on the Zen 4 VM, in alternating rounds, with a second thread from 2,048 lookups
# instead of 4,096: 0.67x at 3,000 lookups, 0.75-0.81x at 2,048 (once 1.45x, in a disturbed minute);
# from 1,024 instead, at 1,024 lookups: 1.05x [0.90-1.68]. The kernel's results do not depend on the
# thread count. The kernel's kSmallBackward (plan.h) is the same number: smaller chunks, which run on
# one thread, take one backward segment.
MIN_LOOKUPS_PER_THREAD = 2048
_last: dict[str, TTStats] = {}  # the last call's raw stats per direction, read out by last_stats()
_update_epoch = 0  # bumped by every fused update: a kept forward plan is used only if none ran since


class SavedForward:
    """What a native forward keeps for its backward (d = 3, one chunk): the sorted lookups, prefix
    runs and the prefixes' partial products G_1[i1] @ G_2[:, i2], so the backward skips the sort and
    the chains. Owned by one autograd node; used only while no fused update has run anywhere since
    the forward, else the backward recomputes. (Cores changed in place in between never reach it:
    autograd refuses saved tensors changed since the forward, and the fused path checks by hand.)
    A backward called directly (:func:`backward`, :func:`sparse_update`) uses it only for the very
    Bags object of its forward and the same cores, unchanged by in-place torch ops (see :meth:`fits`):
    a plan of other lookups or of other core values would give silently wrong gradients. A backward
    that used it releases it (it takes parts of it): the next one recomputes."""

    __slots__ = ("_ptr", "epoch", "_bags", "_cores")

    def __init__(self, ptr: int, cores=(), bags: Bags | None = None) -> None:
        self._ptr = ptr
        self.epoch = _update_epoch
        self._bags, self._cores = bags, _core_marks(cores)

    def current(self) -> bool:
        """Not released, and no fused update has run since the forward."""
        return self._ptr is not None and self.epoch == _update_epoch

    def fits(self, cores, bags: Bags) -> bool:
        """The forward's Bags (the same object: a changed or rebuilt batch is another) and the same
        core tensors at the same versions (no in-place torch op on them since)."""
        return bags is self._bags and _core_marks(cores) == self._cores

    @property
    def pointer(self) -> int | None:
        return self._ptr

    def nbytes(self) -> int:
        return 0 if self._ptr is None else int(library().tt_state_bytes(self._ptr))

    def release(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            library().tt_state_free(ptr)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


def _core_marks(cores) -> tuple[tuple[int, int], ...]:
    """Per core, where its data is and its version counter (bumped by every in-place torch op)."""
    return tuple((c.data_ptr(), c._version) for c in cores)


def live_saved_forwards() -> int:
    """Kept forward plans not yet released (tests: a forward under no_grad keeps none)."""
    return int(library().tt_states_live())


@lru_cache(maxsize=64)
def _shape(spec: TTSpec) -> TTShape:  # read-only for the kernel (const tt_shape_t*): one per spec
    s = TTShape()
    s.d = spec.d
    for k in range(spec.d):
        s.p[k], s.q[k] = spec.tt_p_shapes[k], spec.tt_q_shapes[k]
    for k, r in enumerate(spec.ranks):
        s.r[k] = r
    return s


def _plain(t: torch.Tensor) -> torch.Tensor:
    """t itself when contiguous (only its data pointer is passed on; autograd never sees the
    kernel), else a contiguous copy. Spares the torch ops of detach().contiguous() per core, which
    right after a kernel call run with torch's dispatcher cold in cache (tens of microseconds each).
    A negative view (torch._neg_view: values negated by a flag the kernel cannot see) is resolved."""
    return t if t.is_contiguous() and not t.is_neg() else in_memory(t.detach()).contiguous()


def threads_for(lookups: int) -> int:
    """Threads of a native call over ``lookups`` lookups (see MIN_LOOKUPS_PER_THREAD)."""
    return max(1, min(torch.get_num_threads(), lookups // MIN_LOOKUPS_PER_THREAD + 1))


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


@lru_cache(maxsize=64)
def _spec_facts(spec: TTSpec) -> tuple[str | None, tuple[torch.Size, ...]]:
    """Once per spec: why the kernel cannot run it (None if it can), and its core shapes."""
    shapes = tuple(torch.Size(spec.core_shape(k)) for k in range(spec.d))
    if spec.d > TT_MAX_D:
        return f"d={spec.d} cores; the native kernel supports 2..{TT_MAX_D}", shapes
    key_bits = (math.prod(spec.tt_p_shapes[:-1]) - 1).bit_length() + (spec.tt_p_shapes[-1] - 1).bit_length()
    if key_bits > 40:
        return (f"tt_p_shapes={spec.tt_p_shapes} need {key_bits}-bit sort keys; the native kernel supports "
                "up to 40 (about 10^12 rows)"), shapes
    widest = _widest_int32(spec)
    if widest >= 2**31:
        return (f"tt_q_shapes={spec.tt_q_shapes} with ranks={spec.ranks} make a partial-product row or core slice of "
                f"{widest} floats; the native kernel indexes them with 32-bit ints (below 2^31)"), shapes
    return None, shapes


def _widest_int32(spec: TTSpec) -> int:
    """The largest count the kernel holds in a 32-bit int (tt_shape_t's q and r, GEMM sizes): a
    partial product's row width q_1...q_k R_k+1 and a core slice R_k q_k R_k+1, over k."""
    r, q = spec.ranks, spec.tt_q_shapes  # ranks R_0..R_d (R_0 = R_d = 1)
    return max(max(math.prod(q[:k + 1]) * r[k + 1], r[k] * q[k] * r[k + 1]) for k in range(spec.d))


# The checks below run several times per training step, right after native calls, when every
# tensor attribute read is a cache miss: they read the fewest attributes (is_cpu, dtype, shape)
# against shapes computed once per spec.
def spec_unsupported(spec: TTSpec) -> str | None:
    """None if the native kernel can run the TT format ``spec`` (cores still to be checked:
    :func:`check_supported`), else why not."""
    return _spec_facts(spec)[0]


def check_supported(cores: list[torch.Tensor], spec: TTSpec) -> str | None:
    """None if the native kernel can run these cores, else why not."""
    reason, shapes = _spec_facts(spec)
    if reason is not None:
        return reason
    if len(cores) != spec.d:
        return f"got {len(cores)} cores; the spec has d={spec.d}"
    for k, c in enumerate(cores):
        if not c.is_cpu:
            return f"core {k} is on {c.device}; the native CPU kernel needs CPU tensors"
        if c.dtype is not torch.float32:
            return f"core {k} has dtype {c.dtype}; the native CPU kernel supports torch.float32"
        if c.shape != shapes[k]:
            return f"core {k} has shape {tuple(c.shape)}, expected {tuple(shapes[k])}"
    return None


def _require(cores, spec, bags: Bags, mode: str, in_place: bool = False) -> Bags:
    """Everything the kernel trusts, checked before any pointer is passed; returns trusted Bags.
    ``in_place``: the cores are updated through their pointers, so they must also be contiguous."""
    reason = check_supported(cores, spec)
    if reason is not None:
        raise ValueError(f"backend='cpu': {reason}")
    if in_place:
        for k, c in enumerate(cores):
            if not c.is_contiguous() or c.is_neg():
                raise ValueError(f"cores[{k}]: got a {'negative view' if c.is_neg() else 'non-contiguous tensor'} of "
                                 f"shape {tuple(c.shape)}; the fused update writes the cores in place, so they must "
                                 "be contiguous plain tensors")
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; allowed: {MODES}")
    if not isinstance(bags, Bags):
        raise TypeError(f"bags: got {type(bags).__name__}; expected ttrec.bags.Bags (from make_bags)")
    if not bags.indices.is_cpu:
        raise ValueError(f"bags: indices on {bags.indices.device}; the native CPU kernel needs CPU tensors")
    if not checked_for(bags, spec.num_embeddings):  # built by hand: validate like every forward input
        bags = make_bags(bags.indices, bags.offsets, bags.per_sample_weights, num_embeddings=spec.num_embeddings,
                         mode=mode, include_last_offset=True)
    return bags


def _check_like_cores(name: str, tensors, spec: TTSpec) -> None:
    if tensors is None:
        return
    if len(tensors) != spec.d:
        raise ValueError(f"{name}: got {len(tensors)} tensors; expected one per core ({spec.d})")
    shapes = _spec_facts(spec)[1]
    for k, t in enumerate(tensors):
        if t.shape != shapes[k] or t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or t.is_neg():
            raise ValueError(f"{name}[{k}]: got {t.dtype} {tuple(t.shape)} on {t.device} (contiguous="
                             f"{t.is_contiguous()}, negative view={t.is_neg()}); expected contiguous float32 "
                             f"{spec.core_shape(k)} on cpu (the kernel writes it)")


def _check_touched(touched, spec: TTSpec) -> None:
    if touched is None:
        return
    if len(touched) != spec.d:
        raise ValueError(f"touched: got {len(touched)} masks; expected one per core ({spec.d})")
    for k, t in enumerate(touched):
        if t.dtype != torch.uint8 or t.shape != (spec.tt_p_shapes[k],) or not t.is_cpu or not t.is_contiguous():
            raise ValueError(f"touched[{k}]: got {t.dtype} {tuple(t.shape)} on {t.device}; expected contiguous uint8 "
                             f"({spec.tt_p_shapes[k]},) on cpu")


def _check_grad_out(grad_out, shape: tuple[int, int]) -> None:
    """The upstream gradient the kernel reads: a dense CPU tensor of real floats, (num_bags, D)."""
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"grad_out: got {type(grad_out).__name__}; expected a torch.Tensor of shape {shape}")
    if not grad_out.is_cpu or grad_out.layout is not torch.strided or not grad_out.is_floating_point():
        raise ValueError(f"grad_out: got a {grad_out.dtype} tensor ({grad_out.layout}) on {grad_out.device}; expected "
                         f"a dense floating-point tensor on cpu of shape {shape}")
    if tuple(grad_out.shape) != shape:
        raise ValueError(f"grad_out: got shape {tuple(grad_out.shape)}; expected {shape}")


def _call(fn, *args) -> None:
    _check_rc(plant.call(fn, *args), fn)  # fn(*args), slowed only when TTREC_PLANT_SLOWDOWN is set (gate tests)


def _check_rc(rc: int, fn) -> None:
    """A native call's return code as an error: 1 out of memory, any other nonzero a failure."""
    if rc == 1:
        raise MemoryError(f"native CPU kernel: out of memory in {fn.__name__}")
    if rc != 0:
        raise RuntimeError(f"native CPU kernel: {fn.__name__} failed (code {rc})")


def _batch_args(spec: TTSpec, cores, bags: Bags, mode: str, w: torch.Tensor | None) -> tuple:
    """tt_forward's and tt_backward's leading arguments: the shape, the cores, the batch and the mode."""
    return (ctypes.byref(_shape(spec)), _ptrs(cores), bags.indices.data_ptr(), bags.offsets.data_ptr(), bags.num_bags,
            None if w is None else w.data_ptr(), int(mode == "mean"))


def _planted_repeat() -> int:
    """The forward kernel's repeat count: always 1. TTREC_PLANT_SLOWDOWN=f (CI-gate testing only)
    slows every native call by f in :func:`_call` (see plant.py); checked here before any native work."""
    plant.factor()
    return 1



def forward(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Pooled rows (num_bags, D), fp32, no autograd."""
    return _forward(cores, spec, bags, mode, chunk_bytes, keep=False)[0]


def _forward(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
             keep: bool = False) -> tuple[torch.Tensor, SavedForward | None]:
    """The forward, and with ``keep`` what its backward can reuse (None where the kernel keeps nothing)."""
    return _run_forward(cores, spec, _require(cores, spec, bags, mode), mode, chunk_bytes, keep)


def _run_forward(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, chunk_bytes: int,
                 keep: bool) -> tuple[torch.Tensor, SavedForward | None]:
    """_forward on inputs that passed :func:`_require`."""
    given, cores = cores, [_plain(c) for c in cores]
    out = torch.empty(bags.num_bags, spec.embedding_dim, dtype=torch.float32)
    w = bags.float32_weights()
    stats = TTStats()
    state = ctypes.c_void_p()
    _call(library().tt_forward, *_batch_args(spec, cores, bags, mode, w), out.data_ptr(), threads_for(bags.indices.numel()),
          chunk_bytes, _planted_repeat(), ctypes.byref(stats), ctypes.byref(state) if keep else None)
    _last["forward"] = stats
    return out, (SavedForward(state.value, given, bags) if state.value else None)


SORT_WAYS = {-1: "timing", 0: "shared", 1: "split"}  # the kernel's SortWay (tt_cpu.cpp)


def sort_way() -> str:
    """How the kernel sorts lookups with two or more threads, at the key width of its last such sort
    (at least 16,384 lookups): "shared" (radix passes over the whole batch), "split" (one part per
    thread, sorted privately), or "timing" while the first sorts of that width still run both (they
    give the same order; only speed differs)."""
    return SORT_WAYS[int(library().tt_sort_way())]


def last_sort_way() -> str:
    """The way whose result the kernel's last sort left ("shared" for sorts too small or on one thread)."""
    return SORT_WAYS[int(library().tt_last_sort_way())]


def force_sort_way(way: str) -> None:
    """Fix the sort's way ("shared" or "split") for sorts of at least 16,384 lookups on two or more
    threads (smaller ones always run "shared"), or "timing" to time both again on the next sorts."""
    codes = {v: k for k, v in SORT_WAYS.items()}
    if way not in codes:
        raise ValueError(f"way: got {way!r}; allowed: {sorted(codes)}")
    library().tt_force_sort_way(codes[way])


def set_profile(on: bool) -> None:
    """Whether native forwards also time their chain GEMMs and last core per thread
    (``last_stats()["seconds_chains"]``, ``["seconds_last_core"]``; d = 3), and backwards the parts of
    their i2 buckets (``last_stats("backward")["seconds_buckets_gather"]``, ``["seconds_buckets_rows"]``,
    ``["seconds_buckets_gemms"]``; d = 3). Off by default: a clock read per GEMM piece and part cost
    about 3% of the chains-and-last-core phase of a 16,384-lookup forward on one thread."""
    library().tt_set_profile(int(bool(on)))


def last_stats(which: str = "forward") -> dict[str, float]:
    """Of the last native ``forward`` or ``backward`` call: lookups, unique prefixes and chunks,
    and the seconds spent in each phase (``seconds_<phase>``, see TTStats.*_PHASES)."""
    stats = _last.get("forward" if which == "forward" else "backward")
    if stats is None:
        return {}
    return stats.as_dict(TTStats.FORWARD_PHASES if which == "forward" else TTStats.BACKWARD_PHASES)


def backward(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, grad_out: torch.Tensor,
             grads: list[torch.Tensor] | None = None, touched: list[torch.Tensor] | None = None,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES, saved: SavedForward | None = None) -> list[torch.Tensor]:
    """Core gradients (added into ``grads`` when given, else new zero tensors). ``saved``: the
    forward's kept plan for these cores and bags (used only if still valid, see SavedForward)."""
    return _backward(cores, spec, bags, mode, grad_out, grads, touched, chunk_bytes, saved)


_OPTIMIZERS = {"sgd": 1, "adagrad": 2}  # the kernel's codes (tt_backward's optimizer argument)


def _backward(cores, spec: TTSpec, bags: Bags, mode: str, grad_out: torch.Tensor, grads, touched, chunk_bytes: int,
              saved: SavedForward | None, optimizer: str | None = None, lr: float = 0.0, eps: float = 0.0,
              state: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The one native backward call: gradients into ``grads``, or with ``optimizer`` the fused
    update of the cores in place (``grads`` then a zero scratch, left zero)."""
    bags = _require(cores, spec, bags, mode)
    _check_like_cores("grads", grads, spec)
    _check_touched(touched, spec)
    return _run_backward(cores, spec, bags, mode, grad_out, grads, touched, chunk_bytes, saved, optimizer, lr, eps,
                         state)


def _run_backward(cores, spec: TTSpec, bags: Bags, mode: str, grad_out: torch.Tensor, grads, touched,
                  chunk_bytes: int, saved: SavedForward | None, optimizer: str | None, lr: float, eps: float,
                  state: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """_backward once the cores, bags and buffers passed :func:`_require` and the buffer checks."""
    if saved is not None and not isinstance(saved, SavedForward):
        raise TypeError(f"saved: got {type(saved).__name__}; expected SavedForward or None")
    _check_grad_out(grad_out, (bags.num_bags, spec.embedding_dim))
    plan = saved.pointer if saved is not None and saved.current() and saved.fits(cores, bags) else None
    cores = [_plain(c) for c in cores]
    grad_out = _plain(grad_out if grad_out.dtype == torch.float32 else grad_out.detach().to(torch.float32))
    if grads is None:
        grads = [torch.zeros(c.shape, dtype=torch.float32) for c in cores]
    w = bags.float32_weights()
    stats = TTStats()
    try:
        _call(library().tt_backward, *_batch_args(spec, cores, bags, mode, w), grad_out.data_ptr(), _ptrs(grads),
              None if touched is None else _ptrs(touched), threads_for(bags.indices.numel()), chunk_bytes,
              ctypes.byref(stats), plan, _OPTIMIZERS.get(optimizer, 0), lr, eps, None if state is None else _ptrs(state))
    finally:
        if plan is not None:  # used once: the backward takes parts of it (a second use read an emptied table)
            saved.release()
    _last["backward"] = stats
    return grads


def sparse_update(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, grad_out: torch.Tensor,
                  optimizer: str, lr: float, eps: float, scratch: list[torch.Tensor],
                  state: list[torch.Tensor] | None, saved: SavedForward | None = None) -> list[torch.Tensor]:
    """Fused backward + update of exactly the touched core slices, in place. Returns touched masks.

    ``scratch`` are zero fp32 tensors shaped like the cores (left zero again afterwards);
    ``state`` the Adagrad accumulators (same shapes), None for SGD.
    """
    check_optimizer(optimizer)
    if optimizer == "adagrad" and state is None:
        raise ValueError("state: Adagrad needs accumulators shaped like the cores")
    check_lr(lr, "lr")
    if optimizer == "adagrad":
        check_eps(eps)
    bags = _require(cores, spec, bags, mode, in_place=True)  # updated in place: no copies allowed
    _check_like_cores("scratch", scratch, spec)
    _check_like_cores("state", state, spec)
    global _update_epoch
    # (numpy allocates and zeroes without torch's dispatcher: see ttrec.bags on cold torch ops)
    touched = [torch.from_numpy(np.zeros(p, dtype=np.uint8)) for p in spec.tt_p_shapes]
    try:
        _run_backward(cores, spec, bags, mode, grad_out, scratch, touched, DEFAULT_CHUNK_BYTES, saved, optimizer, lr,
                      eps, state)
    finally:
        _update_epoch += 1  # the cores changed in that call: every kept forward plan is stale from here on
    return touched


def native_calls_step(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, grad_out: torch.Tensor,
                      lr: float):
    """For measurement: a callable that runs the fused SGD step's two native calls and nothing else,
    every argument checked and prepared here, once: the forward keeping its plan, then the backward
    with the update through that plan, as a TTEmbeddingBag(optimizer="sgd") step makes them, but
    without the module, ``make_bags``, autograd and the per-call checks and bookkeeping around them.
    Timed beside that step (benches.cpu_kernel), the difference is what the Python path costs. Each
    call updates ``cores`` in place (they must not change shape, dtype or place while it is used);
    the batch and ``grad_out`` are the same every call. No planted slowdown (plant.py) applies."""
    check_lr(lr, "lr")
    bags = _require(cores, spec, bags, mode, in_place=True)
    _check_grad_out(grad_out, (bags.num_bags, spec.embedding_dim))
    cores = list(cores)
    grad_out = _plain(grad_out.detach().to(torch.float32))
    out = torch.empty(bags.num_bags, spec.embedding_dim, dtype=torch.float32)
    scratch = [torch.zeros(c.shape, dtype=torch.float32) for c in cores]  # left zero by every update
    touched = [np.zeros(p, dtype=np.uint8) for p in spec.tt_p_shapes]  # (the kernel sets them; cleared per call)
    w = bags.float32_weights()
    lib, stats, plan = library(), TTStats(), ctypes.c_void_p()
    args = _batch_args(spec, cores, bags, mode, w)
    threads = threads_for(bags.indices.numel())
    forward_args = (*args, out.data_ptr(), threads, DEFAULT_CHUNK_BYTES, 1, ctypes.byref(stats), ctypes.byref(plan))
    touched_ptrs = (ctypes.c_void_p * len(touched))(*[t.ctypes.data for t in touched])
    backward_args = (*args, grad_out.data_ptr(), _ptrs(scratch), touched_ptrs, threads, DEFAULT_CHUNK_BYTES,
                     ctypes.byref(stats))
    sgd = (_OPTIMIZERS["sgd"], lr, 0.0, None)

    def step() -> None:
        global _update_epoch
        for t in touched:
            t.fill(0)
        _check_rc(lib.tt_forward(*forward_args), lib.tt_forward)
        try:
            rc = lib.tt_backward(*backward_args, plan.value, *sgd)
        finally:
            if plan.value:
                lib.tt_state_free(plan.value)
                plan.value = None
            _update_epoch += 1  # the cores changed: every kept forward plan is stale from here on
        _check_rc(rc, lib.tt_backward)
    step.keep = (cores, grad_out, out, scratch, touched, w, bags)  # what the prepared pointers point into
    return step


class _TTBagCPU(torch.autograd.Function):
    """Autograd's inputs are the cores, or with a fused update a 0-d anchor in their place: that
    backward returns no core gradients, and one input instead of three saved ones made an apply and
    backward with cold caches 0.61x the time (209 against 344 us, a trivial Function on the Zen 5
    VM). Autograd's check that saved tensors were not changed in place is kept by hand there."""

    @staticmethod
    def forward(ctx, spec, bags, mode, fused, keep, cores, *inputs):
        ctx.spec, ctx.bags, ctx.mode, ctx.fused = spec, bags, mode, fused
        if fused is None:
            ctx.save_for_backward(*cores)
        else:
            ctx.cores, ctx.versions = cores, tuple(c._version for c in cores)
        # (the inputs passed _require in tt_bag_cpu)
        out, ctx.saved_plan = _run_forward(list(cores), spec, bags, mode, DEFAULT_CHUNK_BYTES, keep)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_changed_batch(ctx.bags, KERNEL)  # the backward reads the batch again: it must be the forward's
        if ctx.fused is not None:
            cores = list(ctx.cores)
            if tuple(c._version for c in cores) != ctx.versions:
                raise RuntimeError("one of the TT cores needed for the fused update has been modified by an inplace "
                                   "operation since the forward (as autograd refuses for saved tensors)")
        else:
            cores = list(ctx.saved_tensors)
        saved, ctx.saved_plan = ctx.saved_plan, None  # one use: a retained graph's next backward recomputes
        if saved is not None and not saved.current():  # a fused update ran since the forward
            saved.release()
            saved = None
        try:
            if ctx.fused is not None:  # the update happens here; autograd sees no core gradients
                kw = {} if saved is None else {"saved": saved}
                fused_update_once(ctx, KERNEL, lambda: ctx.fused(cores, ctx.spec, ctx.bags, ctx.mode, grad_out, **kw))
                return (None,) * 7
            grads = backward(cores, ctx.spec, ctx.bags, ctx.mode, grad_out, saved=saved)
        finally:
            if saved is not None:
                saved.release()
        return (None,) * 6 + tuple(without_second_derivative(grads, grad_out, cores, KERNEL))


_ANCHOR = torch.zeros((), requires_grad=True)  # the fused path's one autograd input (never gets a gradient)


def tt_bag_cpu(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str = "sum", fused=None) -> torch.Tensor:
    """Differentiable native lookup. ``fused(cores, spec, bags, mode, grad_out)``, when given, is
    called in backward instead of returning core gradients (the fused sparse optimizer); if it has
    an ``accepts_saved`` attribute set, it also gets ``saved=`` (the forward's SavedForward) to pass
    on to :func:`sparse_update`."""
    w = bags.per_sample_weights
    if w is not None and w.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("per_sample_weights that require grad: the native CPU kernel gives no "
                                  "gradient for the weights; use backend='torch' for that")
    bags = _require(cores, spec, bags, mode)  # once, here: the Function's forward trusts them
    # keep the forward's plan only for a backward that can come (never under no_grad / inference_mode)
    graph = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
    if not graph:  # nothing to differentiate: the kernel alone (an autograd Function call costs ~0.1 ms)
        return _run_forward(cores, spec, bags, mode, DEFAULT_CHUNK_BYTES, False)[0]
    if fused is None:
        return _TTBagCPU.apply(spec, bags, mode, None, True, tuple(cores), *cores)
    return _TTBagCPU.apply(spec, bags, mode, fused, getattr(fused, "accepts_saved", False), tuple(cores), _ANCHOR)
