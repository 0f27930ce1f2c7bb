"""The CUDA backend of TTEmbeddingBag: run-time compiled kernels launched on torch's stream.

The kernels (``impl/cuda/*.cu``) are compiled when first used, with NVRTC through CuPy
(``cupy.RawModule``; CuPy caches the binaries on disk), with the options of
:func:`ttrec.cuda.launch.nvrtc_options`. torch tensors are passed zero-copy as device pointers, and
every launch goes to ``torch.cuda.current_stream()`` (``cupy.cuda.ExternalStream``), so the kernels
are ordered with torch's own work and its caching allocator.

The orchestration here (validation, launch plans, prefix de-duplication, chunking, the optimizer
step, the cache composition) is device-agnostic: every function takes an optional ``launcher``,
and the tests run all of it on the CPU with the kernels compiled by g++ (impl/cuda/emulation.h).
Nothing here imports CuPy at module import time; :func:`unavailable_reason` says why the backend
cannot run (no CuPy, no GPU) without raising.

Inputs are validated in Python before any launch: bags as :func:`ttrec.bags.make_bags` leaves them
(checked again here, cheaply, since a bad index in a kernel is a memory error, not an exception),
cores of the spec's shapes in fp32 on the launcher's device.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol, Sequence

import torch

from ..autograd_guards import fused_update_once, refuse_changed_batch, without_second_derivative
from ..bags import MODES, Bags, in_memory
from ..optim import check_eps, check_lr, check_optimizer
from ..reference import row_digits
from ..shapes import TTSpec
from . import launch as plan

__all__ = ["unavailable_reason", "tt_bag_cuda", "forward", "backward", "sparse_update", "count_rows",
           "cache_partition", "cached_forward", "cache_sgd", "check_supported", "Launcher", "CupyLauncher",
           "ALGOS", "DEFAULT_CHUNK_BYTES"]

ALGOS = ("auto", "fused", "prefix")
DEFAULT_CHUNK_BYTES = 64 << 20
KERNEL = "CUDA kernel"  # its name in the backward's errors (ttrec.autograd_guards)
_ELEM_DTYPES = {"float": torch.float32, "int64_t": torch.int64, "uint8_t": torch.uint8}
_INSTALL_HINT = "install the optional extra: pip install 'ttrec-bench[cuda]'"


# ---- availability ----

@lru_cache(maxsize=1)
def _cupy_import_problem() -> str | None:
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library error raised while importing
        return f"cupy is not installed or fails to import ({type(exc).__name__}: {exc}); {_INSTALL_HINT}"
    return None


def unavailable_reason() -> str | None:
    """None if the CUDA backend can run here, else every reason it cannot."""
    reasons = []
    problem = _cupy_import_problem()
    if problem is not None:
        reasons.append(problem)
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        reasons.append(f"no GPU: torch.cuda.is_available() is False ({why})")
    return "; ".join(reasons) or None


# ---- launchers ----

class Launcher(Protocol):
    """Runs one kernel: ``launch(name, grid, block, smem_bytes, args)`` with ``args`` a list of
    (kind, value) pairs as :func:`_marshal` makes them. ``device`` is where tensors must live."""

    device: torch.device
    block: int
    max_blocks: int
    smem_limit: int

    def launch(self, name: str, grid: int, block: int, smem: int, args: list[tuple[str, int | float]]) -> None: ...


@lru_cache(maxsize=None)
def _module(source: str, device_index: int):
    import cupy

    path = next(p for p in plan.SOURCES if p.name == source)
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=path.read_text(), options=plan.nvrtc_options(), backend="nvrtc")


class CupyLauncher:
    """Launches the NVRTC-compiled kernels on a CUDA device, on torch's current stream."""

    def __init__(self, device: torch.device) -> None:
        import cupy

        self._cupy = cupy
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        props = torch.cuda.get_device_properties(self.device)
        self.block = plan.DEFAULT_BLOCK
        self.max_blocks = max(1, props.multi_processor_count * 32)
        self.smem_limit = int(getattr(props, "shared_memory_per_block_optin", 0) or plan.DEFAULT_SMEM_LIMIT)

    def launch(self, name, grid, block, smem, args) -> None:
        import numpy as np

        cp = self._cupy
        conv = {"ptr": np.uint64, "i64": np.int64, "i32": np.int32, "f32": np.float32}
        cargs = tuple(conv[kind](value) for kind, value in args)
        stream = torch.cuda.current_stream(self.device)
        # All of it with this launcher's device current: CuPy compiles and loads a module, and keeps
        # a kernel's function and its attributes, per *current* device (RawModule is compiled lazily,
        # RawKernel.kernel looks up runtime.getDevice()). Outside, with another device current, the
        # opt-in below would be set on that device's function, not on the one launched here.
        with cp.cuda.Device(self.device.index), cp.cuda.ExternalStream(stream.cuda_stream, self.device.index):
            kernel = _module(plan.kernel_sources()[name].name, self.device.index).get_function(name)
            if smem > plan.DEFAULT_SMEM_LIMIT and kernel.max_dynamic_shared_size_bytes < smem:
                kernel.max_dynamic_shared_size_bytes = smem  # opt-in beyond the default 48 KiB
            kernel((grid,), (block,), cargs, shared_mem=smem)


_launchers: dict[int, CupyLauncher] = {}


def _default_launcher(device: torch.device) -> Launcher:
    reason = unavailable_reason()  # first: on a machine without a GPU that is the reason, not the tensors' device
    if reason is not None:
        raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    if device.type != "cuda":
        raise ValueError(f"backend='cuda': tensors are on {device}; the CUDA kernels need CUDA tensors")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _launchers:
        _launchers[index] = CupyLauncher(torch.device("cuda", index))
    return _launchers[index]


def _marshal(name: str, args: Sequence, device: torch.device) -> list[tuple[str, int | float]]:
    """Check ``args`` against the kernel's prototype and turn them into (kind, value) pairs."""
    sig = plan.kernel_signatures()[name]
    if len(args) != len(sig):
        raise TypeError(f"{name}: got {len(args)} arguments, the prototype has {len(sig)}")
    out: list[tuple[str, int | float]] = []
    for a, value in zip(sig, args):
        if a.kind == "ptr":
            if value is None:
                out.append(("ptr", 0))
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}({a.name}): expected a tensor or None, got {type(value).__name__}")
            if value.dtype != _ELEM_DTYPES[a.elem] or value.device != device or not value.is_contiguous() \
                    or value.is_neg():
                raise TypeError(f"{name}({a.name}): expected a contiguous {_ELEM_DTYPES[a.elem]} tensor on {device}, "
                                f"got {value.dtype} on {value.device} (contiguous={value.is_contiguous()}, "
                                f"negative view={value.is_neg()})")
            out.append(("ptr", value.data_ptr()))
        elif a.kind == "f32":
            out.append(("f32", float(value)))
        else:
            v = int(value)
            limit = 2**63 if a.kind == "i64" else 2**31
            if not -limit <= v < limit:
                raise OverflowError(f"{name}({a.name}): {v} does not fit {a.kind}")
            out.append((a.kind, v))
    return out


def _launch(ln: Launcher, name: str, grid: int, block: int, smem: int, *args) -> None:
    ln.launch(name, grid, block, smem, _marshal(name, args, ln.device))


# ---- validation ----

# A negative view (torch._neg_view, the imaginary part of a conj view) keeps its values negated only
# in a flag; a kernel reads its memory. Inputs the kernels only read are resolved (a copy), as
# ttrec.bags.make_bags does; tensors they write in place, and hand-built Bags, are refused.
_NEG_VIEW = "a negative view (torch._neg_view, or the imaginary part of a conj view), whose values are negated " \
            "only in a flag the kernels do not read"


def _refuse_neg_view(name: str, t: torch.Tensor, why: str) -> None:
    if t.is_neg():
        raise ValueError(f"{name}: got {_NEG_VIEW}; {why}")


def check_supported(cores: Sequence[torch.Tensor], spec: TTSpec, device: torch.device | None = None) -> str | None:
    """None if the kernels can run these cores, else why not."""
    if not 2 <= spec.d <= plan.TT_MAX_D:
        return f"d={spec.d} cores; the CUDA kernels support 2..{plan.TT_MAX_D}"
    if len(cores) != spec.d:
        return f"got {len(cores)} cores for d={spec.d}"
    device = cores[0].device if device is None else device
    for k, c in enumerate(cores):
        if c.device != device:
            return f"core {k} is on {c.device}, expected {device}"
        if c.dtype != torch.float32:
            return f"core {k} has dtype {c.dtype}; the CUDA kernels support torch.float32"
        if tuple(c.shape) != spec.core_shape(k):
            return f"core {k} has shape {tuple(c.shape)}, expected {spec.core_shape(k)}"
    if max(plan.partial_sizes(spec.tt_q_shapes, spec.ranks)) >= 2**31:
        return "a partial product has >= 2^31 entries; the kernels index one row's products with int32"
    return None


def _check_bags(bags: Bags, mode: str, ln: Launcher, num_embeddings: int | None = None) -> None:
    """Bags as :func:`ttrec.bags.make_bags` leaves them, on the launcher's device: a kernel trusts
    the offsets (and, with ``num_embeddings``, the index range), so a bad one is a memory error."""
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; allowed: {MODES}")
    if not isinstance(bags, Bags):
        raise TypeError(f"bags: got {type(bags).__name__}; build it with ttrec.bags.make_bags")
    idx, off, w = bags.indices, bags.offsets, bags.per_sample_weights
    for name, t in (("indices", idx), ("offsets", off)):
        if t.dtype != torch.int64 or t.dim() != 1 or t.device != ln.device:
            raise ValueError(f"bags.{name}: expected 1D int64 on {ln.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    for name, t in (("indices", idx), ("offsets", off), ("per_sample_weights", w)):
        if t is not None:  # checked on values, read from memory: an index of -5 would pass as 5
            _refuse_neg_view(f"bags.{name}", t, "build the bags with ttrec.bags.make_bags, which resolves it")
    n = idx.numel()
    if off.numel() < 1:
        raise ValueError("bags.offsets: empty; it needs num_bags + 1 entries (use ttrec.bags.make_bags)")
    # one host sync for all the checks: first/last offset, decreasing steps, index range
    zero = torch.zeros(1, dtype=torch.int64, device=off.device)
    lo_hi = torch.stack(list(torch.aminmax(idx))) if n else torch.tensor([0, 0], device=off.device)
    first, last, drops, lo, hi = torch.cat([off[:1], off[-1:], (off[1:] < off[:-1]).sum().reshape(1) + zero,
                                            lo_hi.to(torch.int64)]).tolist()
    if first != 0 or last != n:
        raise ValueError(f"bags.offsets: got offsets[0]={first}, offsets[-1]={last}; they must be 0 and "
                         f"len(indices)={n} (use ttrec.bags.make_bags)")
    if drops:
        raise ValueError(f"bags.offsets: {drops} decreasing step(s); offsets must be non-decreasing "
                         "(use ttrec.bags.make_bags)")
    if num_embeddings is not None and n and (lo < 0 or hi >= num_embeddings):
        raise ValueError(f"bags.indices: values must be in [0, {num_embeddings}), got [{lo}, {hi}]")
    if w is not None:
        if w.shape != idx.shape or w.device != ln.device or not w.is_floating_point():
            raise ValueError(f"bags.per_sample_weights: got {w.dtype} {tuple(w.shape)} on {w.device}; expected "
                             f"floating {tuple(idx.shape)} on {ln.device}")
        if mode != "sum":
            raise ValueError("per_sample_weights are only supported with mode='sum'")


def _check(cores, spec: TTSpec, bags: Bags, mode: str, ln: Launcher) -> list[torch.Tensor]:
    reason = check_supported(cores, spec, ln.device)
    if reason is not None:
        raise ValueError(f"backend='cuda': {reason}")
    _check_bags(bags, mode, ln, spec.num_embeddings)
    return [in_memory(c.detach()).contiguous() for c in cores]


@lru_cache(maxsize=64)
def _descriptor(p: tuple, q: tuple, ranks: tuple, device: torch.device) -> torch.Tensor:
    """The shape descriptor on ``device``, uploaded once per (shape, device)."""
    return torch.tensor(plan.shape_descriptor(p, q, ranks), dtype=torch.int64).to(device)


def _desc(spec: TTSpec, device: torch.device) -> torch.Tensor:
    return _descriptor(spec.tt_p_shapes, spec.tt_q_shapes, spec.ranks, device)


def _choose(algo: str, fits: bool) -> str:
    if algo not in ALGOS:
        raise ValueError(f"algo: got {algo!r}; allowed: {ALGOS}")
    if algo == "fused" and not fits:
        raise ValueError("algo='fused': one lookup's partial products do not fit the shared memory of a block; "
                         "use algo='prefix' or 'auto'")
    return ("fused" if fits else "prefix") if algo == "auto" else algo


# ---- prefix path helpers ----

def _prefix_levels(ln: Launcher, spec: TTSpec, cores, desc, uniq: torch.Tensor) -> list[torch.Tensor | None]:
    """[None, P_1, ..., P_{d-2}] for the unique prefixes ``uniq`` (P_0 stays in core 0)."""
    sizes = plan.partial_sizes(spec.tt_q_shapes, spec.ranks)
    U = uniq.numel()
    levels: list[torch.Tensor | None] = [None]
    for k in range(1, spec.d - 1):
        out = torch.empty(U, sizes[k], dtype=torch.float32, device=ln.device)
        _launch(ln, "tt_prefix_level", plan.grid_size(U * sizes[k], ln.block, ln.max_blocks), ln.block, 0,
                desc, cores[0], cores[k], uniq, U, k, levels[k - 1], out)
        levels.append(out)
    return levels


def _chunk_bags(offsets: torch.Tensor, s0: int, e0: int) -> tuple[int, int]:
    """[b0, b1): the bags with lookups inside [s0, e0)."""
    bounds = torch.tensor([s0, e0], dtype=torch.int64, device=offsets.device)
    b0 = int(torch.searchsorted(offsets[1:], bounds[:1], right=True)[0])
    b1 = int(torch.searchsorted(offsets[:-1], bounds[1:], right=False)[0])
    return b0, b1


# ---- forward / backward / update ----

def forward(cores: Sequence[torch.Tensor], spec: TTSpec, bags: Bags, mode: str = "sum", *,
            launcher: Launcher | None = None, algo: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Pooled rows (num_bags, D), fp32, no autograd.

    algo: "fused" (one block per bag, the chain in shared memory), "prefix" (partial products of
    each unique prefix computed once per chunk of lookups, then rows finished and pooled), or
    "auto" (fused when its shared memory fits, else prefix).
    """
    ln = launcher or _default_launcher(cores[0].device)
    cores = _check(cores, spec, bags, mode, ln)
    q, ranks = spec.tt_q_shapes, spec.ranks
    D, nb, n = spec.embedding_dim, bags.num_bags, bags.num_lookups
    desc, w, mean = _desc(spec, ln.device), bags.float32_weights(), int(mode == "mean")
    L, smem = plan.plan_lookups(plan.fwd_bag_smem_bytes, q, ranks, ln.smem_limit)
    padded = [*cores, *[None] * (plan.TT_MAX_D - spec.d)]
    if _choose(algo, L > 0) == "fused":
        out = torch.empty(nb, D, dtype=torch.float32, device=ln.device)
        if nb:
            _launch(ln, "tt_fwd_bag", plan.bag_grid(nb, ln.max_blocks), ln.block, smem,
                    desc, *padded, bags.indices, bags.offsets, nb, w, mean, L, out)
        return out
    out = torch.zeros(nb, D, dtype=torch.float32, device=ln.device)
    chunk = plan.prefix_chunk_lookups(q, ranks, chunk_bytes)
    p_last = spec.tt_p_shapes[-1]
    for s0 in range(0, n, chunk):
        e0 = min(n, s0 + chunk)
        prefix = bags.indices[s0:e0] // p_last
        if spec.d == 2:  # P_0 of prefix i_0 is core 0's slice: no partials to build
            slot, partials = prefix.contiguous(), cores[0]
        else:
            uniq, slot = torch.unique(prefix, return_inverse=True)
            partials = _prefix_levels(ln, spec, cores, desc, uniq)[-1]
        b0, b1 = _chunk_bags(bags.offsets, s0, e0)
        _launch(ln, "tt_fwd_finish", plan.grid_size((b1 - b0) * D, ln.block, ln.max_blocks), ln.block, 0,
                desc, cores[-1], bags.indices, bags.offsets, w, mean, b0, b1, s0, e0, slot, partials, out)
    return out


def backward(cores: Sequence[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, grad_out: torch.Tensor,
             grads: list[torch.Tensor] | None = None, touched: list[torch.Tensor] | None = None, *,
             launcher: Launcher | None = None, algo: str = "auto",
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[torch.Tensor]:
    """Core gradients, added (atomicAdd) into ``grads`` when given, else into new zero tensors.
    ``touched`` (uint8, one per core of length p_k), when given, gets 1 at every slice used."""
    ln = launcher or _default_launcher(cores[0].device)
    cores = _check(cores, spec, bags, mode, ln)
    q, ranks, D = spec.tt_q_shapes, spec.ranks, spec.embedding_dim
    grad_out = in_memory(grad_out.detach().to(torch.float32)).contiguous()
    if tuple(grad_out.shape) != (bags.num_bags, D) or grad_out.device != ln.device:
        raise ValueError(f"grad_out: got {tuple(grad_out.shape)} on {grad_out.device}; expected {(bags.num_bags, D)} on {ln.device}")
    if grads is None:
        grads = [torch.zeros_like(c) for c in cores]
    for name, ts in (("grads", grads), ("touched", touched)):
        if ts is not None and len(ts) != spec.d:
            raise ValueError(f"{name}: got {len(ts)} tensors; expected one per core, d={spec.d}")
    for k, g in enumerate(grads):
        if g.shape != cores[k].shape or g.dtype != torch.float32 or g.device != ln.device or not g.is_contiguous():
            raise ValueError(f"grads[{k}]: expected a contiguous fp32 tensor of shape {tuple(cores[k].shape)} on {ln.device}")
        _refuse_neg_view(f"grads[{k}]", g, "the kernels add into it in place")
    if touched is not None:
        for k, t in enumerate(touched):
            if t.dtype != torch.uint8 or t.shape != (spec.tt_p_shapes[k],) or t.device != ln.device:
                raise ValueError(f"touched[{k}]: expected uint8 ({spec.tt_p_shapes[k]},) on {ln.device}")
    desc, w, mean = _desc(spec, ln.device), bags.float32_weights(), int(mode == "mean")
    nb, n = bags.num_bags, bags.num_lookups
    L, smem = plan.plan_lookups(plan.bwd_bag_smem_bytes, q, ranks, ln.smem_limit)
    padded_c = [*cores, *[None] * (plan.TT_MAX_D - spec.d)]
    padded_g = [*grads, *[None] * (plan.TT_MAX_D - spec.d)]
    chosen = _choose(algo, L > 0)
    if n and chosen == "fused":
        _launch(ln, "tt_bwd_bag", plan.bag_grid(nb, ln.max_blocks), ln.block, smem,
                desc, *padded_c, bags.indices, bags.offsets, nb, w, mean, L, grad_out, *padded_g)
    elif n:
        _backward_prefix(ln, spec, cores, grads, bags, w, mean, grad_out, desc, chunk_bytes)
    if touched is not None and n:
        digits = row_digits(bags.indices, spec.tt_p_shapes)
        for k in range(spec.d):
            touched[k].index_fill_(0, digits[k], 1)
    return grads


def _backward_prefix(ln, spec, cores, grads, bags, w, mean, grad_out, desc, chunk_bytes) -> None:
    sizes = plan.partial_sizes(spec.tt_q_shapes, spec.ranks)
    d, n, blk, mb = spec.d, bags.num_lookups, ln.block, ln.max_blocks
    r_last, q_last = spec.ranks[d - 1], spec.tt_q_shapes[d - 1]
    bag_of = bags.bag_ids().contiguous()
    chunk = plan.prefix_chunk_lookups(spec.tt_q_shapes, spec.ranks, chunk_bytes, backward=True)
    for s0 in range(0, n, chunk):
        e0 = min(n, s0 + chunk)
        prefix = bags.indices[s0:e0] // spec.tt_p_shapes[-1]
        uniq, inv = torch.unique(prefix, return_inverse=True)
        U = uniq.numel()
        order = torch.argsort(inv, stable=True)
        prefix_start = torch.zeros(U + 1, dtype=torch.int64, device=ln.device)
        prefix_start[1:] = torch.cumsum(torch.bincount(inv, minlength=U), 0)
        if d == 2:
            levels, slot, partials = [None], prefix.contiguous(), cores[0]
        else:
            levels = _prefix_levels(ln, spec, cores, desc, uniq)
            slot, partials = inv, levels[-1]
        _launch(ln, "tt_bwd_last_grad", plan.grid_size((e0 - s0) * r_last * q_last, blk, mb), blk, 0,
                desc, bags.indices, bags.offsets, bag_of, w, mean, s0, e0, slot, partials, grad_out, grads[d - 1])
        dp = torch.empty(U, sizes[d - 2], dtype=torch.float32, device=ln.device)
        _launch(ln, "tt_bwd_last_dp", plan.grid_size(U * sizes[d - 2], blk, mb), blk, 0,
                desc, cores[d - 1], bags.indices, bags.offsets, bag_of, w, mean, s0, U, prefix_start, order,
                grad_out, dp)
        for k in range(d - 2, 0, -1):
            n_grad = spec.ranks[k] * spec.tt_q_shapes[k] * spec.ranks[k + 1]
            _launch(ln, "tt_bwd_level_grad", plan.grid_size(U * n_grad, blk, mb), blk, 0,
                    desc, cores[0], uniq, U, k, levels[k - 1], dp, grads[k])
            dp_prev = torch.empty(U, sizes[k - 1], dtype=torch.float32, device=ln.device)
            _launch(ln, "tt_bwd_level_dp", plan.grid_size(U * sizes[k - 1], blk, mb), blk, 0,
                    desc, cores[k], uniq, U, k, dp, dp_prev)
            dp = dp_prev
        _launch(ln, "tt_bwd_first", plan.grid_size(U * sizes[0], blk, mb), blk, 0, desc, uniq, U, dp, grads[0])


def sparse_update(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, grad_out: torch.Tensor,
                  optimizer: str, lr: float, eps: float, scratch: list[torch.Tensor],
                  state: list[torch.Tensor] | None, *, launcher: Launcher | None = None,
                  algo: str = "auto") -> list[torch.Tensor]:
    """Fused backward + SGD/Adagrad step of exactly the touched core slices, in place (the signature
    of ``ttrec.cpu.ops.sparse_update``). ``scratch``: zero fp32 tensors shaped like the cores (zero
    again afterwards); ``state``: Adagrad's accumulators, None for SGD. Returns the touched masks."""
    check_optimizer(optimizer)
    check_lr(lr, "lr")
    adagrad = optimizer == "adagrad"
    if adagrad:
        check_eps(eps)
    if len(cores) != spec.d:  # first: the loop below pairs each core with its accumulator
        raise ValueError(f"cores: got {len(cores)} tensors; expected one per core, d={spec.d}")
    if adagrad and (state is None or len(state) != spec.d):
        raise ValueError("state: Adagrad needs one accumulator per core, shaped like the cores")
    ln = launcher or _default_launcher(cores[0].device)
    for k, c in enumerate(cores):
        if not c.is_contiguous():
            raise ValueError(f"cores[{k}] must be contiguous for the in-place update")
        _refuse_neg_view(f"cores[{k}]", c, "the update writes the cores in place")
        if adagrad and (state[k].shape != c.shape or state[k].dtype != torch.float32 or not state[k].is_contiguous()
                        or state[k].device != c.device):
            raise ValueError(f"state[{k}]: expected a contiguous fp32 tensor shaped like core {k}")
        if adagrad:
            _refuse_neg_view(f"state[{k}]", state[k], "the update writes the accumulators in place")
    touched = [torch.zeros(p, dtype=torch.uint8, device=ln.device) for p in spec.tt_p_shapes]
    backward(cores, spec, bags, mode, grad_out, grads=scratch, touched=touched, launcher=ln, algo=algo)
    desc = _desc(spec, ln.device)
    for k, c in enumerate(cores):
        ids = torch.nonzero(touched[k]).flatten()
        m = ids.numel()
        if m == 0:
            continue
        per = spec.ranks[k] * spec.tt_q_shapes[k] * spec.ranks[k + 1]
        _launch(ln, "tt_sparse_update", plan.grid_size(m * per, ln.block, ln.max_blocks), ln.block, 0,
                desc, k, c.data, scratch[k], state[k] if adagrad else None, ids, m, int(adagrad), lr, eps)
    return touched


# ---- LFU cache kernels ----

def _check_indices(indices: torch.Tensor, ln: Launcher, bound: int, what: str) -> None:
    if indices.dtype != torch.int64 or indices.dim() != 1 or indices.device != ln.device:
        raise ValueError(f"indices: expected 1D int64 on {ln.device}")
    if indices.numel():
        lo, hi = torch.aminmax(indices)
        if int(lo) < 0 or int(hi) >= bound:
            raise ValueError(f"indices: values must be in [0, {bound}) ({what}), got [{int(lo)}, {int(hi)}]")


def count_rows(indices: torch.Tensor, counts: torch.Tensor, *, launcher: Launcher | None = None) -> torch.Tensor:
    """counts[i] += occurrences of row i in ``indices`` (int64 counts, one per row), in place."""
    ln = launcher or _default_launcher(indices.device)
    if counts.dtype != torch.int64 or counts.dim() != 1 or counts.device != ln.device:
        raise ValueError(f"counts: expected a 1D int64 tensor on {ln.device}")
    _refuse_neg_view("counts", counts, "the kernel adds into it in place")
    indices = in_memory(indices)
    _check_indices(indices, ln, counts.numel(), "one count per row")
    n = indices.numel()
    if n:
        _launch(ln, "tt_count_rows", plan.grid_size(n, ln.block, ln.max_blocks), ln.block, 0, indices, n, counts)
    return counts


def cache_partition(indices: torch.Tensor, row_slot: torch.Tensor, *,
                    launcher: Launcher | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, cached) per lookup: its cache slot (-1 when the row is served by the TT cores) and 1/0."""
    ln = launcher or _default_launcher(indices.device)
    if row_slot.dtype != torch.int64 or row_slot.dim() != 1 or row_slot.device != ln.device:
        raise ValueError(f"row_slot: expected a 1D int64 tensor (one slot or -1 per row) on {ln.device}")
    indices, row_slot = in_memory(indices), in_memory(row_slot)
    _check_indices(indices, ln, row_slot.numel(), "one slot per row")
    n = indices.numel()
    slot = torch.empty(n, dtype=torch.int64, device=ln.device)
    cached = torch.empty(n, dtype=torch.uint8, device=ln.device)
    if n:
        _launch(ln, "tt_cache_partition", plan.grid_size(n, ln.block, ln.max_blocks), ln.block, 0,
                indices, n, row_slot, slot, cached)
    return slot, cached


def _check_cache_table(cache: torch.Tensor, ln: Launcher) -> None:
    if cache.dtype != torch.float32 or cache.dim() != 2 or cache.device != ln.device or not cache.is_contiguous():
        raise ValueError(f"cache: got {cache.dtype} {tuple(cache.shape)} on {cache.device} "
                         f"(contiguous={cache.is_contiguous()}); expected a contiguous 2D fp32 tensor on {ln.device}")
    _refuse_neg_view("cache", cache, "the kernels read it from memory and update it in place")


def _check_cache(cache: torch.Tensor, slot: torch.Tensor, bags: Bags, ln: Launcher) -> None:
    _check_cache_table(cache, ln)
    if slot.shape != bags.indices.shape or slot.dtype != torch.int64 or slot.device != ln.device:
        raise ValueError("slot: expected int64, one per lookup (from cache_partition)")
    if slot.numel() and int(slot.max()) >= cache.shape[0]:
        raise ValueError(f"slot: values must be < the cache's {cache.shape[0]} rows")


def cached_forward(cores: Sequence[torch.Tensor], spec: TTSpec, bags: Bags, mode: str, cache: torch.Tensor,
                   row_slot: torch.Tensor, *, launcher: Launcher | None = None,
                   algo: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled rows where cached rows come from ``cache`` (C, D) and the others from the TT cores.

    Returns (out, slot). The TT part runs on the uncached lookups only (compacted, with the bag's
    mean scale folded into their weights, so both parts use the full bag size).
    """
    ln = launcher or _default_launcher(cores[0].device)
    _check(cores, spec, bags, mode, ln)
    _check_cache_table(cache, ln)
    if cache.shape[1] != spec.embedding_dim:
        raise ValueError(f"cache: rows of {cache.shape[1]} floats, expected embedding_dim={spec.embedding_dim}")
    slot, cached = cache_partition(bags.indices, row_slot, launcher=ln)
    _check_cache(cache, slot, bags, ln)
    keep = cached == 0
    bag_ids = bags.bag_ids()
    w = bags.float32_weights()
    w = torch.ones(bags.num_lookups, dtype=torch.float32, device=ln.device) if w is None else w
    if mode == "mean":
        w = w / bags.bag_sizes().clamp(min=1).to(torch.float32)[bag_ids]
    offsets = torch.zeros(bags.num_bags + 1, dtype=torch.int64, device=ln.device)
    offsets[1:] = torch.cumsum(torch.bincount(bag_ids[keep], minlength=bags.num_bags), 0)
    sub = Bags(bags.indices[keep].contiguous(), offsets, w[keep].contiguous())
    out = forward(cores, spec, sub, "sum", launcher=ln, algo=algo)
    nb, D = bags.num_bags, spec.embedding_dim
    if nb:
        _launch(ln, "tt_cache_gather", plan.grid_size(nb * D, ln.block, ln.max_blocks), ln.block, 0,
                cache, D, slot, bags.offsets, nb, bags.float32_weights(), int(mode == "mean"), out)
    return out, slot


def cache_sgd(cache: torch.Tensor, slot: torch.Tensor, bags: Bags, mode: str, grad_out: torch.Tensor, lr: float, *,
              launcher: Launcher | None = None) -> None:
    """SGD step of the cached rows from the pooled output's gradient, in place."""
    ln = launcher or _default_launcher(cache.device)
    check_lr(lr, "lr")
    _check_bags(bags, mode, ln)  # the kernel walks every bag's offsets and weights
    slot = in_memory(slot)
    _check_cache(cache, slot, bags, ln)
    D, nb = cache.shape[1], bags.num_bags
    grad_out = in_memory(grad_out.detach().to(torch.float32)).contiguous()
    if tuple(grad_out.shape) != (nb, D) or grad_out.device != ln.device:
        raise ValueError(f"grad_out: expected {(nb, D)} on {ln.device}")
    if nb:
        _launch(ln, "tt_cache_sgd", plan.grid_size(nb * D, ln.block, ln.max_blocks), ln.block, 0,
                cache, D, slot, bags.offsets, nb, bags.float32_weights(), int(mode == "mean"), grad_out, lr)


# ---- autograd ----

class _TTBagCUDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, bags, mode, fused, launcher, algo, *cores):
        ctx.spec, ctx.bags, ctx.mode, ctx.fused, ctx.launcher, ctx.algo = spec, bags, mode, fused, launcher, algo
        ctx.save_for_backward(*cores)
        return forward(list(cores), spec, bags, mode, launcher=launcher, algo=algo)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_changed_batch(ctx.bags, KERNEL)  # the backward kernels read the batch again
        cores = list(ctx.saved_tensors)
        none = (None,) * 6
        if ctx.fused is not None:  # the fused optimizer updates the cores; autograd sees no gradient
            fused_update_once(ctx, KERNEL, lambda: ctx.fused(cores, ctx.spec, ctx.bags, ctx.mode, grad_out))
            return (*none, *[None] * len(cores))
        grads = backward(cores, ctx.spec, ctx.bags, ctx.mode, grad_out, launcher=ctx.launcher, algo=ctx.algo)
        return (*none, *without_second_derivative(grads, grad_out, cores, KERNEL))


def tt_bag_cuda(cores: list[torch.Tensor], spec: TTSpec, bags: Bags, mode: str = "sum", fused=None, *,
                launcher: Launcher | None = None, algo: str = "auto") -> torch.Tensor:
    """Differentiable lookup with the CUDA kernels (the ``cuda`` entry of ``ttrec.tt.BACKENDS``).

    ``fused(cores, spec, bags, mode, grad_out)``, when given, is called in backward instead of
    returning core gradients (the fused sparse optimizer; see :func:`sparse_update`).
    """
    w = bags.per_sample_weights
    if w is not None and w.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("per_sample_weights that require grad: the CUDA kernels give no gradient for "
                                  "the weights; use backend='torch' for that")
    ln = launcher or _default_launcher(cores[0].device)
    return _TTBagCUDA.apply(spec, bags, mode, fused, ln, algo, *cores)
