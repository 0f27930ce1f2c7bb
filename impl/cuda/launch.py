"""Launch arithmetic of the CUDA kernels, in plain Python (no torch, no CuPy, no GPU needed).

Everything the loader decides before a launch lives here so it can be unit-tested anywhere: grid
and block sizes, dynamic shared-memory bytes (which must match the layouts in the .cu files),
chunk sizes that bound scratch memory, the kernel signatures (parsed from ``tt_kernels.cuh``) and
the compiler options. The options are defined once and used by the run-time loader (NVRTC through
CuPy), by the nvcc compile test and by the g++ CPU emulation.

Shapes are passed as ``q`` (column factors) and ``ranks`` (R_0..R_d, with R_0 = R_d = 1), 0-based:
core k is (R_k, p_k, q_k, R_{k+1}); P_k, the partial product after cores 0..k, has
Q_k = q_0...q_k rows of R_{k+1} floats; P_{d-1} is the row (D floats).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

__all__ = [
    "KERNEL_DIR", "INCLUDE_DIR", "SOURCES", "HEADERS", "TT_MAX_D", "DEFAULT_BLOCK", "DEFAULT_SMEM_LIMIT",
    "MAX_BLOCK", "MAX_GRID_X", "DEFAULT_MAX_BLOCKS", "MAX_LOOKUPS_PER_ITER", "SMEM_OPTIN_BYTES",
    "shape_descriptor", "partial_sizes", "fwd_bag_smem_bytes", "bwd_bag_smem_bytes", "lookups_per_iter", "plan_lookups",
    "grid_size", "bag_grid", "prefix_chunk_lookups", "source_hash", "common_options", "nvrtc_options",
    "nvcc_command", "emulation_command", "KernelArg", "kernel_signatures", "kernel_sources",
    "flops_per_lookup", "bytes_per_lookup", "roofline_lookups_per_s",
]

KERNEL_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = KERNEL_DIR.parent / "include"
SOURCES = tuple(KERNEL_DIR / f for f in ("tt_forward.cu", "tt_backward.cu", "tt_update.cu", "tt_cache.cu"))
HEADERS = (KERNEL_DIR / "tt_common.cuh", KERNEL_DIR / "tt_kernels.cuh", INCLUDE_DIR / "tt_row.h")
EMULATION_HEADER = KERNEL_DIR / "emulation.h"

TT_MAX_D = 4
DEFAULT_BLOCK = 128           # threads per block of every kernel
MAX_BLOCK = 1024              # CUDA's limit of threads per block
MAX_GRID_X = 2**31 - 1        # CUDA's limit of gridDim.x
DEFAULT_MAX_BLOCKS = 65535    # cap of the grid-stride kernels' grids (the loop covers the rest)
DEFAULT_SMEM_LIMIT = 48 * 1024  # dynamic shared memory a kernel gets without opting in
MAX_LOOKUPS_PER_ITER = 8      # lookups a per-bag block works on at once
# Per-block shared memory a kernel may opt into (cudaFuncAttributeMaxDynamicSharedMemorySize),
# by compute capability; the loader asks the device, this table documents and tests the arithmetic.
SMEM_OPTIN_BYTES = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                    90: 227 * 1024}
_FLOAT, _INT64 = 4, 8


def _check_shape(q: Sequence[int], ranks: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    q, ranks = tuple(int(x) for x in q), tuple(int(x) for x in ranks)
    d = len(q)
    if not 2 <= d <= TT_MAX_D:
        raise ValueError(f"q: got {d} factors; the CUDA kernels support d = 2..{TT_MAX_D} cores")
    if len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"ranks: got {ranks}; expected R_0..R_d = (1, ..., 1) with d + 1 = {d + 1} entries")
    if min(q) < 1 or min(ranks) < 1:
        raise ValueError(f"q={q}, ranks={ranks}: every factor and rank must be >= 1")
    return q, ranks


def shape_descriptor(p: Sequence[int], q: Sequence[int], ranks: Sequence[int]) -> list[int]:
    """The int64 shape descriptor the kernels read: d, p[4], q[4], R[5], unused entries 0."""
    q, ranks = _check_shape(q, ranks)
    d = len(q)
    if len(p) != d:
        raise ValueError(f"p: got {len(p)} factors for d={d}")
    pad = [0] * (TT_MAX_D - d)
    return [d, *map(int, p), *pad, *q, *pad, *ranks, *pad]


def partial_sizes(q: Sequence[int], ranks: Sequence[int]) -> list[int]:
    """Floats of P_0 .. P_{d-1}: |P_k| = q_0...q_k * R_{k+1} (the last is the row, D floats)."""
    q, ranks = _check_shape(q, ranks)
    out, cols = [], 1
    for k in range(len(q)):
        cols *= q[k]
        out.append(cols * ranks[k + 1])
    return out


def fwd_bag_smem_bytes(q: Sequence[int], ranks: Sequence[int], lookups: int) -> int:
    """Dynamic shared memory of ``tt_fwd_bag`` with ``lookups`` lookups per iteration (see the .cu).

    Digits (int64 x 4 per lookup), weights, a D-float accumulator, and two ping-pong buffers of
    max(D, |P_1|, ..., |P_{d-2}|) floats per lookup.
    """
    sizes = partial_sizes(q, ranks)
    d, D = len(sizes), sizes[-1]
    buf = max([D, *sizes[1:d - 1]])
    return _INT64 * TT_MAX_D * lookups + _FLOAT * (lookups + D + 2 * lookups * buf)


def bwd_bag_smem_bytes(q: Sequence[int], ranks: Sequence[int], lookups: int) -> int:
    """Dynamic shared memory of ``tt_bwd_bag``: digits, weights, grad_out of the bag (D floats), the
    kept left partials P_1..P_{d-2} and two dP buffers of max(|P_0|..|P_{d-2}|) floats per lookup."""
    sizes = partial_sizes(q, ranks)
    d, D = len(sizes), sizes[-1]
    kept = sum(sizes[1:d - 1])
    dbuf = max(sizes[:d - 1])
    return _INT64 * TT_MAX_D * lookups + _FLOAT * (lookups + D + lookups * (kept + 2 * dbuf))


def lookups_per_iter(smem_bytes_fn, q: Sequence[int], ranks: Sequence[int], smem_limit: int = DEFAULT_SMEM_LIMIT,
                     max_lookups: int = MAX_LOOKUPS_PER_ITER) -> int:
    """The most lookups per iteration (<= max_lookups) whose shared memory fits ``smem_limit``; 0 if
    not even one fits (the loader then takes the prefix path, which needs no shared memory)."""
    if max_lookups < 1:
        raise ValueError(f"max_lookups: got {max_lookups}; must be >= 1")
    best = 0
    for n in range(1, max_lookups + 1):
        if smem_bytes_fn(q, ranks, n) <= smem_limit:
            best = n
    return best


def plan_lookups(smem_bytes_fn, q: Sequence[int], ranks: Sequence[int], smem_limit: int = DEFAULT_SMEM_LIMIT,
                 max_lookups: int = MAX_LOOKUPS_PER_ITER) -> tuple[int, int]:
    """(lookups per iteration, dynamic shared-memory bytes) of a per-bag kernel.

    The most lookups that fit the default 48 KiB (no opt-in, best occupancy); if not even one does,
    the most that fit ``smem_limit`` (the device's opt-in maximum, requested at launch); (0, 0) if
    none fits at all, and the loader takes the prefix path.
    """
    n = lookups_per_iter(smem_bytes_fn, q, ranks, min(DEFAULT_SMEM_LIMIT, smem_limit), max_lookups)
    if n == 0 and smem_limit > DEFAULT_SMEM_LIMIT:
        n = lookups_per_iter(smem_bytes_fn, q, ranks, smem_limit, max_lookups)
    return (n, smem_bytes_fn(q, ranks, n)) if n else (0, 0)


def grid_size(total: int, block: int = DEFAULT_BLOCK, max_blocks: int = DEFAULT_MAX_BLOCKS) -> int:
    """Blocks for a flat grid-stride loop over ``total`` elements: enough for one element per thread,
    capped at ``max_blocks`` (the loop covers the rest), at least 1."""
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block: got {block}; must be in 1..{MAX_BLOCK}")
    if not 1 <= max_blocks <= MAX_GRID_X:
        raise ValueError(f"max_blocks: got {max_blocks}; must be in 1..{MAX_GRID_X}")
    if total < 0:
        raise ValueError(f"total: got {total}; must be >= 0")
    return max(1, min(-(-total // block), max_blocks))


def bag_grid(n_bags: int, max_blocks: int = DEFAULT_MAX_BLOCKS) -> int:
    """Blocks of a per-bag kernel: one per bag up to ``max_blocks`` (grid-stride over the rest)."""
    if not 1 <= max_blocks <= MAX_GRID_X:
        raise ValueError(f"max_blocks: got {max_blocks}; must be in 1..{MAX_GRID_X}")
    return max(1, min(n_bags, max_blocks))


def prefix_chunk_lookups(q: Sequence[int], ranks: Sequence[int], budget_bytes: int, backward: bool = False) -> int:
    """Lookups per chunk of the prefix path such that its scratch fits ``budget_bytes``.

    Worst case every lookup has its own prefix: per lookup the kept partials P_1..P_{d-2}, in
    backward also two dP buffers of max(|P_0|..|P_{d-2}|) floats, plus int64 bookkeeping (prefix,
    slot, order, unique id, prefix start).
    """
    sizes = partial_sizes(q, ranks)
    d = len(sizes)
    per = _FLOAT * sum(sizes[1:d - 1]) + 5 * _INT64
    if backward:
        per += _FLOAT * 2 * max(sizes[:d - 1])
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral) or budget_bytes < per:
        raise ValueError(f"chunk_bytes: got {budget_bytes!r}; the prefix path's scratch budget must be an int of at "
                         f"least one lookup's scratch, {per} bytes for this shape")
    return int(budget_bytes) // per


# ---- compilation: one set of options for NVRTC, nvcc and the emulation ----

def source_hash() -> str:
    """sha256 prefix over every kernel source and header: part of the options, so CuPy's kernel
    cache (keyed by source text and options, not by included headers) is refreshed on any edit."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def common_options() -> tuple[str, ...]:
    """Include directories and defines shared by every way the kernels are compiled."""
    return (f"-I{INCLUDE_DIR}", f"-I{KERNEL_DIR}", f"-DTTREC_CUDA_SOURCES={source_hash()}")


def nvrtc_options() -> tuple[str, ...]:
    """Options of the run-time compile (cupy.RawModule, NVRTC); CuPy adds the target architecture."""
    return ("--std=c++17", *common_options())


def nvcc_command(source: Path | str, archs: Sequence[str], output: Path | str, nvcc: str = "nvcc") -> list[str]:
    """nvcc command compiling ``source`` for ``archs`` (e.g. ["sm_80"]) with warnings as errors."""
    if isinstance(archs, str) or not archs:  # none would compile for nvcc's default target only
        raise ValueError(f"archs: got {archs!r}; expected a non-empty list of architectures, e.g. ['sm_80']")
    gencode = []
    for arch in archs:
        if not re.fullmatch(r"sm_\d+", arch):
            raise ValueError(f"arch: got {arch!r}; expected e.g. 'sm_80'")
        cc = arch[3:]
        gencode += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    return [nvcc, "-c", *gencode, "-std=c++17", *common_options(), "--Werror", "all-warnings",
            "-Xcompiler", "-Wall,-Wextra", str(source), "-o", str(output)]


def emulation_command(source: Path | str, output: Path | str, cxx: str = "g++") -> list[str]:
    """g++ command compiling a .cu file as C++ on the CPU with emulation.h force-included.

    C++20 for std::barrier and std::atomic_ref, which the emulation of __syncthreads and atomicAdd
    uses; the kernels themselves are C++17.
    """
    return [cxx, "-std=c++20", "-O1", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror", "-x", "c++",
            "-include", str(EMULATION_HEADER), *common_options(), "-c", str(source), "-o", str(output)]


# ---- kernel signatures, parsed from tt_kernels.cuh ----

class KernelArg(NamedTuple):
    name: str
    kind: str          # "ptr", "i64", "i32" or "f32"
    elem: str | None   # pointee type for pointers: "float", "int64_t" or "uint8_t"
    const: bool        # pointee is const (read-only)


_SCALARS = {"int64_t": "i64", "int32_t": "i32", "float": "f32"}
_POINTEES = ("float", "int64_t", "uint8_t")


@lru_cache(maxsize=1)
def kernel_signatures() -> dict[str, tuple[KernelArg, ...]]:
    """name -> argument list of every ``TT_KERNEL`` prototype in tt_kernels.cuh."""
    text = (KERNEL_DIR / "tt_kernels.cuh").read_text()
    out: dict[str, tuple[KernelArg, ...]] = {}
    for name, params in re.findall(r"^TT_KERNEL\s+void\s+(\w+)\s*\(([^)]*)\)\s*;", text, flags=re.M):
        args = []
        for raw in params.split(","):
            tokens = raw.replace("*", " * ").split()
            arg_name = tokens[-1]
            types = [t for t in tokens[:-1] if t not in ("__restrict__",)]
            const = "const" in types
            types = [t for t in types if t != "const"]
            if "*" in types:
                base = [t for t in types if t != "*"]
                if types.count("*") != 1 or len(base) != 1 or base[0] not in _POINTEES:
                    raise ValueError(f"{name}: unsupported parameter {raw.strip()!r}")
                args.append(KernelArg(arg_name, "ptr", base[0], const))
            else:
                if len(types) != 1 or types[0] not in _SCALARS:
                    raise ValueError(f"{name}: unsupported parameter {raw.strip()!r}")
                args.append(KernelArg(arg_name, _SCALARS[types[0]], None, False))
        out[name] = tuple(args)
    return out


@lru_cache(maxsize=1)
def kernel_sources() -> dict[str, Path]:
    """name -> the .cu file defining the kernel."""
    out: dict[str, Path] = {}
    for path in SOURCES:
        for name in re.findall(r"^TT_KERNEL\s+void\s+(\w+)\s*\([^;{]*\)\s*\{", path.read_text(), flags=re.M):
            out[name] = path
    return out


# ---- cost model of one lookup (README's roofline) ----

def flops_per_lookup(q: Sequence[int], ranks: Sequence[int]) -> int:
    """2 x multiply-adds of the left-to-right chain of one row (d=3: 2(q1 R1 q2 R2 + q1 q2 R2 q3))."""
    q, ranks = _check_shape(q, ranks)
    flops, rows = 0, q[0]
    for k in range(1, len(q)):
        flops += 2 * rows * ranks[k] * q[k] * ranks[k + 1]
        rows *= q[k]
    return flops


def bytes_per_lookup(q: Sequence[int], ranks: Sequence[int], pooling: int = 1, weights: bool = False) -> int:
    """Bytes one lookup moves when every core slice comes from DRAM (no cache reuse): its index, its
    weight, the d slices (R_k q_k R_{k+1} floats each) and its share of the pooled output row."""
    q, ranks = _check_shape(q, ranks)
    slices = sum(ranks[k] * q[k] * ranks[k + 1] for k in range(len(q)))
    D = math.prod(q)
    return _INT64 + (_FLOAT if weights else 0) + _FLOAT * slices + math.ceil(_FLOAT * D / max(1, pooling))


def roofline_lookups_per_s(q: Sequence[int], ranks: Sequence[int], bandwidth_gb_s: float, tflops: float,
                           pooling: int = 1) -> tuple[float, float, str]:
    """(lookups/s bound, arithmetic intensity FLOP/B, "memory" or "compute") of the roofline model."""
    f = flops_per_lookup(q, ranks)
    b = bytes_per_lookup(q, ranks, pooling)
    mem, comp = bandwidth_gb_s * 1e9 / b, tflops * 1e12 / f
    return (min(mem, comp), f / b, "memory" if mem < comp else "compute")
