"""Second review of the CUDA backend: the CuPy launch on a device other than the current one, and
negative views (torch._neg_view, the imaginary part of a conj view), whose values are negated only in
a flag the kernels cannot see, since they read memory through data_ptr().

The kernels run on the CPU as in tests/test_cuda_emulated.py (g++ with impl/cuda/emulation.h,
``EmuLauncher``); results are compared with ttrec.reference on the views' values (autograd for
gradients) and with the same call on plain tensors.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from ttrec.bags import Bags, make_bags
from ttrec.cuda import launch as plan
from ttrec.cuda import loader
from ttrec.reference import tt_embedding_bag
from ttrec.shapes import TTSpec

from .test_cuda_launch import install_fake_gpu
from .test_cuda_emulated import EmuLauncher, emu_lib, make_cores, reference_grads  # noqa: F401  (emu_lib: fixture)


@pytest.fixture
def emu(emu_lib):  # noqa: F811
    return EmuLauncher(emu_lib)


# ---- CupyLauncher on a device that is not the current one (multi-GPU) ----

def _per_device_cupy(launches: list, current: list[int]) -> types.ModuleType:
    """A stand-in for the CuPy calls CupyLauncher makes, with CuPy's per-device behaviour: a RawModule
    compiles lazily, and a RawKernel's function (and so its attributes) is the one loaded for the
    device current when it is looked up; a launch asking for more dynamic shared memory than the
    function allows fails as the driver would (CUDA_ERROR_INVALID_VALUE)."""
    loaded: dict[tuple[int, str], dict] = {}

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev
            return False

    class ExternalStream:
        def __init__(self, ptr, device_id):
            assert device_id == current[0], "the stream belongs to the current device"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class RawKernel:
        def __init__(self, name):
            self.name = name

        @property
        def _function(self):
            return loaded.setdefault((current[0], self.name), {"device": current[0], "max_dynamic": 48 * 1024})

        @property
        def max_dynamic_shared_size_bytes(self):
            return self._function["max_dynamic"]

        @max_dynamic_shared_size_bytes.setter
        def max_dynamic_shared_size_bytes(self, value):
            self._function["max_dynamic"] = value

        def __call__(self, grid, block, args, shared_mem=0):
            f = self._function
            if shared_mem > f["max_dynamic"]:
                raise RuntimeError("CUDA_ERROR_INVALID_VALUE: dynamic shared memory above the function's limit")
            launches.append((self.name, f["device"], shared_mem))

    class RawModule:
        def __init__(self, code, options, backend):
            pass  # compiled on first use, for the device current then

        def get_function(self, name):
            kernel = RawKernel(name)
            kernel._function  # noqa: B018  (loads it on the current device, as CuPy does)
            return kernel

    fake = types.ModuleType("cupy")
    fake.RawModule = RawModule
    fake.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream)
    fake.loaded = loaded
    return fake


def test_cupy_launcher_opts_in_on_the_device_it_launches_on(monkeypatch):
    """Launching on cuda:1 while cuda:0 is current: the function is looked up and given its opt-in
    shared memory with device 1 current (before, both happened on device 0's function, and the
    launch on device 1 asked for more than its function allowed). Cannot run on a GPU here."""
    launches, current = [], [0]
    fake = _per_device_cupy(launches, current)
    install_fake_gpu(monkeypatch, fake, stream=77)
    try:
        ln = loader.CupyLauncher(torch.device("cuda", 1))
        args = [("ptr", 1), ("i32", 0), *[("ptr", 0)] * 5, ("i32", 0), ("f32", 0.5), ("f32", 1e-10)]
        ln.launch("tt_sparse_update", 1, 32, 100 * 1024, args)
        ln.launch("tt_count_rows", 1, 32, 0, [("ptr", 1), ("i64", 1), ("ptr", 2)])
    finally:
        loader._module.cache_clear()
    assert launches == [("tt_sparse_update", 1, 100 * 1024), ("tt_count_rows", 1, 0)]
    assert current == [0], "the current device is restored"
    assert {dev for dev, _ in fake.loaded} == {1}, "nothing is compiled or loaded for device 0"


# ---- negative views ----

D2 = TTSpec(140, 16, (13, 11), (4, 4), (8,))
D3 = TTSpec(6 * 5 * 7, 24, (6, 5, 7), (2, 3, 4), (5, 7))


def _bags(spec: TTSpec, mode: str = "sum") -> Bags:
    idx = torch.tensor([1, spec.num_embeddings - 1, 77, 5, 77, 0])
    return make_bags(idx, torch.tensor([0, 2, 2]), None, num_embeddings=spec.num_embeddings, mode=mode)


@pytest.mark.parametrize("algo", ["fused", "prefix"])
@pytest.mark.parametrize("spec", [D2, D3], ids=["d2", "d3"])
def test_negative_view_of_a_core_and_of_grad_out_count_with_their_values(emu, spec, algo):
    cores = make_cores(spec, 3)
    viewed = [torch._neg_view(-cores[0]), *cores[1:]]  # values: cores[0]; memory: -cores[0]
    assert viewed[0].is_neg() and torch.equal(viewed[0], cores[0])
    bags = _bags(spec)
    ref = tt_embedding_bag(cores, spec, bags, "sum")
    torch.testing.assert_close(loader.forward(viewed, spec, bags, "sum", launcher=emu, algo=algo), ref)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    grads = loader.backward(viewed, spec, bags, "sum", torch._neg_view(-grad_out), launcher=emu, algo=algo)
    for g, r in zip(grads, reference_grads(cores, spec, bags, "sum", grad_out)):
        torch.testing.assert_close(g, r)


def _neg_view_of(values: torch.Tensor) -> torch.Tensor:
    return torch._neg_view(-values)


@pytest.mark.parametrize("field", ["indices", "offsets", "per_sample_weights"])
def test_hand_built_bags_with_a_negative_view_are_refused_before_any_launch(emu, field):
    """An index of -1 in memory reads as 1 through the view: the range check passed it and the
    kernel read before core 1 (the raw -1 keeps that read 16 bytes before the allocation)."""
    cores = make_cores(D2, 1)
    parts = {"indices": torch.tensor([1, 1, 2]), "offsets": torch.tensor([0, 1, 3]),
             "per_sample_weights": torch.tensor([0.5, 1.0, 2.0])}
    parts[field] = _neg_view_of(parts[field])
    bags = Bags(parts["indices"], parts["offsets"], parts["per_sample_weights"])
    match = f"bags.{field}: got a negative view"
    with pytest.raises(ValueError, match=match):
        loader.forward(cores, D2, bags, "sum", launcher=emu)
    with pytest.raises(ValueError, match=match):
        loader.backward(cores, D2, bags, "sum", torch.ones(2, 16), launcher=emu)
    with pytest.raises(ValueError, match=match):
        loader.cache_sgd(torch.zeros(2, 16), torch.tensor([0, -1, 1]), bags, "sum", torch.ones(2, 16), 0.1, launcher=emu)
    assert emu.log == []


def test_tensors_written_in_place_may_not_be_negative_views(emu):
    cores = make_cores(D2, 2)
    bags = _bags(D2)
    grad_out = torch.ones(3, 16)
    scratch = [torch.zeros_like(c) for c in cores]
    state = [torch.zeros_like(c) for c in cores]
    with pytest.raises(ValueError, match=r"grads\[1\]: got a negative view"):
        loader.backward(cores, D2, bags, "sum", grad_out, grads=[scratch[0], torch._neg_view(scratch[1])], launcher=emu)
    with pytest.raises(ValueError, match=r"cores\[0\]: got a negative view"):
        loader.sparse_update([torch._neg_view(cores[0]), cores[1]], D2, bags, "sum", grad_out, "sgd", 0.1, 1e-10,
                             scratch, None, launcher=emu)
    with pytest.raises(ValueError, match=r"state\[1\]: got a negative view"):
        loader.sparse_update(cores, D2, bags, "sum", grad_out, "adagrad", 0.1, 1e-10, scratch,
                             [state[0], torch._neg_view(state[1])], launcher=emu)
    with pytest.raises(ValueError, match="counts: got a negative view"):
        loader.count_rows(torch.tensor([1, 2]), torch._neg_view(torch.zeros(140, dtype=torch.int64)), launcher=emu)
    row_slot = torch.full((140,), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match="cache: got a negative view"):
        loader.cached_forward(cores, D2, bags, "sum", torch._neg_view(torch.zeros(3, 16)), row_slot, launcher=emu)
    with pytest.raises(ValueError, match="cache: got a negative view"):
        loader.cache_sgd(torch._neg_view(torch.zeros(3, 16)), torch.full((6,), -1), bags, "sum", grad_out, 0.1,
                         launcher=emu)
    assert emu.log == [] and not any(s.any() for s in scratch)


def test_cache_kernels_read_the_values_of_negative_views(emu):
    idx = torch.tensor([3, 7, 3, 100, 7, 3])
    row_slot = torch.full((140,), -1, dtype=torch.int64)
    row_slot[3], row_slot[100] = 0, 2
    slot, cached = loader.cache_partition(_neg_view_of(idx), _neg_view_of(row_slot), launcher=emu)
    assert torch.equal(slot, row_slot[idx]) and torch.equal(cached, (row_slot[idx] >= 0).to(torch.uint8))
    # cache_sgd: slot -1 (not cached) would be 1 in memory, a row of the cache
    bags = make_bags(idx, torch.tensor([0, 2, 2]), None, num_embeddings=140, mode="mean")
    grad_out = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    cache = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    plain = cache.clone()
    loader.cache_sgd(plain, slot, bags, "mean", grad_out, 0.1, launcher=emu)
    loader.cache_sgd(cache, _neg_view_of(slot), bags, "mean", grad_out, 0.1, launcher=emu)
    torch.testing.assert_close(cache, plain)
    assert torch.equal(cache[1], torch.randn(3, 16, generator=torch.Generator().manual_seed(2))[1]), "row 1 not cached"


def test_count_rows_reads_the_values_of_negative_view_indices(emu_lib):  # noqa: F811
    """In memory the indices are -1 and -3: the kernel added 1 before the start of ``counts`` (a heap
    write out of range), hence a subprocess."""
    code = f"""
import torch
from tests.test_cuda_emulated import EmuLauncher, load_emulation
from ttrec.cuda import loader
lib = load_emulation({emu_lib._name!r})
counts = torch.zeros(8, dtype=torch.int64)
loader.count_rows(torch._neg_view(torch.tensor([-1, -3, -1])), counts, launcher=EmuLauncher(lib))
print(counts.tolist())
"""
    root = str(plan.KERNEL_DIR.parent.parent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == str([0, 2, 0, 1, 0, 0, 0, 0])


def test_sparse_update_names_a_wrong_number_of_cores(emu):
    cores = make_cores(D2, 0)
    state = [torch.zeros_like(c) for c in cores]
    with pytest.raises(ValueError, match="cores: got 3 tensors; expected one per core, d=2"):
        loader.sparse_update([*cores, cores[0]], D2, _bags(D2), "sum", torch.ones(3, 16), "adagrad", 0.1, 1e-10,
                             [torch.zeros_like(c) for c in cores], state, launcher=emu)
    assert emu.log == []
