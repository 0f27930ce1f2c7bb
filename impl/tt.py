"""TTEmbeddingBag: an nn.EmbeddingBag-compatible module whose table is stored as TT cores.

The module owns the cores and dispatches the lookup to a backend:

- ``torch``: the reference algorithm in plain PyTorch (:mod:`ttrec.reference`), any device;
- ``cpu``: the native CPU kernel (when built);
- ``cuda``: the CUDA kernels through CuPy (when a GPU and CuPy are present);
- ``auto`` (default): ``cuda`` for CUDA tensors, else ``cpu`` when available, else ``torch``.
"""

from __future__ import annotations

import numbers
import threading
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .bags import MODES, Bags, make_bags
from .cpu import ops as cpu_ops
from .cuda import loader as cuda_loader
from .init import INIT_SCHEMES, init_tt_cores
from .optim import check_eps, check_lr, check_optimizer
from .reference import tt_embedding_bag, tt_to_dense
from .shapes import TTSpec, check_flag, check_size, suggest_tt_shapes

__all__ = ["TTEmbeddingBag", "BACKENDS", "register_backend", "backend_status", "tt_spec"]

# name -> (forward(cores, spec, bags, mode) -> (num_bags, D), availability() -> None | reason)
BackendFn = Callable[[list[torch.Tensor], TTSpec, Bags, str], torch.Tensor]
BACKENDS: dict[str, tuple[BackendFn, Callable[[], str | None]]] = {
    "torch": (tt_embedding_bag, lambda: None),
    "cpu": (cpu_ops.tt_bag_cpu, cpu_ops.unavailable_reason),
    "cuda": (cuda_loader.tt_bag_cuda, cuda_loader.unavailable_reason),
}
BACKEND_NAMES = ("auto", "torch", "cpu", "cuda")


def register_backend(name: str, forward: BackendFn, unavailable: Callable[[], str | None]) -> None:
    """Add a backend; ``unavailable()`` returns None when usable, else the reason it is not."""
    BACKENDS[name] = (forward, unavailable)


def backend_status(name: str) -> str | None:
    """None if backend ``name`` can run here, else why not."""
    if name not in BACKENDS:
        return f"backend {name!r} is not built into this installation"
    return BACKENDS[name][1]()


def check_device(device: torch.device | str | None) -> None:
    """The ``device`` argument of the embedding bags: a CUDA device needs CUDA (a ValueError naming
    the argument, not torch's bare AssertionError when the cores are moved there)."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device: got {device!r}; allowed: cpu, cuda, cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: got {str(device)!r}, but CUDA is not available (torch.cuda.is_available() is "
                         f"False); allowed: cpu")


def check_seed(seed) -> int | None:
    """The ``seed`` argument of the embedding bags: None (torch's global RNG) or an int that
    torch.Generator.manual_seed takes, [-2**63, 2**64)."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: got {seed!r}; allowed: None or an int in [-2**63, 2**64)")
    return int(seed)


TABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_dtype(dtype) -> torch.dtype:
    """The ``dtype`` argument of the embedding bags: a floating-point torch.dtype (the table's values)."""
    if dtype not in TABLE_DTYPES:
        raise TypeError(f"dtype: got {dtype!r}; allowed: {', '.join(map(str, TABLE_DTYPES))}")
    return dtype


def _check_ranks(tt_ranks) -> int | tuple[int, ...]:
    def whole(r) -> bool:
        return isinstance(r, numbers.Integral) and not isinstance(r, (bool, np.bool_))

    if whole(tt_ranks):
        return int(tt_ranks)
    if isinstance(tt_ranks, Sequence) and not isinstance(tt_ranks, str) and all(whole(r) for r in tt_ranks):
        return tuple(int(r) for r in tt_ranks)
    raise TypeError(f"tt_ranks: got {tt_ranks!r}; expected an int or a sequence of ints")


def _check_shape_arg(name: str, value) -> tuple | None:
    """tt_p_shapes / tt_q_shapes: None (suggested) or d >= 2 factors (their values are checked by
    TTSpec). Checked before a suggestion reads its length as d."""
    if value is None:
        return None
    try:
        factors = tuple(value) if not isinstance(value, (str, bytes)) else None
    except TypeError:
        factors = None
    if factors is None or len(factors) < 2:
        raise ValueError(f"{name}: got {value!r}; allowed: None (suggested) or a sequence of d >= 2 ints")
    return factors


def tt_spec(num_embeddings: int, embedding_dim: int, tt_ranks: int | Sequence[int],
            tt_p_shapes: Sequence[int] | None = None, tt_q_shapes: Sequence[int] | None = None, d: int = 3) -> TTSpec:
    """The TT format TTEmbeddingBag makes of these arguments (its own), checked, allocating nothing: the
    shapes suggested where None (d from the one given, else ``d``), one rank for every bond or d - 1."""
    num_embeddings, embedding_dim = check_size("num_embeddings", num_embeddings), check_size("embedding_dim", embedding_dim)
    tt_ranks = _check_ranks(tt_ranks)
    tt_p_shapes, tt_q_shapes = _check_shape_arg("tt_p_shapes", tt_p_shapes), _check_shape_arg("tt_q_shapes", tt_q_shapes)
    if tt_p_shapes is None or tt_q_shapes is None:
        given = tt_p_shapes if tt_p_shapes is not None else tt_q_shapes  # its length is d, else d is
        p, q = suggest_tt_shapes(num_embeddings, embedding_dim, d if given is None else len(given))
        tt_p_shapes = p if tt_p_shapes is None else tt_p_shapes
        tt_q_shapes = q if tt_q_shapes is None else tt_q_shapes
    d = len(tt_p_shapes)
    ranks = (tt_ranks,) * (d - 1) if isinstance(tt_ranks, int) else tuple(tt_ranks)
    return TTSpec(num_embeddings, embedding_dim, tuple(tt_p_shapes), tuple(tt_q_shapes), ranks)


class TTEmbeddingBag(nn.Module):
    """Embedding bag over a TT-compressed (num_embeddings x embedding_dim) table.

    Args:
        num_embeddings, embedding_dim: the logical table (rows, columns; ints >= 1).
        tt_ranks: inner ranks R_1..R_{d-1} (a sequence), or one int used for every bond.
        tt_p_shapes, tt_q_shapes: factorizations of rows (product >= num_embeddings) and columns
            (product == embedding_dim); suggested when None (default).
        mode: "sum" (default) or "mean" pooling. include_last_offset: as nn.EmbeddingBag (default False).
        init: one of ``INIT_SCHEMES`` (default "calibrated"); d: number of cores when neither shape
            is given (default 3; else the given shape's length).
        backend: "auto" (default), "torch", "cpu" or "cuda". seed: seeds the init (default None:
            torch's global RNG). dtype: the cores' dtype (default torch.float32; the native CPU
            kernel takes float32 only). device: where the cores live (default None: CPU).
        optimizer: None (default: cores get .grad through autograd), or "sgd"/"adagrad": a fused
            sparse update of exactly the touched core slices runs inside backward (native backends
            only), with step size ``learning_rate`` (default 0.01) and Adagrad's ``eps`` (default
            1e-10); the cores then get no .grad. Each backward applies its step at once (as a fused
            TBE does): a graph's backward taken after another's update computes its gradient from
            the updated cores, not the ones its forward read; a second backward through one graph
            (retain_graph=True) is an error.

    forward(input, offsets=None, per_sample_weights=None) -> (num_bags, embedding_dim), like
    nn.EmbeddingBag: int32/int64 ``input`` 1D with offsets or 2D (B, L); empty bags give zeros.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tt_ranks: int | Sequence[int],
        tt_p_shapes: Sequence[int] | None = None,
        tt_q_shapes: Sequence[int] | None = None,
        mode: str = "sum",
        include_last_offset: bool = False,
        init: str = "calibrated",
        d: int = 3,
        backend: str = "auto",
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        optimizer: str | None = None,
        learning_rate: float = 0.01,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        check_device(device)
        if mode not in MODES:
            raise ValueError(f"mode: got {mode!r}; allowed: {MODES}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: got {backend!r}; allowed: {BACKEND_NAMES}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"init: got {init!r}; allowed: {INIT_SCHEMES}")
        check_optimizer(optimizer, allow_none=True)
        if optimizer is not None and backend == "torch":
            raise ValueError("optimizer: the fused sparse update needs backend 'cpu', 'cuda' or 'auto', got backend='torch'")
        check_lr(learning_rate)
        check_eps(eps)
        include_last_offset, seed, dtype = check_flag("include_last_offset", include_last_offset), check_seed(seed), \
            check_dtype(dtype)
        self.spec = tt_spec(num_embeddings, embedding_dim, tt_ranks, tt_p_shapes, tt_q_shapes, d)
        num_embeddings, embedding_dim = self.spec.num_embeddings, self.spec.embedding_dim
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.mode, self.include_last_offset, self.init, self.backend = mode, include_last_offset, init, backend
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cores = init_tt_cores(self.spec, init, generator=gen, dtype=dtype)
        self.tt_cores = nn.ParameterList(nn.Parameter(c.to(device)) for c in cores)
        self.optimizer, self.learning_rate, self.eps = optimizer, learning_rate, eps
        if optimizer == "adagrad":
            for k, c in enumerate(self.tt_cores):
                self.register_buffer(f"adagrad_state_{k}", torch.zeros_like(c.detach()))
        self._scratch: list[torch.Tensor] | None = None
        self._update_lock = threading.Lock()  # the scratch is shared: one fused update at a time
        if backend == "cpu" and (reason := cpu_ops.check_supported(list(self.tt_cores), self.spec)) is not None:
            raise ValueError(f"backend='cpu': {reason}")

    def _fused_update(self, cores, spec, bags, mode, grad_out, saved=None) -> None:
        with self._update_lock:
            if self._scratch is None:
                self._scratch = [torch.zeros_like(c.detach()) for c in cores]
            state = ([getattr(self, f"adagrad_state_{k}") for k in range(spec.d)] if self.optimizer == "adagrad"
                     else None)
            if cores[0].is_cuda:
                cuda_loader.sparse_update([c.data for c in cores], spec, bags, mode, grad_out, self.optimizer,
                                          self.learning_rate, self.eps, self._scratch, state)
            else:  # the native forward's kept plan (``saved``) spares the backward its sort and chains;
                # the kernel writes through the cores' pointers (no torch op: autograd never sees it)
                cpu_ops.sparse_update(cores, spec, bags, mode, grad_out, self.optimizer, self.learning_rate, self.eps,
                                      self._scratch, state, saved=saved)

    _fused_update.accepts_saved = True  # see ttrec.cpu.ops.tt_bag_cpu

    # copy.deepcopy and torch.save(module) pickle the module: a lock cannot be pickled, so the copy
    # gets its own lock, and its own scratch on first use (the scratch holds zeros between updates)
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_update_lock"], state["_scratch"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._update_lock = threading.Lock()

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.double() move the cores: the update's scratch is made again, like them,
        # on its next use (a kept CPU scratch would reach the CUDA update after .cuda())
        self._scratch = None
        return super()._apply(fn, *args, **kwargs)

    def _core_list(self) -> list[nn.Parameter]:
        # the ParameterList's own dict, in order: iterating the ParameterList goes through Python
        # __getitem__/__getattr__ per core (tens of microseconds right after a kernel call)
        return list(self.tt_cores._parameters.values())

    def resolved_backend(self) -> str:
        """The backend a forward call uses now, after resolving "auto"."""
        return self._resolve(self._core_list())

    def fallback_reason(self) -> str | None:
        """Why ``backend="auto"`` runs the reference backend on CPU tensors (the native kernel is not
        built here, or does not take this table), or None when it does not fall back."""
        cores = self._core_list()
        if self.backend != "auto" or cores[0].is_cuda:
            return None
        return backend_status("cpu") or cpu_ops.check_supported(cores, self.spec)

    def _resolve(self, cores: list[torch.Tensor]) -> str:
        if self.backend != "auto":
            return self.backend
        if cores[0].is_cuda:
            return "cuda"
        if backend_status("cpu") is None and cpu_ops.check_supported(cores, self.spec) is None:
            return "cpu"
        return "torch"

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        bags = make_bags(input, offsets, per_sample_weights, num_embeddings=self.num_embeddings,
                         mode=self.mode, include_last_offset=self.include_last_offset)
        return self._pooled(bags, self.mode)

    def _pooled(self, bags: Bags, mode: str, fused: bool = True) -> torch.Tensor:
        """The resolved backend on checked ``bags`` (``fused``: with the fused update, if the module has
        one): the forward's dispatch, also the LFU cache's for the rows it does not hold."""
        cores = self._core_list()
        if bags.indices.device != cores[0].device:
            raise ValueError(f"input: got device {bags.indices.device}; the cores are on {cores[0].device}")
        name = self._resolve(cores)
        reason = backend_status(name)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} is unavailable: {reason}")
        fn = BACKENDS[name][0]
        if name != "torch" and torch.jit.is_tracing():
            raise RuntimeError(f"torch.jit.trace cannot record backend {name!r}: its kernel is called outside torch's "
                               "operators (ctypes / CuPy), so a trace would hold no lookup; trace a module built with "
                               "backend='torch'")
        if fused and self.optimizer is not None:
            if name == "torch":
                why = self.fallback_reason()
                raise RuntimeError(f"optimizer={self.optimizer!r} (fused update) has no torch backend; "
                                   + (f"backend 'auto' resolved to 'torch' because: {why}" if why is not None
                                      else "backend='torch' was asked for"))
            return fn(cores, self.spec, bags, mode, fused=self._fused_update)
        return fn(cores, self.spec, bags, mode)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: refuse with a reason instead of TorchScript's parse error."""
        raise RuntimeError("TTEmbeddingBag cannot be compiled by torch.jit.script: its forward dispatches in Python "
                           "to native and CUDA kernels; use torch.compile, or torch.jit.trace with backend='torch'")

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The reconstructed dense table (num_embeddings, embedding_dim); for tests and small tables."""
        return tt_to_dense(list(self.tt_cores), self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.num_embeddings}, {s.embedding_dim}, tt_ranks={s.tt_ranks}, tt_p_shapes={s.tt_p_shapes}, "
                f"tt_q_shapes={s.tt_q_shapes}, mode={self.mode!r}, backend={self.backend!r}, init={self.init!r}")
