"""The native kernel builds wherever a compiler exists, and both of its vector paths are right.

tt_cpu.cpp picks its vector code at compile time: 512-bit registers and AVX-512 intrinsics when the
target has them, else pairs of 256-bit vectors (AVX2 machines such as Zen 2). The default build targets the machine
(``-march=native``), so one machine runs one path; here both variants are built, each is run
against the reference where this CPU can execute it, and the other is at least compiled (with
-Werror), so a change that breaks either path fails on every machine.
"""

from __future__ import annotations

import math
import platform
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import ttrec
from ttrec.bags import make_bags
from ttrec.cpu import build, ops

from .native_reference import (assert_few_prefix_update_has_gemm_bits, assert_fma_loop_does_what_it_counts,
                               assert_fused_sgd_matches_reference, assert_matches_reference)

pytestmark = pytest.mark.usefixtures("threads_at_any_size")  # the threaded paths on small batches too

VARIANTS = {  # -march -> the CPU flags it needs to run
    "x86-64-v3": {"avx2", "fma", "bmi2"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512dq", "avx512vl"},
}
x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 variants only")


def test_kernel_builds_where_a_compiler_exists():
    """The other native tests skip when the kernel is unavailable: a failed build must not hide
    behind those skips (only TTREC_DISABLE_NATIVE or a missing compiler may switch it off)."""
    if build.expected_unavailable():
        pytest.skip("native kernel switched off or no compiler")
    assert build.unavailable_reason() is None, build.unavailable_reason()


def test_a_cpu_without_avx2_or_not_x86_gets_a_reason_not_a_failed_build():
    # the kernel is AVX2 + FMA or AVX-512 code: on a pre-AVX2 CPU its build fails (e.g. with
    # -march=x86-64-v2, "inlining failed ... target specific option mismatch"), so it is reported
    # unavailable up front and TTEmbeddingBag falls back to the torch backend
    assert build.cpu_reason({"sse4_2", "avx", "fma"}, "x86_64") == (
        "the native CPU kernel needs AVX2 and FMA; this CPU lacks avx2")
    assert "this machine is aarch64" in build.cpu_reason({"asimd"}, "aarch64")
    assert build.cpu_reason({"avx2", "fma"}, "x86_64") is None
    assert build.cpu_reason(set(), "x86_64") is None  # flags unknown: the build decides
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= build.cpu_flags():
        assert build.cpu_reason(build.cpu_flags(), platform.machine()) is None


def test_on_such_a_cpu_the_module_falls_back_to_torch_and_says_why(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: {"sse2", "sse4_2", "avx"})
    build._load.cache_clear()
    try:
        assert "needs AVX2 and FMA" in build.unavailable_reason() and build.expected_unavailable()
        emb = ttrec.TTEmbeddingBag(1000, 16, tt_p_shapes=(10, 10, 10), tt_q_shapes=(2, 2, 4), tt_ranks=(8, 8))
        assert emb.resolved_backend() == "torch"
        with pytest.raises(RuntimeError, match="needs AVX2 and FMA"):
            ttrec.TTEmbeddingBag(1000, 16, tt_p_shapes=(10, 10, 10), tt_q_shapes=(2, 2, 4), tt_ranks=(8, 8),
                                 backend="cpu")(torch.tensor([1, 2]), torch.tensor([0]))
    finally:
        monkeypatch.undo()
        build._load.cache_clear()


@pytest.fixture(scope="module")
def variants():
    if build.expected_unavailable():
        pytest.skip("native kernel switched off or no compiler")
    with ThreadPoolExecutor(len(VARIANTS)) as pool:  # (the cache directory's build lock makes them take turns)
        paths = dict(zip(VARIANTS, pool.map(lambda m: build.build(march=m), VARIANTS)))
    return paths


def _spec(p, q, r):
    return ttrec.TTSpec(math.prod(p), math.prod(q), tuple(p), tuple(q), tuple(r))


# the shapes whose code differs by vector ISA: row44 (q_1 q_2 = q_3 = 4, R padded or not), the
# dot-product last step and the D = 16 register backward (R_2 = 8 in half vectors: (17, 8)), the
# pooling-1 streamed output, d = 2 and 4, the sort keys' quotients (p = 49, see
# test_native_cpu), and the backward's 8 x 8 block transpose of G_2's slice with leftover rows and
# columns (R_1 = 12, q_2 R_2 = 15)
CASES = [((6, 7, 8), (2, 3, 2), (12, 5), 2), ((6, 7, 8), (2, 2, 4), (32, 32), 1), ((6, 7, 8), (2, 2, 4), (17, 8), 3),
         ((6, 7, 8), (1, 4, 4), (16, 64), 1), ((6, 7, 8), (4, 2, 2), (16, 16), 2),
         ((6, 7, 8), (2, 2, 2), (5, 3), 2), ((30, 40), (4, 4), (8,), 1), ((5, 6, 7, 3), (2, 2, 2, 2), (4, 8, 4), 2),
         ((5, 49, 49), (1, 2, 2), (3, 4), 1)]


@x86
@pytest.mark.parametrize("march", sorted(VARIANTS))
@pytest.mark.parametrize("p,q,r,pooling", CASES)
def test_each_vector_variant_equals_reference(variants, march, p, q, r, pooling, monkeypatch):
    path = variants[march]
    assert path.exists()  # compiled with -Werror: the variant builds
    missing = VARIANTS[march] - build.cpu_flags()
    if missing:
        pytest.skip(f"-march={march} built; this CPU cannot run it (no {', '.join(sorted(missing))})")
    lib = build.bind(path)
    monkeypatch.setattr(ops, "library", lambda: lib)
    spec = _spec(p, q, r)
    g = torch.Generator().manual_seed(7)
    cores = [c.float() for c in ttrec.init_tt_cores(spec, "normal", generator=g)]
    n_bags = 3000
    idx = torch.randint(0, spec.num_embeddings, (n_bags * pooling,), generator=g)
    idx[1::5] = idx[0::5][: idx[1::5].numel()]  # repeated rows
    offsets = torch.arange(0, n_bags * pooling, pooling)
    w = None if pooling == 1 else torch.rand(idx.numel(), generator=g)
    bags = make_bags(idx, offsets, w, num_embeddings=spec.num_embeddings, mode="sum")
    grad_out = torch.randn(n_bags, spec.embedding_dim, generator=g)
    torch.set_num_threads(2)
    assert_matches_reference(cores, spec, bags, grad_out)
    assert_fused_sgd_matches_reference(cores, spec, bags, grad_out)  # the update inside the backward (d = 3)


@x86
@pytest.mark.parametrize("march", sorted(VARIANTS))
def test_each_vector_variant_gives_few_prefix_updates_the_gemm_paths_bits(variants, march, monkeypatch):
    """The one-pass SGD update of a small bucket's G_2 slice and the GEMM's have the same bits in each
    vector variant (see assert_few_prefix_update_has_gemm_bits): 2 R_2 = 16, 32 and 64 floats a row."""
    missing = VARIANTS[march] - build.cpu_flags()
    if missing:
        pytest.skip(f"-march={march} built; this CPU cannot run it (no {', '.join(sorted(missing))})")
    lib = build.bind(variants[march])
    monkeypatch.setattr(ops, "library", lambda: lib)
    for r in ((16, 8), (32, 16), (32, 32)):
        assert_few_prefix_update_has_gemm_bits(r)


@x86
@pytest.mark.parametrize("march", sorted(VARIANTS))
def test_each_vector_variant_runs_its_fma_peak_loop_in_full(variants, march):
    """The FMA-peak probe (benches.environment.fma_peak) of each variant keeps its own number of
    accumulators, 6 pairs of ymm with AVX2 and 12 zmm with AVX-512, and does every multiply-add it counts
    (see native_reference.assert_fma_loop_does_what_it_counts): a variant that ran fewer chains than
    the latency of its FMAs needs would read a peak too low, and every share of it too high."""
    missing = VARIANTS[march] - build.cpu_flags()
    if missing:
        pytest.skip(f"-march={march} built; this CPU cannot run it (no {', '.join(sorted(missing))})")
    assert_fma_loop_does_what_it_counts(build.bind(variants[march]), 2, 12 if march == "x86-64-v4" else 6)


def test_the_backward_takes_one_segment_exactly_where_a_call_runs_one_thread():
    """kSmallBackward (plan.h) and MIN_LOOKUPS_PER_THREAD (ops.py) are one number: below it a call
    runs on one thread, and one backward segment spares the others' accumulators to zero and sum; at
    or above it two threads split two or more segments (bucket_segments). Drift would leave a second
    thread idle in the backward (or keep several segments on one)."""
    import re

    text = (build.HERE / "plan.h").read_text()
    found = re.search(r"constexpr int64_t kSmallBackward = (\d+);", text)
    assert found, "kSmallBackward not found in plan.h"
    # (this module's tests run with the constant patched to 1: read it as the source sets it)
    set_to = re.search(r"^MIN_LOOKUPS_PER_THREAD = (\d+)$", (build.HERE / "ops.py").read_text(), re.M)
    assert set_to, "MIN_LOOKUPS_PER_THREAD not found in ops.py"
    assert int(found.group(1)) == int(set_to.group(1))
