"""The literal CUDA sources, run on the CPU, match the reference TT-EmbeddingBag.

impl/cuda/*.cu are compiled by g++ as C++ with impl/cuda/emulation.h force-included (one
std::thread per CUDA thread, std::barrier for __syncthreads, std::atomic_ref for atomicAdd) and
linked with tests/cuda_emulation/driver.cpp into a shared library. ``EmuLauncher`` plugs it into
``ttrec.cuda.loader`` in place of CuPy, so the loader's whole orchestration (validation, launch
plans, prefix de-duplication, chunking, optimizer steps, cache composition) runs as it would on a
GPU, on CPU tensors. Every result is compared with an independent reference: ttrec.reference
(autograd for gradients), torch.optim for the optimizer steps, plain torch for the cache kernels,
and a float64 per-row computation with Python-int digits for indices above 2^31.
"""

from __future__ import annotations

import ctypes
import functools
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrec.bags import Bags, make_bags
from ttrec.cuda import launch as plan
from ttrec.cuda import loader
from ttrec.reference import row_digits, tt_embedding_bag, tt_rows
from ttrec.shapes import TTSpec

CXX = shutil.which("g++")
DRIVER = Path(__file__).resolve().parent / "cuda_emulation" / "driver.cpp"
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed")

_CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int32, "f32": ctypes.c_float}


def build_emulation(out: Path, flags: tuple[str, ...] = ()) -> Path:
    """The kernels and the driver compiled by g++ (two compilers at a time, each with ``flags`` too)
    and linked into ``out/libttemu.so``."""
    def build(src: Path):
        obj = out / f"{src.stem}.o"
        cmd = plan.emulation_command(src, obj, cxx=CXX)
        cmd[1:1] = flags
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{src.name}:\n{done.stderr[-4000:]}"
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objs = list(pool.map(build, [*plan.SOURCES, DRIVER]))
    so = out / "libttemu.so"
    done = subprocess.run([CXX, "-shared", "-pthread", *flags, *map(str, objs), "-o", str(so)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return so


def load_emulation(so: str | Path) -> ctypes.CDLL:
    """The built library with its launch entry points' argument types."""
    lib = ctypes.CDLL(str(so))
    lib.ttemu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_longlong, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_void_p)]
    lib.ttemu_num_args.argtypes = [ctypes.c_char_p]
    return lib


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    return load_emulation(build_emulation(tmp_path_factory.mktemp("emu")))


class EmuLauncher:
    """A ttrec.cuda.loader launcher running the g++-compiled kernels on CPU tensors."""

    device = torch.device("cpu")

    def __init__(self, lib, block=64, max_blocks=5, smem_limit=plan.DEFAULT_SMEM_LIMIT, smem_adjust=0):
        self.lib, self.block, self.max_blocks, self.smem_limit = lib, block, max_blocks, smem_limit
        self.smem_adjust = smem_adjust  # bytes added to every dynamic shared-memory request (tests)
        self.log: list[tuple[str, int, int, int, dict]] = []

    def launch(self, name, grid, block, smem, args):
        sig = plan.kernel_signatures()[name]
        assert self.lib.ttemu_num_args(name.encode()) == len(sig) == len(args)
        values = [_CTYPES[kind](value) for kind, value in args]
        argv = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        if smem:
            smem += self.smem_adjust
        self.log.append((name, grid, block, smem, {a.name: v for a, (_, v) in zip(sig, args)}))
        rc = self.lib.ttemu_launch(name.encode(), grid, block, smem, len(values), argv)
        if rc != 0:
            raise RuntimeError(f"emulated launch of {name} failed with status {rc}")

    def launched(self, name):
        return [entry for entry in self.log if entry[0] == name]


@pytest.fixture
def emu(emu_lib):
    return EmuLauncher(emu_lib)


# ---- helpers ----

def make_cores(spec: TTSpec, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) / math.sqrt(s[0]) for s in spec.core_shapes]


def make_bag_batch(spec, sizes, mode, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    idx = torch.randint(0, spec.num_embeddings, (n,), generator=g)
    if n > 8:  # repeated rows and repeated prefixes
        idx[n // 2: n // 2 + 4] = idx[:4]
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    w = torch.rand(n, generator=g) + 0.5 if weighted else None
    return make_bags(idx, offsets, w, num_embeddings=spec.num_embeddings, mode=mode)


def reference_grads(cores, spec, bags, mode, grad_out):
    leaves = [c.clone().requires_grad_() for c in cores]
    tt_embedding_bag(leaves, spec, bags, mode).backward(grad_out)
    return [c.grad for c in leaves]


def assert_close(actual, expected, what, rtol=2e-5, atol=2e-5):
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


# bag sizes: empty bags first, in the middle and last; a bag of 100 (> block of 64 threads and
# > 8 lookups per iteration); more bags than blocks (grid-stride over bags)
SIZES = [0, 3, 1, 0, 100, 7, 9, 0, 2, 13, 0]
CASES = {
    "d2-D16-R8": TTSpec(140, 16, (13, 11), (4, 4), (8,)),
    "d3-D64-R16x32": TTSpec(200, 64, (6, 5, 7), (4, 4, 4), (16, 32)),
    "d3-D16-R64-kaggle-q": TTSpec(120, 16, (5, 4, 6), (2, 2, 4), (64, 64)),
    "d4-D128-R8x16x8": TTSpec(180, 128, (3, 4, 3, 5), (2, 4, 4, 4), (8, 16, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_forward_and_backward_match_reference(emu, case, mode, weighted):
    spec = CASES[case]
    cores = make_cores(spec, seed=len(case))
    bags = make_bag_batch(spec, SIZES, mode, weighted, seed=7)
    ref = tt_embedding_bag(cores, spec, bags, mode)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    ref_grads = reference_grads(cores, spec, bags, mode, grad_out)
    for algo in ("fused", "prefix"):
        # prefix: budgets of 20 lookups' scratch, so chunks split bags (the bag of 100 spans several)
        sizes = plan.partial_sizes(spec.tt_q_shapes, spec.ranks)
        per = 4 * sum(sizes[1:spec.d - 1]) + 40
        per_b = per + 8 * max(sizes[:spec.d - 1])
        out = loader.forward(cores, spec, bags, mode, launcher=emu, algo=algo, chunk_bytes=20 * per)
        assert_close(out, ref, f"{algo} forward")
        assert not out[torch.tensor(SIZES) == 0].any(), "empty bags must give zeros"
        grads = loader.backward(cores, spec, bags, mode, grad_out, launcher=emu, algo=algo, chunk_bytes=20 * per_b)
        for k, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_close(g, r, f"{algo} grad of core {k}")
    fused = emu.launched("tt_fwd_bag")
    assert fused and fused[0][1] == min(len(SIZES), emu.max_blocks) < len(SIZES)  # grid-stride over bags
    if spec.d >= 3:
        levels = emu.launched("tt_prefix_level")
        assert levels and all(e[4]["n_prefixes"] <= 20 for e in levels)
    finishes = emu.launched("tt_fwd_finish")
    assert len(finishes) >= 7  # 135 lookups in chunks of 20


@st.composite
def small_problems(draw):
    d = draw(st.integers(2, 4))
    p = tuple(draw(st.lists(st.integers(1, 6), min_size=d, max_size=d)))
    q = tuple(draw(st.lists(st.integers(1, 4), min_size=d, max_size=d)))
    inner = tuple(draw(st.lists(st.integers(1, 9), min_size=d - 1, max_size=d - 1)))
    sizes = draw(st.lists(st.integers(0, 12), min_size=1, max_size=6))
    mode, weighted = draw(st.sampled_from([("sum", False), ("sum", True), ("mean", False)]))
    block = draw(st.sampled_from([1, 7, 32, 64]))
    return TTSpec(math.prod(p), math.prod(q), p, q, inner), sizes, mode, weighted, block, draw(st.integers(0, 99))


@given(small_problems())
@settings(max_examples=25, deadline=None, derandomize=True)
def test_random_shapes_match_reference(emu_lib, problem):
    """Edge shapes too: q_k = 1, rank 1, p_k = 1, one-thread blocks, bags of 0 only."""
    spec, sizes, mode, weighted, block, seed = problem
    ln = EmuLauncher(emu_lib, block=block, max_blocks=2)
    cores = make_cores(spec, seed)
    bags = make_bag_batch(spec, sizes, mode, weighted, seed)
    ref = tt_embedding_bag(cores, spec, bags, mode)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    ref_grads = reference_grads(cores, spec, bags, mode, grad_out)
    for algo in ("fused", "prefix"):
        assert_close(loader.forward(cores, spec, bags, mode, launcher=ln, algo=algo, chunk_bytes=4096), ref, algo)
        grads = loader.backward(cores, spec, bags, mode, grad_out, launcher=ln, algo=algo, chunk_bytes=8192)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, f"{algo} grad")


def test_prefix_path_computes_each_prefix_once(emu):
    spec = TTSpec(6 * 5 * 40, 16, (6, 5, 40), (2, 2, 4), (8, 8))
    # 60 lookups over 3 prefixes: P_1 is built 3 times, not 60
    idx = torch.tensor([pre * 40 + j for j in range(20) for pre in (0, 7, 29)])
    bags = make_bags(idx, torch.tensor([0, 25, 25, 50]), None, num_embeddings=spec.num_embeddings, mode="sum")
    cores = make_cores(spec, 1)
    out = loader.forward(cores, spec, bags, "sum", launcher=emu, algo="prefix")
    assert_close(out, tt_embedding_bag(cores, spec, bags, "sum"), "forward")
    (level,) = emu.launched("tt_prefix_level")
    assert level[4]["n_prefixes"] == 3
    grads = loader.backward(cores, spec, bags, "sum", torch.ones(4, 16), launcher=emu, algo="prefix")
    for g, r in zip(grads, reference_grads(cores, spec, bags, "sum", torch.ones(4, 16))):
        assert_close(g, r, "grad")
    assert emu.launched("tt_bwd_last_dp")[0][4]["n_prefixes"] == 3


def test_block_and_lookups_per_iteration_do_not_change_results(emu_lib):
    spec = CASES["d3-D64-R16x32"]
    cores = make_cores(spec, 5)
    bags = make_bag_batch(spec, [5, 0, 17, 4], "sum", True, seed=2)
    ref = tt_embedding_bag(cores, spec, bags, "sum")
    grad_out = torch.randn(ref.shape)
    ref_grads = reference_grads(cores, spec, bags, "sum", grad_out)
    # 48 KiB: 8 lookups per iteration, 12 KiB: 2 (forward) / 1, 7 KiB: 1; odd block sizes; one block for all bags
    for block, max_blocks, limit in ((32, 1, 48 * 1024), (97, 3, 12 * 1024), (256, 64, 7 * 1024)):
        ln = EmuLauncher(emu_lib, block=block, max_blocks=max_blocks, smem_limit=limit)
        assert_close(loader.forward(cores, spec, bags, "sum", launcher=ln, algo="fused"), ref, f"block {block}")
        grads = loader.backward(cores, spec, bags, "sum", grad_out, launcher=ln, algo="fused")
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, f"grad, block {block}")
        assert ln.log[0][4]["lookups_per_iter"] == plan.lookups_per_iter(
            plan.fwd_bag_smem_bytes, spec.tt_q_shapes, spec.ranks, limit)


def test_auto_takes_the_prefix_path_when_shared_memory_does_not_fit(emu_lib):
    spec = CASES["d4-D128-R8x16x8"]
    ln = EmuLauncher(emu_lib, smem_limit=2048)  # not even one lookup's chain fits
    cores = make_cores(spec, 2)
    bags = make_bag_batch(spec, [3, 4], "mean", False, seed=1)
    assert_close(loader.forward(cores, spec, bags, "mean", launcher=ln), tt_embedding_bag(cores, spec, bags, "mean"),
                 "forward")
    assert not ln.launched("tt_fwd_bag") and ln.launched("tt_fwd_finish")
    with pytest.raises(ValueError, match="shared memory"):
        loader.forward(cores, spec, bags, "mean", launcher=ln, algo="fused")


def test_opt_in_shared_memory_beyond_48k(emu_lib):
    spec = TTSpec(27, 2048, (3, 3, 3), (8, 16, 16), (64, 64))  # one lookup's chain needs 72 KiB
    ln = EmuLauncher(emu_lib, smem_limit=plan.SMEM_OPTIN_BYTES[80])
    cores = make_cores(spec, 6)
    bags = make_bag_batch(spec, [3, 0, 2], "sum", True, seed=4)
    ref = tt_embedding_bag(cores, spec, bags, "sum")
    assert_close(loader.forward(cores, spec, bags, "sum", launcher=ln, algo="fused"), ref, "forward")
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    grads = loader.backward(cores, spec, bags, "sum", grad_out, launcher=ln, algo="fused")
    for g, r in zip(grads, reference_grads(cores, spec, bags, "sum", grad_out)):
        assert_close(g, r, "grad")
    assert [e[3] > 48 * 1024 for e in ln.log] == [True, True]


@pytest.mark.parametrize("kernel, q, ranks", [("fwd", (4, 4), (8,)), ("bwd", (2, 2, 4), (4, 4))])
def test_shared_memory_size_is_what_the_kernel_uses(emu_lib, kernel, q, ranks):
    """The emulation fails a launch that writes past its dynamic shared memory; with the planned
    bytes nothing overflows, with 4 bytes less the last buffer element does (these shapes write it)."""
    spec = TTSpec(200, math.prod(q), (10, 20) if len(q) == 2 else (5, 5, 8), q, ranks)
    cores = make_cores(spec, 0)
    bags = make_bag_batch(spec, [16, 3], "sum", False, seed=0)  # a full iteration of 8 lookups
    run = (lambda ln: loader.forward(cores, spec, bags, "sum", launcher=ln, algo="fused")) if kernel == "fwd" else (
        lambda ln: loader.backward(cores, spec, bags, "sum", torch.ones(2, spec.embedding_dim), launcher=ln, algo="fused"))
    run(EmuLauncher(emu_lib))
    with pytest.raises(RuntimeError, match="status 4"):
        run(EmuLauncher(emu_lib, smem_adjust=-4))


def _per_row_float64(cores, p, q, ranks, index: int) -> torch.Tensor:
    """Row `index` from the cores in float64, digits by Python integer arithmetic."""
    digits, rest = [], index
    for pk in reversed(p[1:]):
        digits.append(rest % pk)
        rest //= pk
    digits = [rest, *reversed(digits)]
    part = cores[0][0, digits[0]].double().reshape(q[0], ranks[1])
    for k in range(1, len(p)):
        sl = cores[k][:, digits[k]].double().reshape(ranks[k], q[k] * ranks[k + 1])
        part = (part @ sl).reshape(-1, ranks[k + 1])
    return part.reshape(-1)


def test_int64_indices_above_2_31(emu):
    p, q, inner = (2048, 2048, 1024), (2, 2, 2), (2, 2)
    spec = TTSpec(math.prod(p), 8, p, q, inner)
    assert spec.num_embeddings == 2**32
    cores = make_cores(spec, 11)
    big = [2**31, 2**31 + 12345, 3 * 2**30 + 7, 2**32 - 1, 2**32 - 1024, 2**31 + 2**21 + 5]
    idx = torch.tensor([5, *big, 2**31 - 1, big[1]], dtype=torch.int64)
    offsets = torch.tensor([0, 2, 2, 6])
    w = torch.tensor([0.5, 1.0, 2.0, -1.0, 1.5, 0.25, 3.0, 1.0, 2.0])
    bags = make_bags(idx, offsets, w, num_embeddings=spec.num_embeddings, mode="sum")
    # reference: float64 per row, pooled in Python; gradients by float64 autograd of the same
    leaves = [c.double().requires_grad_() for c in cores]
    ranks = spec.ranks
    ref = torch.zeros(bags.num_bags, 8, dtype=torch.float64)
    ends = [*offsets.tolist()[1:], len(idx)]
    for b, (s, e) in enumerate(zip(offsets.tolist(), ends)):
        for j in range(s, e):
            ref[b] += float(w[j]) * _per_row_float64(leaves, p, q, ranks, int(idx[j]))
    grad_out = torch.randn(bags.num_bags, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (ref * grad_out).sum().backward()
    for algo in ("fused", "prefix"):
        out = loader.forward(cores, spec, bags, "sum", launcher=emu, algo=algo)
        assert_close(out.double(), ref.detach(), f"{algo} forward", rtol=1e-5, atol=1e-6)
        grads = loader.backward(cores, spec, bags, "sum", grad_out.float(), launcher=emu, algo=algo)
        for k, (g, leaf) in enumerate(zip(grads, leaves)):
            assert_close(g.double(), leaf.grad, f"{algo} grad {k}", rtol=1e-5, atol=1e-6)
    # the top digit of 2^32 - 1 is 2047: the last slices of cores 0 and 1 received gradient
    assert grads[0][0, 2047].abs().sum() > 0 and grads[1][:, 2047].abs().sum() > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_sparse_update_matches_torch_optim(emu_lib, optimizer):
    # p_0 = 3000 > 1024, touched slices of core 0 spread over all of it; a tiny grid
    spec = TTSpec(3000 * 7 * 5, 8, (3000, 7, 5), (2, 2, 2), (4, 4))
    ln = EmuLauncher(emu_lib, block=32, max_blocks=3)
    g = torch.Generator().manual_seed(9)
    cores = make_cores(spec, 3)
    ref_params = [torch.nn.Parameter(c.clone()) for c in cores]
    lr, eps = 0.05, 1e-10
    opt = (torch.optim.SGD(ref_params, lr=lr) if optimizer == "sgd"
           else torch.optim.Adagrad(ref_params, lr=lr, eps=eps))
    scratch = [torch.zeros_like(c) for c in cores]
    state = [torch.zeros_like(c) for c in cores] if optimizer == "adagrad" else None
    for step in range(2):
        idx = torch.cat([torch.randint(0, spec.num_embeddings, (1500,), generator=g),
                         torch.tensor([spec.num_embeddings - 1, 0, 2999 * 35 + 3])])
        bags = make_bags(idx, torch.arange(0, 1503, 3), None, num_embeddings=spec.num_embeddings, mode="mean")
        grad_out = torch.randn(bags.num_bags, 8, generator=g)
        before = [c.clone() for c in cores]
        touched = loader.sparse_update(cores, spec, bags, "mean", grad_out, optimizer, lr, eps, scratch, state,
                                       launcher=ln)
        opt.zero_grad()
        tt_embedding_bag(list(ref_params), spec, bags, "mean").backward(grad_out)
        opt.step()
        digits = [set(d.tolist()) for d in row_digits(idx, spec.tt_p_shapes)]
        for k in range(spec.d):
            assert set(torch.nonzero(touched[k]).flatten().tolist()) == digits[k]
            assert_close(cores[k], ref_params[k].detach(), f"step {step} core {k}", rtol=1e-5, atol=1e-6)
            untouched = touched[k] == 0
            assert torch.equal(cores[k][:, untouched], before[k][:, untouched]), "untouched slices must not change"
            assert not scratch[k].any(), "the gradient scratch is left zero"
            if state is not None:
                assert_close(state[k], opt.state[ref_params[k]]["sum"], f"adagrad state {k}", rtol=1e-5, atol=1e-7)
        assert max(digits[0]) > 1024 and len(digits[0]) > 1024
    # the update of core 0 needs more threads than the grid has: grid-stride did the rest
    upd = [e for e in ln.launched("tt_sparse_update") if e[4]["k"] == 0][-1]
    assert upd[1] * upd[2] < upd[4]["n_ids"] * spec.tt_q_shapes[0] * spec.ranks[1]


def test_autograd_function_and_fused_hook(emu):
    spec = CASES["d3-D16-R64-kaggle-q"]
    cores = [c.requires_grad_() for c in make_cores(spec, 4)]
    bags = make_bag_batch(spec, [4, 0, 6], "sum", True, seed=3)
    out = loader.tt_bag_cuda(cores, spec, bags, "sum", launcher=emu)
    grad_out = torch.randn(out.shape)
    out.backward(grad_out)
    for c, r in zip(cores, reference_grads([c.detach() for c in cores], spec, bags, "sum", grad_out)):
        assert_close(c.grad, r, "autograd grad")
    calls = []
    fresh = [c.detach().clone().requires_grad_() for c in cores]
    loader.tt_bag_cuda(fresh, spec, bags, "sum", fused=lambda *a: calls.append(a), launcher=emu).backward(grad_out)
    assert len(calls) == 1 and torch.equal(calls[0][4], grad_out) and all(c.grad is None for c in fresh)


def test_cache_kernels_match_torch(emu):
    spec = CASES["d2-D16-R8"]
    cores = make_cores(spec, 8)
    g = torch.Generator().manual_seed(5)
    n_rows = spec.num_embeddings
    idx = torch.randint(0, n_rows, (60,), generator=g)
    idx[:6] = idx[6:12]
    # frequency counting accumulates into existing counts
    counts = torch.randint(0, 5, (n_rows,), generator=g)
    expect = counts + torch.bincount(idx, minlength=n_rows)
    loader.count_rows(idx, counts, launcher=emu)
    assert torch.equal(counts, expect)
    # the 12 most frequent rows are cached
    row_slot = torch.full((n_rows,), -1, dtype=torch.int64)
    top = torch.topk(expect, 12).indices
    row_slot[top] = torch.arange(12)
    slot, cached = loader.cache_partition(idx, row_slot, launcher=emu)
    assert torch.equal(slot, row_slot[idx]) and torch.equal(cached, (row_slot[idx] >= 0).to(torch.uint8))
    assert 0 < int(cached.sum()) < 60
    cache = torch.randn(12, 16, generator=g)
    for mode, weighted in (("sum", True), ("mean", False)):
        bags = make_bags(idx, torch.tensor([0, 10, 10, 31, 45]), torch.rand(60, generator=g) if weighted else None,
                         num_embeddings=n_rows, mode=mode)
        out, slot = loader.cached_forward(cores, spec, bags, mode, cache, row_slot, launcher=emu)
        # reference: each lookup's row from the cache when cached, else from the TT cores
        rows = torch.where((slot >= 0).unsqueeze(1), cache[slot.clamp(min=0)], tt_rows(cores, spec, idx))
        if weighted:
            rows = rows * bags.per_sample_weights.unsqueeze(1)
        ref = torch.zeros(bags.num_bags, 16).index_add_(0, bags.bag_ids(), rows)
        if mode == "mean":
            ref = ref / bags.bag_sizes().clamp(min=1).unsqueeze(1)
        assert_close(out, ref, f"cached forward {mode}")
        # SGD on the cached rows equals torch's SGD on the gradient of the cached-row lookup
        leaf = torch.nn.Parameter(cache.clone())
        opt = torch.optim.SGD([leaf], lr=0.1)
        crow = torch.where((slot >= 0).unsqueeze(1), leaf[slot.clamp(min=0)], torch.zeros(60, 16))
        if weighted:
            crow = crow * bags.per_sample_weights.unsqueeze(1)
        pooled = torch.zeros(bags.num_bags, 16).index_add(0, bags.bag_ids(), crow)
        if mode == "mean":
            pooled = pooled / bags.bag_sizes().clamp(min=1).unsqueeze(1)
        grad_out = torch.randn(pooled.shape, generator=g)
        pooled.backward(grad_out)
        opt.step()
        loader.cache_sgd(cache, slot, bags, mode, grad_out, 0.1, launcher=emu)
        assert_close(cache, leaf.detach(), f"cache sgd {mode}", rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_rejected_before_any_launch(emu):
    spec = CASES["d2-D16-R8"]
    cores = make_cores(spec, 0)
    good = make_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), None, num_embeddings=spec.num_embeddings, mode="sum")
    bad = [
        (Bags(torch.tensor([1, spec.num_embeddings]), torch.tensor([0, 2]), None), "indices"),
        (Bags(torch.tensor([1, -1]), torch.tensor([0, 2]), None), "indices"),
        (Bags(torch.tensor([1, 2]), torch.tensor([0, 1]), None), "offsets"),
        (Bags(torch.tensor([1, 2]), torch.tensor([0, 2, 1, 2]), None), "offsets"),
        (Bags(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 2]), None), "indices"),
    ]
    for bags, what in bad:
        with pytest.raises(ValueError, match=what):
            loader.forward(cores, spec, bags, "sum", launcher=emu)
        with pytest.raises(ValueError, match=what):
            loader.backward(cores, spec, bags, "sum", torch.zeros(bags.num_bags, 16), launcher=emu)
    with pytest.raises(ValueError, match="dtype"):
        loader.forward([c.double() for c in cores], spec, good, "sum", launcher=emu)
    with pytest.raises(ValueError, match="shape"):
        loader.forward([cores[1], cores[0]], spec, good, "sum", launcher=emu)
    with pytest.raises(ValueError, match="mode"):
        loader.forward(cores, spec, good, "max", launcher=emu)
    with pytest.raises(ValueError, match="algo"):
        loader.forward(cores, spec, good, "sum", launcher=emu, algo="fast")
    with pytest.raises(ValueError, match="grad_out"):
        loader.backward(cores, spec, good, "sum", torch.zeros(3, 16), launcher=emu)
    with pytest.raises(ValueError, match="optimizer"):
        loader.sparse_update(cores, spec, good, "sum", torch.zeros(2, 16), "adam", 0.1, 1e-10,
                             [torch.zeros_like(c) for c in cores], None, launcher=emu)
    with pytest.raises(ValueError, match="state"):
        loader.sparse_update(cores, spec, good, "sum", torch.zeros(2, 16), "adagrad", 0.1, 1e-10,
                             [torch.zeros_like(c) for c in cores], None, launcher=emu)
    with pytest.raises(ValueError, match="eps: got 0.0"):  # 0 / (sqrt(0) + 0) on a touched slice with zero gradient
        loader.sparse_update(cores, spec, good, "sum", torch.zeros(2, 16), "adagrad", 0.1, 0.0,
                             [torch.zeros_like(c) for c in cores], [torch.zeros_like(c) for c in cores], launcher=emu)
    with pytest.raises(ValueError, match="counts"):
        loader.count_rows(good.indices, torch.zeros(5, dtype=torch.int32), launcher=emu)
    with pytest.raises(ValueError, match="indices"):
        loader.count_rows(good.indices, torch.zeros(2, dtype=torch.int64), launcher=emu)
    with pytest.raises(ValueError, match="row_slot"):
        loader.cache_partition(good.indices, torch.zeros(spec.num_embeddings, dtype=torch.int32), launcher=emu)
    assert emu.log == [], "nothing may be launched for a bad input"
    # and the public path validates through make_bags first
    with pytest.raises(ValueError, match="input"):
        make_bags(torch.tensor([0, spec.num_embeddings]), torch.tensor([0]), None,
                  num_embeddings=spec.num_embeddings, mode="sum")


def test_module_through_the_backend_registry(emu, monkeypatch):
    """TTEmbeddingBag with the cuda entry registered as tt.py would (here on the emulated kernels)."""
    from ttrec import tt

    monkeypatch.setitem(tt.BACKENDS, "cuda", (functools.partial(loader.tt_bag_cuda, launcher=emu), lambda: None))
    mods = [tt.TTEmbeddingBag(500, 16, 8, backend=b, seed=0, mode="mean") for b in ("cuda", "torch")]
    x, offsets = torch.tensor([3, 499, 3, 17, 250, 0, 42]), torch.tensor([0, 2, 2, 5])
    grad = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    outs = [m(x, offsets) for m in mods]
    assert_close(outs[0], outs[1], "module forward")
    for o in outs:
        o.backward(grad)
    for a, b in zip(mods[0].tt_cores, mods[1].tt_cores):
        assert_close(a.grad, b.grad, "module grad")
    assert emu.launched("tt_fwd_bag") and emu.launched("tt_bwd_bag")
