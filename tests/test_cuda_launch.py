"""Launch arithmetic of the CUDA kernels (impl/cuda/launch.py): pure Python, no GPU, no CuPy."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrec.cuda import launch as plan
from ttrec.cuda import loader
from ttrec.shapes import TTSpec

KAGGLE = ((200, 220, 250), (2, 2, 4))  # the paper's largest Kaggle table
TERABYTE = ((100, 200, 300), (4, 4, 4))

shapes = st.integers(2, 4).flatmap(lambda d: st.tuples(
    st.lists(st.integers(1, 8), min_size=d, max_size=d),
    st.lists(st.integers(1, 64), min_size=d - 1, max_size=d - 1)))


def _ranks(inner):
    return (1, *inner, 1)


def _grid_stride_visits(total: int, grid: int, block: int) -> list[int]:
    """Element ids a grid-stride loop `for e = bid*block+tid; e < total; e += grid*block` visits."""
    out = []
    for t in range(grid * block):
        out.extend(range(t, total, grid * block))
    return out


def test_shape_descriptor_layout_and_padding():
    desc = plan.shape_descriptor((200, 220, 250), (2, 2, 4), (1, 16, 32, 1))
    assert desc == [3, 200, 220, 250, 0, 2, 2, 4, 0, 1, 16, 32, 1, 0]
    assert len(plan.shape_descriptor((5, 6), (2, 3), (1, 4, 1))) == 1 + 3 * plan.TT_MAX_D + 1
    # the kernels read exactly TT_DESC_LEN = 1 + 3*TT_MAX_D + 1 entries
    text = (plan.KERNEL_DIR / "tt_common.cuh").read_text()
    assert "#define TT_DESC_LEN (1 + 3 * TT_MAX_D + 1)" in text


@pytest.mark.parametrize("q, ranks", [((2,), (1, 1)), ((2,) * 5, (1, 2, 2, 2, 2, 1)), ((2, 2), (1, 2)),
                                      ((2, 2), (2, 2, 1)), ((2, 0), (1, 2, 1))])
def test_shape_checks_reject_bad_shapes(q, ranks):
    with pytest.raises(ValueError):
        plan.partial_sizes(q, ranks)


def test_partial_sizes():
    assert plan.partial_sizes((2, 2, 4), (1, 16, 32, 1)) == [2 * 16, 4 * 32, 16]
    assert plan.partial_sizes((4, 4, 8, 2), (1, 8, 16, 8, 1)) == [32, 256, 1024, 256]


@given(shapes)
@settings(max_examples=60, deadline=None)
def test_lookups_per_iter_is_the_largest_that_fits(shape):
    q, inner = shape
    ranks = _ranks(inner)
    for fn in (plan.fwd_bag_smem_bytes, plan.bwd_bag_smem_bytes):
        for limit in (plan.DEFAULT_SMEM_LIMIT, plan.SMEM_OPTIN_BYTES[80], 2048):
            n = plan.lookups_per_iter(fn, q, ranks, limit)
            assert 0 <= n <= plan.MAX_LOOKUPS_PER_ITER
            if n:
                assert fn(q, ranks, n) <= limit
            if n < plan.MAX_LOOKUPS_PER_ITER:
                assert fn(q, ranks, n + 1) > limit
            # bytes grow with the lookups per iteration
            assert fn(q, ranks, 2) > fn(q, ranks, 1)


def test_smem_bytes_by_hand():
    # d=3, q=(2,2,4), R=(1,16,32,1): |P_0|=32, |P_1|=128, D=16
    q, ranks = (2, 2, 4), (1, 16, 32, 1)
    assert plan.fwd_bag_smem_bytes(q, ranks, 4) == 8 * 4 * 4 + 4 * (4 + 16 + 2 * 4 * 128)
    assert plan.bwd_bag_smem_bytes(q, ranks, 4) == 8 * 4 * 4 + 4 * (4 + 16 + 4 * (128 + 2 * 128))
    # d=2: no kept partials; buffers of max(D, -) and max(|P_0|)
    q, ranks = (4, 4), (1, 8, 1)
    assert plan.fwd_bag_smem_bytes(q, ranks, 1) == 32 + 4 * (1 + 16 + 2 * 16)
    assert plan.bwd_bag_smem_bytes(q, ranks, 1) == 32 + 4 * (1 + 16 + 2 * 32)


@pytest.mark.parametrize("rank", [16, 32, 64])
@pytest.mark.parametrize("p, q", [KAGGLE, TERABYTE])
def test_paper_shapes_fit_default_shared_memory(p, q, rank):
    ranks = (1, rank, rank, 1)
    for fn in (plan.fwd_bag_smem_bytes, plan.bwd_bag_smem_bytes):
        n = plan.lookups_per_iter(fn, q, ranks, plan.DEFAULT_SMEM_LIMIT)
        assert n >= 1, "the paper's shapes must run the fused per-bag kernels without opting in"
        assert fn(q, ranks, n) <= 48 * 1024


def test_shapes_too_big_for_shared_memory_fall_back_or_opt_in():
    q, ranks = (16, 16, 16), (1, 128, 128, 1)  # |P_1| = 256 * 128 floats = 128 KiB
    assert plan.lookups_per_iter(plan.fwd_bag_smem_bytes, q, ranks, plan.DEFAULT_SMEM_LIMIT) == 0
    assert plan.lookups_per_iter(plan.fwd_bag_smem_bytes, q, ranks, plan.SMEM_OPTIN_BYTES[70]) == 0
    assert plan.lookups_per_iter(plan.fwd_bag_smem_bytes, q, ranks, plan.SMEM_OPTIN_BYTES[90]) == 0
    q, ranks = (8, 8, 8), (1, 64, 64, 1)  # |P_1| = 64 * 64 floats: 2048 + 32804 L bytes
    assert plan.fwd_bag_smem_bytes(q, ranks, 1) == 2048 + 32804
    assert plan.lookups_per_iter(plan.fwd_bag_smem_bytes, q, ranks, plan.DEFAULT_SMEM_LIMIT) == 1
    assert plan.lookups_per_iter(plan.fwd_bag_smem_bytes, q, ranks, plan.SMEM_OPTIN_BYTES[90]) == 7
    with pytest.raises(ValueError):
        plan.lookups_per_iter(plan.fwd_bag_smem_bytes, q, ranks, plan.DEFAULT_SMEM_LIMIT, max_lookups=0)


def test_plan_lookups_prefers_the_default_48k_and_opts_in_only_when_needed():
    fwd = plan.fwd_bag_smem_bytes
    # fits 48 KiB with 8 lookups: the opt-in limit changes nothing
    q, ranks = (2, 2, 4), (1, 64, 64, 1)
    assert plan.plan_lookups(fwd, q, ranks, plan.SMEM_OPTIN_BYTES[90]) == (8, fwd(q, ranks, 8))
    assert fwd(q, ranks, 8) <= plan.DEFAULT_SMEM_LIMIT
    # one lookup fits 48 KiB: stay there (occupancy) even though 7 would fit 227 KiB
    q, ranks = (8, 8, 8), (1, 64, 64, 1)
    assert plan.plan_lookups(fwd, q, ranks, plan.SMEM_OPTIN_BYTES[90]) == (1, fwd(q, ranks, 1))
    # nothing fits 48 KiB: opt in, as many lookups as the device allows
    q, ranks = (8, 16, 16), (1, 64, 64, 1)  # |P_1| = 8192 floats, D = 2048: 1 lookup needs 72 KiB
    assert fwd(q, ranks, 1) == 32 + 4 * (1 + 2048 + 2 * 8192)
    assert plan.plan_lookups(fwd, q, ranks, plan.SMEM_OPTIN_BYTES[80]) == (2, fwd(q, ranks, 2))
    assert plan.DEFAULT_SMEM_LIMIT < fwd(q, ranks, 2) <= 163 * 1024 < fwd(q, ranks, 3)
    assert plan.plan_lookups(fwd, q, ranks, plan.DEFAULT_SMEM_LIMIT) == (0, 0)
    # smaller limits than 48 KiB are honoured
    assert plan.plan_lookups(fwd, (2, 2, 4), (1, 64, 64, 1), 4096)[1] <= 4096


@pytest.mark.parametrize("total, block, max_blocks", [
    (0, 128, 10), (1, 128, 10), (127, 128, 10), (128, 128, 10), (129, 128, 10), (5000, 64, 3),
    (3000 * 2 * 4, 32, 7),  # an update of 3000 touched slices (p_k > 1024) with a tiny grid
])
def test_grid_stride_covers_every_element_once(total, block, max_blocks):
    grid = plan.grid_size(total, block, max_blocks)
    assert 1 <= grid <= max_blocks
    visits = _grid_stride_visits(total, grid, block)
    assert sorted(visits) == list(range(total))


def test_grid_size_bounds():
    assert plan.grid_size(10**12, 128) == plan.DEFAULT_MAX_BLOCKS
    assert plan.grid_size(1000, 128, 10**9) == 8
    assert plan.grid_size(10**12, 128, plan.MAX_GRID_X) == plan.MAX_GRID_X
    for bad in (dict(block=0), dict(block=2048), dict(max_blocks=0), dict(max_blocks=2**31)):
        with pytest.raises(ValueError):
            plan.grid_size(10, **{"block": 128, "max_blocks": 10, **bad})
    with pytest.raises(ValueError):
        plan.grid_size(-1, 128)


@pytest.mark.parametrize("n_bags, max_blocks", [(0, 5), (1, 5), (5, 5), (17, 5), (2000, 7)])
def test_bag_grid_visits_every_bag_once(n_bags, max_blocks):
    grid = plan.bag_grid(n_bags, max_blocks)
    assert 1 <= grid <= max_blocks
    visits = [b for blk in range(grid) for b in range(blk, n_bags, grid)]
    assert sorted(visits) == list(range(n_bags))


@given(shapes, st.integers(1 << 10, 1 << 30), st.booleans())
@settings(max_examples=60, deadline=None)
def test_prefix_chunks_bound_the_scratch(shape, budget, backward):
    q, inner = shape
    ranks = _ranks(inner)
    sizes = plan.partial_sizes(q, ranks)
    d = len(q)
    per_lookup = 4 * sum(sizes[1:d - 1]) + 5 * 8 + (4 * 2 * max(sizes[:d - 1]) if backward else 0)
    if budget < per_lookup:
        with pytest.raises(ValueError):
            plan.prefix_chunk_lookups(q, ranks, budget, backward)
        return
    chunk = plan.prefix_chunk_lookups(q, ranks, budget, backward)
    assert chunk >= 1
    assert chunk * per_lookup <= budget < (chunk + 1) * per_lookup
    if backward:  # the forward needs less scratch per lookup
        assert plan.prefix_chunk_lookups(q, ranks, budget, False) >= chunk


def test_one_option_list_for_nvrtc_nvcc_and_emulation(tmp_path):
    common = plan.common_options()
    assert f"-I{plan.INCLUDE_DIR}" in common and f"-I{plan.KERNEL_DIR}" in common
    assert (plan.INCLUDE_DIR / "tt_row.h").is_file()
    nvrtc = plan.nvrtc_options()
    nvcc = plan.nvcc_command(plan.SOURCES[0], ["sm_80", "sm_90"], tmp_path / "x.o")
    emu = plan.emulation_command(plan.SOURCES[0], tmp_path / "x.o")
    for cmd in (nvrtc, nvcc, emu):
        for opt in common:
            assert opt in cmd
    assert "--std=c++17" in nvrtc and "-std=c++17" in nvcc
    assert nvcc[nvcc.index("--Werror") + 1] == "all-warnings"
    assert nvcc.count("-gencode") == 2 and "arch=compute_90,code=sm_90" in nvcc
    assert "-Werror" in emu and str(plan.EMULATION_HEADER) == emu[emu.index("-include") + 1]
    with pytest.raises(ValueError):
        plan.nvcc_command(plan.SOURCES[0], ["compute_80"], tmp_path / "x.o")
    assert re.fullmatch(r"-DTTREC_CUDA_SOURCES=[0-9a-f]{16}", common[-1])


def test_kernel_signatures_match_sources_and_kernel_list():
    sigs = plan.kernel_signatures()
    text = (plan.KERNEL_DIR / "tt_kernels.cuh").read_text()
    listed = re.findall(r"X\((\w+)\)", text.split("#define TT_KERNEL_LIST(X)")[1])
    assert sorted(listed) == sorted(sigs)
    assert plan.kernel_sources().keys() == sigs.keys()  # each prototype defined in exactly one .cu
    assert sigs["tt_count_rows"] == (
        plan.KernelArg("indices", "ptr", "int64_t", True), plan.KernelArg("n", "i64", None, False),
        plan.KernelArg("counts", "ptr", "int64_t", False))
    assert [a.kind for a in sigs["tt_sparse_update"]][-3:] == ["i32", "f32", "f32"]


def test_marshal_checks_types_against_the_prototype():
    cpu = torch.device("cpu")
    idx, counts = torch.zeros(3, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
    out = loader._marshal("tt_count_rows", [idx, 3, counts], cpu)
    assert out == [("ptr", idx.data_ptr()), ("i64", 3), ("ptr", counts.data_ptr())]
    with pytest.raises(TypeError, match="int64"):
        loader._marshal("tt_count_rows", [idx.int(), 3, counts], cpu)
    with pytest.raises(TypeError, match="arguments"):
        loader._marshal("tt_count_rows", [idx, 3], cpu)
    with pytest.raises(TypeError, match="contiguous"):
        loader._marshal("tt_count_rows", [torch.zeros(6, dtype=torch.int64)[::2], 3, counts], cpu)
    with pytest.raises(OverflowError):
        loader._marshal("tt_sparse_update", [None, 2**31, None, None, None, None, 0, 0, 0.1, 0.1], cpu)


@given(shapes)
@settings(max_examples=40, deadline=None)
def test_flops_per_lookup_matches_the_spec(shape):
    q, inner = shape
    p = tuple(7 for _ in q)
    spec = TTSpec(7 ** len(q), math.prod(q), p, tuple(q), tuple(inner))
    assert plan.flops_per_lookup(q, spec.ranks) == spec.flops_per_lookup()


def test_flops_bytes_and_roofline_by_hand():
    q, R = (2, 2, 4), 32
    ranks = (1, R, R, 1)
    assert plan.flops_per_lookup(q, ranks) == 2 * (2 * R * 2 * R + 2 * 2 * R * 4)
    slices = 1 * 2 * R + R * 2 * R + R * 4 * 1
    assert plan.bytes_per_lookup(q, ranks) == 8 + 4 * slices + 4 * 16
    assert plan.bytes_per_lookup(q, ranks, pooling=16) == 8 + 4 * slices + 4
    rate, intensity, bound = plan.roofline_lookups_per_s(q, ranks, 900, 15.7)
    f, b = plan.flops_per_lookup(q, ranks), plan.bytes_per_lookup(q, ranks)
    assert rate == pytest.approx(min(900e9 / b, 15.7e12 / f))
    assert intensity == pytest.approx(f / b)
    assert bound == ("memory" if 900e9 / b < 15.7e12 / f else "compute")


def test_unavailable_reason_here_names_the_missing_gpu():
    reason = loader.unavailable_reason()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: nothing to report")
    assert reason is not None and "no GPU" in reason
    try:
        import cupy  # noqa: F401
    except Exception:
        assert "cupy" in reason and "pip install" in reason


def test_loader_import_needs_no_cupy():
    code = "import sys, ttrec.cuda.loader, ttrec.cuda.launch; assert 'cupy' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_cuda_entry_point_refuses_cpu_tensors_before_any_launch(monkeypatch):
    spec = TTSpec(30, 4, (5, 6), (2, 2), (3,))
    cores = [torch.zeros(s) for s in spec.core_shapes]
    from ttrec.bags import make_bags

    bags = make_bags(torch.tensor([1, 2]), torch.tensor([0]), None, num_embeddings=30, mode="sum")
    if loader.unavailable_reason() is not None:  # no GPU here: that is the reason given, not the tensors
        with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
            loader.tt_bag_cuda(cores, spec, bags, "sum")
    monkeypatch.setattr(loader, "unavailable_reason", lambda: None)  # as on a machine with a GPU
    with pytest.raises(ValueError, match="CUDA tensors"):
        loader.tt_bag_cuda(cores, spec, bags, "sum")


def install_fake_gpu(monkeypatch, fake_cupy: types.ModuleType, stream: int) -> None:
    """A stand-in GPU for the CuPy launcher: ``fake_cupy`` as cupy, an A100's SM count and opt-in
    shared memory (163 KiB), a current stream of handle ``stream``, and no cached module."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    props = types.SimpleNamespace(multi_processor_count=108, shared_memory_per_block_optin=163 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=stream))
    loader._module.cache_clear()


def test_cupy_launcher_glue_with_a_stand_in_cupy(monkeypatch):
    """CupyLauncher against a stand-in for the CuPy API it uses (no GPU here): RawModule compiled from
    the kernel's own .cu with the NVRTC options, typed scalar arguments, torch's stream, opt-in
    shared memory above 48 KiB."""

    import numpy as np

    calls = {}

    class Ctx:
        def __init__(self, *args):
            calls.setdefault("contexts", []).append((type(self).__name__, args))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Device(Ctx):
        pass

    class ExternalStream(Ctx):
        pass

    class Kernel:
        max_dynamic_shared_size_bytes = 0

        def __call__(self, grid, block, args, shared_mem=0):
            calls["launch"] = (grid, block, args, shared_mem, self.max_dynamic_shared_size_bytes)

    class RawModule:
        def __init__(self, code, options, backend):
            calls["module"] = (code, options, backend)

        def get_function(self, name):
            calls["function"] = name
            return Kernel()

    fake = types.ModuleType("cupy")
    fake.RawModule = RawModule
    fake.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream)
    install_fake_gpu(monkeypatch, fake, stream=4242)
    try:
        ln = loader.CupyLauncher(torch.device("cuda", 0))
        assert (ln.smem_limit, ln.max_blocks, ln.block) == (163 * 1024, 108 * 32, plan.DEFAULT_BLOCK)
        ln.launch("tt_count_rows", 3, 128, 0, [("ptr", 1234), ("i64", 5), ("ptr", 0)])
        code, options, backend = calls["module"]
        assert code == (plan.KERNEL_DIR / "tt_cache.cu").read_text() and options == plan.nvrtc_options()
        assert backend == "nvrtc" and calls["function"] == "tt_count_rows"
        grid, block, args, smem, _ = calls["launch"]
        assert (grid, block, smem) == ((3,), (128,), 0)
        assert [type(a) for a in args] == [np.uint64, np.int64, np.uint64] and [int(a) for a in args] == [1234, 5, 0]
        assert ("ExternalStream", (4242, 0)) in calls["contexts"] and ("Device", (0,)) in calls["contexts"]
        ln.launch("tt_sparse_update", 1, 32, 100 * 1024, [("ptr", 1), ("i32", 2), *[("ptr", 0)] * 5, ("i32", 1),
                                                           ("f32", 0.5), ("f32", 1e-10)])
        *_, args, smem, optin = calls["launch"]
        assert smem == optin == 100 * 1024
        assert type(args[1]) is np.int32 and type(args[-1]) is np.float32
    finally:
        loader._module.cache_clear()


def test_registered_backend_reports_why_it_cannot_run(monkeypatch):
    from ttrec import tt

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setitem(tt.BACKENDS, "cuda", (loader.tt_bag_cuda, loader.unavailable_reason))
    assert "no GPU" in tt.backend_status("cuda")
    m = tt.TTEmbeddingBag(100, 16, 4, backend="cuda", seed=0)
    with pytest.raises(RuntimeError, match="no GPU"):
        m(torch.tensor([1, 2]), torch.tensor([0]))
