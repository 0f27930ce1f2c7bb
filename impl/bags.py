"""Validation and normalization of nn.EmbeddingBag-style inputs, shared by every implementation.

Every backend (reference, native CPU, CUDA, baselines) receives a :class:`Bags` that has passed
these checks, so no kernel ever sees an out-of-range index or a malformed offsets array.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Bags", "MODES", "make_bags", "checked_for", "changed_in_place", "in_memory"]

MODES = ("sum", "mean")
_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Bags:
    """A batch of bags in CSR form.

    indices: int64 (n,) row ids, all in [0, num_embeddings).
    offsets: int64 (num_bags + 1,), non-decreasing, offsets[0] == 0, offsets[-1] == n.
    per_sample_weights: floating (n,) or None.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    per_sample_weights: torch.Tensor | None

    @property
    def num_bags(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_lookups(self) -> int:
        return self.indices.numel()

    def bag_ids(self) -> torch.Tensor:
        """int64 (n,): the bag each lookup belongs to."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_bags, device=self.indices.device), counts)

    def float32_weights(self) -> torch.Tensor | None:
        """per_sample_weights as a contiguous float32 tensor without autograd (what kernels read)."""
        w = self.per_sample_weights
        return None if w is None else w.detach().to(torch.float32).contiguous()

    def weights_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """per_sample_weights in the table's dtype (autograd kept): every implementation accepts any
        floating-point weights, as the TT kernels do (nn.EmbeddingBag itself refuses a mismatch)."""
        w = self.per_sample_weights
        return w if w is None or w.dtype == dtype else w.to(dtype)

    def bag_sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


# The checks below read CPU tensors through numpy views. Right after a native kernel call (or any
# pause) every torch op runs with the dispatcher cold in cache: 40-150 us each on the 2-CPU VMs here,
# a no-op .detach() or .to() included; numpy skips the dispatcher. So a CPU batch is read through
# one numpy view per tensor (integer tensors never require grad: no detach), and the index range
# is one reduction (negatives read as unsigned are huge). In a 64K-lookup step right after a
# kernel call: 0.47 ms (torch ops), then 0.38 (numpy, several views); as below, 0.94x the time of
# the several views (150 alternating pairs, 0.48 against 0.51 ms, on a VM in a slow stretch).
# Once the native kernel is loaded, its tt_scan_bags does the same checks in one pass over each
# array, copying the offsets on the way (numpy reads the offsets three times): see _scan_cpu.
def _first_out_of_range(t: torch.Tensor, num_embeddings: int) -> int | None:
    """The first position of an entry outside [0, num_embeddings) in an int64 tensor, or None: one
    reduction, and the search for the position only when there is one."""
    if not t.numel():
        return None
    if t.device.type == "cpu":
        bad = int(t.numpy().view(np.uint64).max()) >= num_embeddings
    else:
        lo, hi = torch.aminmax(t)
        bad = int(lo) < 0 or int(hi) >= num_embeddings
    return int(torch.nonzero((t < 0) | (t >= num_embeddings))[0]) if bad else None


_kernel = None  # ttrec.cpu.build, imported on first use (ttrec.cpu imports this module)


def _scan_cpu(indices: torch.Tensor, a: np.ndarray | None, n: int, num_embeddings: int,
              append_n: bool) -> tuple[int | None, int | None, np.ndarray | None]:
    """Of a CPU batch (int64 indices, offsets ``a`` or None): the first decrease of the offsets,
    the first index out of range (each None where there is none), and with ``append_n`` the
    offsets with n appended, as int64. One native pass when the kernel library is already loaded
    (make_bags never builds it), else numpy; the same answers either way."""
    global _kernel
    if _kernel is None:
        from .cpu import build as _kernel
    lib = _kernel.loaded()
    m = 0 if a is None else len(a)
    csr = np.empty(m + 1, dtype=np.int64) if append_n else None
    if lib is not None and indices.is_contiguous() and (a is None or (a.dtype == np.int64 and a.flags.c_contiguous)):
        bad_index, bad_offset = ctypes.c_int64(), ctypes.c_int64()
        lib.tt_scan_bags(indices.data_ptr(), indices.numel(), num_embeddings, None if a is None else a.ctypes.data,
                         m, None if csr is None else csr.ctypes.data, torch.get_num_threads(),
                         ctypes.byref(bad_index), ctypes.byref(bad_offset))
        first_decrease = None if bad_offset.value < 0 else bad_offset.value
        first_bad = None if bad_index.value < 0 else bad_index.value
    else:
        first_decrease = None if a is None else _first_decrease(a)
        first_bad = _first_out_of_range(indices, num_embeddings)
        if csr is not None:
            csr[:-1] = a
    if csr is not None:
        csr[-1] = n
    return first_decrease, first_bad, csr


def _as_int64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 else t.to(torch.int64)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def in_memory(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the values it stands for in its memory: a negative view (torch._neg_view, the
    imaginary part of a conj view) keeps its values negated only in a flag that numpy and the
    native kernels do not read, so it is resolved (a copy); any other tensor is returned as it is."""
    return t.resolve_neg() if t.is_neg() else t


def _dense(param: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as the values it stands for in memory (:func:`in_memory`); a sparse tensor is refused."""
    if t.layout is not torch.strided:
        raise TypeError(f"{param}: got a {t.layout} tensor; expected a dense (torch.strided) tensor")
    return in_memory(t)


def _first_decrease(a) -> int | None:
    """The first j with a[j] > a[j + 1], or None (a non-decreasing); a: numpy array or tensor."""
    if len(a) < 2:
        return None
    bad = a[1:] < a[:-1]
    if isinstance(bad, np.ndarray):
        return int(bad.argmax()) if bad.any() else None
    return int(torch.nonzero(bad)[0]) if bool(bad.any()) else None


def _fail(param: str, value: str, allowed: str) -> None:
    raise ValueError(f"{param}: got {value}; {allowed}")


def make_bags(
    input: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    *,
    num_embeddings: int,
    mode: str,
    include_last_offset: bool = False,
) -> Bags:
    """Check nn.EmbeddingBag forward arguments and return them as :class:`Bags`.

    Accepts a 1D ``input`` with ``offsets`` (bag starts; with ``include_last_offset`` the last
    entry is the end) or a 2D ``input`` (B, L) of fixed-size bags without offsets.
    Raises ValueError/TypeError naming the parameter, the value and what is allowed.
    """
    if mode not in MODES:
        _fail("mode", repr(mode), f"allowed: {MODES}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: got {type(input).__name__}; expected a torch.Tensor of int32/int64 indices")
    if input.dtype not in _INDEX_DTYPES:
        raise TypeError(f"input: got dtype {input.dtype}; allowed index dtypes: torch.int32, torch.int64")
    input = _dense("input", input)
    if per_sample_weights is not None:
        if mode != "sum":
            _fail("per_sample_weights", "a tensor with mode='mean'",
                  "per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)")
        if not isinstance(per_sample_weights, torch.Tensor) or not per_sample_weights.is_floating_point():
            raise TypeError(f"per_sample_weights: got {getattr(per_sample_weights, 'dtype', type(per_sample_weights))}; "
                            "expected a floating-point tensor")
        per_sample_weights = _dense("per_sample_weights", per_sample_weights)
        if per_sample_weights.shape != input.shape:
            _fail("per_sample_weights", f"shape {tuple(per_sample_weights.shape)}",
                  f"it must have the shape of input, {tuple(input.shape)}")
        if per_sample_weights.device != input.device:
            _fail("per_sample_weights", f"device {per_sample_weights.device}", f"must be on input's device {input.device}")

    first_bad = _MISSING  # the first index out of range, once scanned
    if input.dim() == 2:
        if offsets is not None:
            _fail("offsets", "a tensor with 2D input", "offsets must be None when input is 2D (B, L)")
        b, length = input.shape
        indices = input.reshape(-1)
        offs = torch.arange(b + 1, device=input.device, dtype=torch.int64) * length  # (L = 0: b empty bags)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            _fail("offsets", "None with 1D input", "1D input needs offsets (a 1D int32/int64 tensor of bag starts)")
        if not isinstance(offsets, torch.Tensor) or offsets.dtype not in _INDEX_DTYPES:
            raise TypeError(f"offsets: got {getattr(offsets, 'dtype', type(offsets).__name__)}; "
                            "offsets must be a 1D int32/int64 tensor")
        if offsets.dim() != 1:
            _fail("offsets", f"shape {tuple(offsets.shape)}", "offsets must be a 1D int32/int64 tensor")
        offsets = _dense("offsets", offsets)
        if offsets.device != input.device:
            _fail("offsets", f"device {offsets.device}", f"must be on input's device {input.device}")
        indices = _as_int64(input)
        n = indices.numel()
        if offsets.numel() == 0:
            _fail("offsets", "an empty tensor", "offsets needs at least one entry (the first bag's start, 0)")
        cpu = offsets.device.type == "cpu"
        a = offsets.numpy() if cpu else offsets  # (see above: one view, no torch ops)
        first, last = int(a[0]), int(a[-1])
        if first != 0:
            _fail("offsets", f"offsets[0]={first}", "the first bag must start at 0")
        if cpu:
            j, first_bad, csr = _scan_cpu(indices, a, n, num_embeddings, not include_last_offset)
        else:
            j, first_bad, csr = _first_decrease(a), _MISSING, None
        if j is not None:
            _fail("offsets", f"offsets[{j}]={int(a[j])} > offsets[{j + 1}]={int(a[j + 1])}",
                  "offsets must be non-decreasing")
        if include_last_offset:
            if last != n:
                _fail("offsets", f"last offset {last} with include_last_offset=True",
                      f"the last offset must equal len(input)={n}")
            offs = _as_int64(offsets)
        else:
            if last > n:
                _fail("offsets", f"offsets[-1]={last}", f"offsets must be <= len(input)={n}")
            if csr is not None:  # offsets with n appended, as int64
                offs = torch.from_numpy(csr)
            else:
                offs = torch.cat([_as_int64(offsets), torch.tensor([n], dtype=torch.int64, device=offsets.device)])
    else:
        _fail("input", f"a {input.dim()}D tensor of shape {tuple(input.shape)}",
              "input must be 1D (with offsets) or 2D (B, L)")

    indices = _as_int64(indices)
    if not indices.device.type == offs.device.type:
        _fail("offsets", f"device {offs.device}", f"must be on input's device {indices.device}")
    if first_bad is _MISSING:  # (a 2D input, or a CUDA batch)
        first_bad = (_scan_cpu(indices, None, 0, num_embeddings, False)[1] if indices.device.type == "cpu"
                     else _first_out_of_range(indices, num_embeddings))
    if first_bad is not None:
        _fail("input", f"index {int(indices[first_bad])} at position {first_bad}",
              f"indices must be in [0, num_embeddings={num_embeddings})")
    bags = Bags(_contiguous(indices), _contiguous(offs),
                None if per_sample_weights is None else _contiguous(per_sample_weights))
    object.__setattr__(bags, "_checked", (_CHECKED, num_embeddings, _versions(bags)))
    return bags


_CHECKED = object()  # private mark: only make_bags sets it
_MISSING = object()  # make_bags: the index range not scanned yet
_PARTS = ("input", "offsets", "per_sample_weights")  # the Bags' tensors, by the forward argument they come from


def _version(t: torch.Tensor | None) -> int | None:
    """A tensor's version counter; -1 for an absent tensor; None for an inference tensor (made under
    ``torch.inference_mode``), which keeps no counter."""
    if t is None:
        return -1
    return None if t.is_inference() else t._version


def _versions(bags: Bags) -> tuple[int | None, int | None, int | None]:
    """The version counters of the Bags' tensors (bumped by every in-place torch op on them or on a
    view of them: ``input[0] = 7``, ``offsets.copy_(...)``); -1 for absent weights, None for an
    inference tensor (no counter: such a batch is checked again wherever it is trusted)."""
    return _version(bags.indices), _version(bags.offsets), _version(bags.per_sample_weights)


def checked_for(bags: Bags, num_embeddings: int) -> bool:
    """True if ``bags`` came out of :func:`make_bags` for a table of ``num_embeddings`` rows and no
    in-place torch op has changed its tensors since (a Bags built by hand, or changed since, is not
    trusted by native code and is validated again). Writes that bypass torch's version counter
    (through a numpy view, ``.data``) are not seen, as autograd does not see them either."""
    mark = getattr(bags, "_checked", None)
    now = _versions(bags)
    return (mark is not None and mark[0] is _CHECKED and mark[1] == num_embeddings and None not in now
            and mark[2] == now)


def changed_in_place(bags: Bags) -> str | None:
    """Which of the batch's tensors an in-place torch op has changed since :func:`make_bags`
    checked it, as "input", "offsets" or "per_sample_weights" with the version counts, e.g.
    "input (version 1, expected 0)"; None if none has (or for a Bags built by hand). Backward
    passes that read the batch again refuse such a change, as nn.EmbeddingBag's does."""
    mark = getattr(bags, "_checked", None)
    if mark is None or mark[0] is not _CHECKED:
        return None
    now = _versions(bags)
    for name, was, is_ in zip(_PARTS, mark[2], now):
        if was != is_ and None not in (was, is_):  # (an inference tensor keeps no counter: not seen, as .data writes)
            return f"{name} (version {is_}, expected {was})"
    return None
