"""Mutation review of the CUDA kernels' tests: properties the other CUDA test files left unchecked.

The kernels run on the CPU as in tests/test_cuda_emulated.py (g++ with impl/cuda/emulation.h, one
std::thread per CUDA thread, ``EmuLauncher``). Each test here was written against a bug the other
files let through (a source mutation that kept them passing), and checks against a reference
independent of the kernels:

* prefixes (``index // p_{d-1}``) of 2^31 and above: a float64 per-row reconstruction with Python
  integer digits, gradients by float64 autograd of it;
* counting rows on a grid of several blocks: torch.bincount;
* data races: the same kernels built with ThreadSanitizer and run on inputs where many CUDA threads
  of a block add into the same entries. A plain ``+=`` in place of an ``atomicAdd``, or a missing
  ``__syncthreads``, is a data race between two std::threads, which ThreadSanitizer reports from the
  order of the accesses (happens-before), whether or not an update was lost in that run. The
  value-based tests see such a bug only when two threads happen to collide on two cores at the same
  moment: for a dropped atomicAdd in tt_bwd_bag, tt_bwd_level_grad or tt_bwd_first that was one
  run in two or three of the CUDA test files, and never for tt_count_rows or tt_cache_sgd.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttrec.bags import make_bags
from ttrec.cuda import launch as plan
from ttrec.cuda import loader
from ttrec.shapes import TTSpec

from .test_cuda_emulated import (EmuLauncher, _per_row_float64, build_emulation, emu_lib,  # noqa: F401  (emu_lib: fixture)
                                 make_cores)

CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed")


# ---- prefixes above 2^31 ----

def test_prefixes_above_2_31_match_a_float64_per_row_reference(emu_lib):  # noqa: F811
    """With p_{d-1} = 2 and 2^34 rows, the prefixes idx // 2 of these rows are in [2^32, 2^32 + 2^31):
    the prefix path's digits (tt_prefix_level, tt_bwd_level_grad/_dp, tt_bwd_first) must come from
    the int64 prefix. (tests/test_cuda_emulated.py's rows above 2^31 have p_{d-1} = 1024, so their
    prefixes stay below 2^22 and an int32 prefix passed.) Forward and core gradients of both
    algorithms against float64 rows rebuilt with Python-int digits, and autograd of them."""
    p, q, inner = (1 << 17, 1 << 16, 2), (2, 2, 2), (2, 3)
    spec = TTSpec(math.prod(p), 8, p, q, inner)
    assert spec.num_embeddings == 2**34
    cores = make_cores(spec, 21)
    big = [2**33 + 2 * 12345, 2**33 + 1, 2**33 + 2**31 + 7, 2**34 - 2**32 - 1, 2**33 + 2 * 70000 + 1, 2**33 + 2**32 - 2]
    idx = torch.tensor([3, *big, 2**31 + 5, big[0], 2**20 + 1], dtype=torch.int64)
    assert all(2**32 <= i // 2 < 2**32 + 2**31 for i in big)
    offsets = torch.tensor([0, 3, 3, 7])
    w = torch.tensor([0.5, 1.0, 2.0, -1.0, 1.5, 0.25, 3.0, 1.0, 2.0, -0.5])
    bags = make_bags(idx, offsets, w, num_embeddings=spec.num_embeddings, mode="sum")
    leaves = [c.double().requires_grad_() for c in cores]
    ref = torch.zeros(bags.num_bags, 8, dtype=torch.float64)
    ends = [*offsets.tolist()[1:], len(idx)]
    for b, (s, e) in enumerate(zip(offsets.tolist(), ends)):
        for j in range(s, e):
            ref[b] += float(w[j]) * _per_row_float64(leaves, p, q, spec.ranks, int(idx[j]))
    grad_out = torch.randn(bags.num_bags, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (ref * grad_out).sum().backward()
    ln = EmuLauncher(emu_lib, block=32, max_blocks=2)
    for algo in ("prefix", "fused"):
        out = loader.forward(cores, spec, bags, "sum", launcher=ln, algo=algo)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, a=algo: f"{a}: {m}")
        grads = loader.backward(cores, spec, bags, "sum", grad_out.float(), launcher=ln, algo=algo)
        for k, (g, leaf) in enumerate(zip(grads, leaves)):
            torch.testing.assert_close(g.double(), leaf.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, a=algo, k=k: f"{a} grad {k}: {m}")
    # the top digit of 2^34 - 2^32 - 1 is 3 * 2^15 - 1: that slice of core 0 received gradient
    assert grads[0][0, 3 * 2**15 - 1].abs().sum() > 0


# ---- counting rows over several blocks ----

def test_count_rows_counts_each_lookup_once_over_several_blocks(emu_lib):  # noqa: F811
    """tt_count_rows on a grid of 4 blocks of 32 threads (test_cuda_emulated's 60 lookups fit one
    block, where a block-local loop `j = threadIdx.x; j += blockDim.x` counted right): 2^21 lookups,
    six in seven of them row 0, added to counts that start at 3. Reference: torch.bincount."""
    n = 1 << 21
    idx = torch.zeros(n, dtype=torch.int64)
    idx[::7] = 5
    counts = torch.full((8,), 3, dtype=torch.int64)
    ln = EmuLauncher(emu_lib, block=32, max_blocks=4)
    loader.count_rows(idx, counts, launcher=ln)
    assert ln.launched("tt_count_rows")[0][1] == 4
    assert torch.equal(counts, 3 + torch.bincount(idx, minlength=8))


# ---- data races, found by ThreadSanitizer ----

def _libtsan() -> str | None:
    if CXX is None:
        return None
    path = subprocess.run([CXX, "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and Path(path).exists() else None


@pytest.fixture(scope="module")
def tsan_lib(tmp_path_factory) -> Path:
    """The emulated kernels and the driver built as tests/test_cuda_emulated.py builds them, plus
    -fsanitize=thread."""
    if _libtsan() is None:
        pytest.skip("g++ has no ThreadSanitizer runtime (libtsan)")
    return build_emulation(tmp_path_factory.mktemp("tsan"), ("-fsanitize=thread", "-g"))


# Run in a subprocess with the ThreadSanitizer runtime preloaded. Every kernel, on shapes where many
# threads of one 8-thread block add into the same entries: rows repeated within a bag (lookups l and
# l + 1 of an iteration share slices), prefixes sharing digits (several prefixes per slice of core 0
# and core 1), bags sharing cache rows (4 bags of 2 columns per block). Results are checked too:
# ttrec.reference and autograd, bincount, the SGD step written out.
_RACE_SCRIPT = r"""
import sys
import torch
torch.set_num_threads(1)
from tests.test_cuda_emulated import EmuLauncher, load_emulation, make_cores, reference_grads
from ttrec.bags import make_bags
from ttrec.cuda import loader
from ttrec.reference import tt_embedding_bag
from ttrec.shapes import TTSpec

ln = EmuLauncher(load_emulation(sys.argv[1]), block=8, max_blocks=2)

def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")

specs = [TTSpec(16, 1, (2, 4, 2), (1, 1, 1), (1, 1)),          # one entry per slice: every add collides
         TTSpec(16, 8, (2, 4, 2), (2, 2, 2), (2, 3)),
         TTSpec(24, 16, (2, 3, 2, 2), (2, 2, 2, 2), (2, 3, 2))]  # d = 4: two middle levels
for spec in specs:
    n_rows = spec.num_embeddings
    idx = torch.cat([torch.arange(n_rows), torch.arange(n_rows).flip(0), torch.zeros(4, dtype=torch.int64)])
    starts = torch.tensor([0, 0, 11, n_rows + 5])  # an empty bag first; then 11, n_rows - 6 and n_rows - 1 lookups
    cores = make_cores(spec, 1)
    for mode, w in (("sum", torch.rand(idx.numel(), generator=torch.Generator().manual_seed(2)) + 0.5), ("mean", None)):
        bags = make_bags(idx, starts, w, num_embeddings=n_rows, mode=mode)
        ref = tt_embedding_bag(cores, spec, bags, mode)
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
        ref_grads = reference_grads(cores, spec, bags, mode, grad_out)
        for algo in ("fused", "prefix"):
            close(loader.forward(cores, spec, bags, mode, launcher=ln, algo=algo, chunk_bytes=2000), ref, algo)
            grads = loader.backward(cores, spec, bags, mode, grad_out, launcher=ln, algo=algo, chunk_bytes=2000)
            for k, (g, r) in enumerate(zip(grads, ref_grads)):
                close(g, r, f"{algo} grad {k}")
        stepped, scratch = [c.clone() for c in cores], [torch.zeros_like(c) for c in cores]
        state = [torch.zeros_like(c) for c in cores]
        loader.sparse_update(stepped, spec, bags, mode, grad_out, "adagrad", 0.5, 0.1, scratch, state, launcher=ln)
        for k, (c, g) in enumerate(zip(stepped, ref_grads)):
            close(c, cores[k] - 0.5 * g / (g.abs() + 0.1), f"adagrad core {k}")

# cache kernels: rows counted, partitioned, gathered and stepped with rows shared across bags
idx = torch.tensor([3, 7, 3, 3, 1, 7, 3, 0, 3, 7, 1, 3] * 4)
counts = torch.zeros(8, dtype=torch.int64)
loader.count_rows(idx, counts, launcher=ln)
assert torch.equal(counts, torch.bincount(idx, minlength=8)), counts
row_slot = torch.tensor([-1, 2, -1, 0, -1, -1, -1, 1])
spec = specs[1]
bags = make_bags(idx, torch.arange(0, 48, 3), None, num_embeddings=16, mode="sum")
cache = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
out, slot = loader.cached_forward(make_cores(spec, 1), spec, bags, "sum", cache, row_slot, launcher=ln)
assert torch.equal(slot, row_slot[idx])
small = torch.full((3, 2), 100.0)
loader.cache_sgd(small, slot, bags, "sum", torch.ones(16, 2), 1.0, launcher=ln)
expect = 100.0 - torch.bincount(slot[slot >= 0], minlength=3).to(torch.float32)
assert torch.equal(small, expect[:, None].expand(3, 2)), small
print("done")
"""


def test_kernels_have_no_data_race_under_thread_sanitizer(tsan_lib):
    """ThreadSanitizer reports no data race in any kernel (forward and backward of both algorithms
    for d = 3 and 4, sum with weights and mean, Adagrad's fused update, the four cache kernels), and
    the results still match ttrec.reference / autograd / bincount. The blocks have 8 threads, so
    lookups of one iteration of tt_bwd_bag, and prefixes or bags of one block of the grid-stride
    kernels, go to different threads while adding into the same gradient or cache entries."""
    root = Path(plan.KERNEL_DIR).parent.parent
    env = dict(os.environ, LD_PRELOAD=_libtsan(), TSAN_OPTIONS="halt_on_error=0 exitcode=66",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _RACE_SCRIPT, str(tsan_lib)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=600)
    if "unexpected memory mapping" in done.stderr:
        pytest.skip("ThreadSanitizer cannot run here: " + done.stderr.strip().splitlines()[-1])
    summaries = [line for line in done.stderr.splitlines() if line.startswith("SUMMARY: ThreadSanitizer")]
    assert not summaries, "data races:\n" + "\n".join(sorted(set(summaries)))
    assert done.returncode == 0 and done.stdout.strip().endswith("done"), done.stderr[-3000:]
