"""The public module API against nn.EmbeddingBag: every implementation pools like F.embedding_bag on
its own dense table (TT: the reconstruction through tt_to_dense, so gradients are autograd's through
it), refuses bad constructor arguments by name, and survives copy/pickle/state_dict round trips."""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch
import torch.nn.functional as F

from ttrec.baselines import DenseEmbeddingBag, T3nsorEmbeddingBag
from ttrec.cpu import ops as cpu_ops
from ttrec.reference import tt_to_dense
import ttrec
from ttrec.tt import TTEmbeddingBag

N, D, R, P, Q = 50, 8, 4, (2, 5, 5), (2, 2, 2)
needs_cpu = pytest.mark.skipif(cpu_ops.unavailable_reason() is not None, reason="native CPU kernel not built")


def _i64(*v):
    return torch.tensor(v, dtype=torch.int64)


def _i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def _make(impl: str, **kw):
    if impl == "dense":
        return DenseEmbeddingBag(N, D, seed=1, **kw)
    if impl == "t3nsor":
        return T3nsorEmbeddingBag(N, D, R, P, Q, seed=1, **kw)
    return TTEmbeddingBag(N, D, R, P, Q, seed=1, backend=impl.split("-")[1], **kw)


def _dense_table(m) -> torch.Tensor:
    """The table the module stands for, with autograd back to its parameters."""
    return m.weight if isinstance(m, DenseEmbeddingBag) else tt_to_dense(list(m.tt_cores), m.spec)


IMPLS = ["tt-torch", pytest.param("tt-cpu", marks=needs_cpu), "t3nsor", "dense"]
# (name, include_last_offset, input, offsets, weighted)
BATCHES = [
    ("1d", False, _i64(1, 2, 3, 4, 49), _i64(0, 2), False),
    ("1d include_last_offset", True, _i64(1, 2, 3, 4, 49), _i64(0, 2, 5), False),
    ("2d", False, torch.tensor([[1, 7, 3], [0, 49, 49]]), None, False),
    ("2d include_last_offset", True, torch.tensor([[1, 7, 3], [0, 49, 49]]), None, False),
    ("empty bags", False, _i64(1, 2, 3, 4, 5), _i64(0, 0, 2, 2), False),
    ("trailing empty bag", False, _i64(1, 2, 3, 4, 5), _i64(0, 2, 5), False),
    ("include_last_offset, empty last bag", True, _i64(1, 2, 3, 4, 5), _i64(0, 2, 5, 5), False),
    ("int32 both", False, _i32(1, 2, 3, 4, 5), _i32(0, 2), False),
    ("int32 input, int64 offsets", False, _i32(1, 2, 3, 4, 5), _i64(0, 2), False),
    ("int64 input, int32 offsets", True, _i64(1, 2, 3, 4, 5), _i32(0, 2, 5), False),
    ("zero lookups", False, _i64(), _i64(0, 0, 0), False),
    ("zero lookups include_last_offset", True, _i64(), _i64(0, 0, 0), False),
    ("non-contiguous", False, torch.arange(0, 20)[::2][:5], _i64(0, 9, 2, 9, 4)[::2], False),
    ("weighted", False, _i64(1, 2, 3, 4, 49, 49), _i64(0, 2, 2), True),
    ("weighted 2d", False, torch.tensor([[1, 7, 3], [0, 49, 49]]), None, True),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("case", BATCHES, ids=[b[0] for b in BATCHES])
def test_pools_and_differentiates_like_embedding_bag_on_its_table(impl, mode, case):
    _, ilo, x, offsets, weighted = case
    if weighted and mode == "mean":
        pytest.skip("per_sample_weights: sum only")
    m = _make(impl, mode=mode, include_last_offset=ilo)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) if weighted else None
    out = m(x, offsets, per_sample_weights=w)
    ref = F.embedding_bag(x, _dense_table(m), offsets, mode=mode, include_last_offset=ilo, per_sample_weights=w)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    params = list(m.parameters())
    got = torch.autograd.grad((out * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- copies: copy.deepcopy and torch.save(module) (a threading.Lock made both raise TypeError) ----

def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, N, (40,), generator=gen), torch.arange(0, 40, 4)


@pytest.mark.parametrize("make", [
    lambda: TTEmbeddingBag(N, D, R, P, Q, seed=0, backend="torch"),
    pytest.param(lambda: TTEmbeddingBag(N, D, R, P, Q, seed=0, backend="cpu", optimizer="adagrad",
                                        learning_rate=0.1), marks=needs_cpu),
    lambda: T3nsorEmbeddingBag(N, D, R, P, Q, seed=0),
], ids=["tt-torch", "tt-cpu-adagrad", "t3nsor"])
def test_module_deepcopies_and_pickles_like_embedding_bag(make):
    m = make()
    x, offsets = _batch()
    m(x, offsets).pow(2).sum().backward()  # a fused module has its scratch from here on
    before = m(x, offsets).detach()
    twin = copy.deepcopy(m)
    torch.testing.assert_close(twin(x, offsets), before, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x, offsets), before, atol=0, rtol=0)
    # the copy owns its tables: training it leaves the original as it was
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin(x, offsets).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(twin(x, offsets), before)
    torch.testing.assert_close(m(x, offsets).detach(), before, atol=0, rtol=0)


@pytest.mark.parametrize("optimizer", [None, pytest.param("sgd", marks=needs_cpu), pytest.param("adagrad", marks=needs_cpu)])
def test_state_dict_round_trip_restores_outputs_and_training(optimizer):
    backend = "torch" if optimizer is None else "cpu"

    def make(seed):
        return TTEmbeddingBag(N, D, R, P, Q, seed=seed, backend=backend, optimizer=optimizer, learning_rate=0.1)

    a, b = make(0), make(5)
    x, offsets = _batch()
    a(x, offsets).pow(2).sum().backward()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, offsets), b(x, offsets))
    if optimizer is not None:  # the Adagrad accumulators came along: the next steps agree too
        for _ in range(2):
            a(x, offsets).pow(2).sum().backward()
            b(x, offsets).pow(2).sum().backward()
        assert torch.equal(a(x, offsets), b(x, offsets))


def test_double_runs_in_float64_like_a_float64_table():
    m = TTEmbeddingBag(N, D, R, P, Q, seed=0, backend="auto").double()
    x, offsets = _batch()
    out = m(x, offsets)
    cores64 = [c.detach().double() for c in m.tt_cores]
    ref = F.embedding_bag(x, tt_to_dense(cores64, m.spec), offsets, mode="sum")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@needs_cpu
def test_double_on_the_native_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="float64.*float32"):
        TTEmbeddingBag(N, D, R, P, Q, seed=0, backend="cpu").double()(*_batch())


# ---- constructor arguments ----

def _tt(**kw):
    args = dict(num_embeddings=N, embedding_dim=D, tt_ranks=R)
    args.update(kw)
    return TTEmbeddingBag(**args)


def _t3(**kw):
    args = dict(num_embeddings=N, embedding_dim=D, tt_ranks=R)
    args.update(kw)
    return T3nsorEmbeddingBag(**args)


def _dense(**kw):
    return DenseEmbeddingBag(N, D, **kw)


@pytest.mark.parametrize("make", [_tt, _t3, _dense], ids=["tt", "t3nsor", "dense"])
@pytest.mark.parametrize("kw, name", [
    (dict(include_last_offset="False"), "include_last_offset"),  # a truthy string meant False
    (dict(include_last_offset=None), "include_last_offset"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(seed=2**70), "seed"),
    (dict(dtype=torch.int64), "dtype"),
    (dict(dtype=torch.complex64), "dtype"),
])
def test_bad_flag_seed_dtype_are_named(make, kw, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}: got {repr(next(iter(kw.values())))[:12]}"):
        make(**kw)


def test_dense_sparse_must_be_a_bool():
    with pytest.raises(TypeError, match="^sparse: got 'no'"):
        DenseEmbeddingBag(N, D, sparse="no")


@pytest.mark.parametrize("kw, match", [
    (dict(tt_ranks=True), "^tt_ranks: got True"),
    (dict(tt_ranks=(True, 2)), r"^tt_ranks: got \(True, 2\)"),
    (dict(tt_ranks=0), "tt_ranks must be >= 1, got 0"),
    (dict(num_embeddings=-5), "^num_embeddings: got -5"),
    (dict(embedding_dim=0), "^embedding_dim: got 0"),
    (dict(tt_p_shapes=5), "^tt_p_shapes: got 5; allowed"),
    (dict(tt_p_shapes=(50,)), r"^tt_p_shapes: got \(50,\); allowed"),
    (dict(tt_q_shapes=(8,)), r"^tt_q_shapes: got \(8,\); allowed"),
    (dict(tt_p_shapes="255"), "^tt_p_shapes: got '255'; allowed"),
    (dict(tt_p_shapes=(2, 5, 4)), "covers prod=40 rows < num_embeddings=50"),
    (dict(tt_q_shapes=(2, 2, 3)), "prod=12 != embedding_dim=8"),
    (dict(mode="max"), "^mode: got 'max'"),
    (dict(learning_rate=0.0, optimizer="sgd", backend="auto"), "^learning_rate: got 0.0"),
])
def test_bad_constructor_arguments_are_named(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _tt(**kw)


# where the class docstring states each default, {v} standing for the signature's default
_DEFAULT_PHRASES = {
    "tt_p_shapes": "suggested when {v} (default)", "tt_q_shapes": "suggested when {v} (default)",
    "mode": "{v} (default)", "include_last_offset": "(default {v})", "init": "(default {v})", "d": "(default {v};",
    "backend": "{v} (default)", "seed": "(default {v}:", "dtype": "(default {v};", "device": "(default {v}:",
    "optimizer": "{v} (default:", "learning_rate": "(default {v})", "eps": "(default {v})",
}


def _shown(v) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


def test_docstring_states_every_default():
    doc = " ".join(inspect.getdoc(TTEmbeddingBag).split())
    defaults = {name: p.default for name, p in inspect.signature(TTEmbeddingBag.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert set(defaults) == set(_DEFAULT_PHRASES)
    for name, v in defaults.items():
        assert _DEFAULT_PHRASES[name].format(v=_shown(v)) in doc, (name, v)


@pytest.mark.parametrize("impl", IMPLS[:3])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_zero_lookups_give_zeros_whatever_the_cores_hold(impl, mode):
    """A batch without lookups reads no row: zeros as nn.EmbeddingBag gives, also when some core
    entry (of a row nobody looked up) is inf or NaN (the reference gave NaN bags: c.sum() * 0)."""
    m = _make(impl, mode=mode)
    with torch.no_grad():
        m.tt_cores[2][0, 4, 0, 0] = float("inf")
        m.tt_cores[1][0, 1, 1, 0] = float("nan")
    x, offsets = _i64(), _i64(0, 0, 0)
    out = m(x, offsets)
    torch.testing.assert_close(out, F.embedding_bag(x, torch.zeros(N, D), offsets, mode=mode), atol=0, rtol=0)
    if impl != "t3nsor":  # (its rebuild of the table multiplies the zero gradient by the inf)
        out.sum().backward()
        for c in m.tt_cores:
            assert torch.equal(c.grad, torch.zeros_like(c))


@needs_cpu
def test_the_fused_updates_scratch_is_made_again_after_the_module_moves():
    """The scratch (zeros shaped like the cores, made on the first fused update) was kept through
    .to()/.cuda(): after .cuda() the CUDA update would have been handed CPU scratch tensors."""
    m = TTEmbeddingBag(60, 8, 3, backend="cpu", optimizer="sgd", seed=0)
    m(torch.tensor([1, 2, 59]), torch.tensor([0, 2])).sum().backward()
    assert m._scratch is not None and all(s.dtype == torch.float32 for s in m._scratch)
    m.to(torch.float64)
    assert m._scratch is None  # made again, in the cores' dtype and device, on the next update
    m.to(torch.float32)
    m(torch.tensor([1, 2, 59]), torch.tensor([0, 2])).sum().backward()
    assert [s.shape for s in m._scratch] == [c.shape for c in m.tt_cores] and not any(s.any() for s in m._scratch)


def test_ranks_whose_cores_cannot_fit_in_memory_are_refused_by_name(monkeypatch):
    """A rank of 100,000 reached torch's allocator ("DefaultCPUAllocator: can't allocate memory: you tried
    to allocate 8000000000000 bytes"), which names neither the argument nor the cores: refused first."""
    import ttrec.init as init

    monkeypatch.setattr(init, "_available_bytes", lambda: 64 * 2**30)  # (not this machine's MemAvailable)
    with pytest.raises(ValueError, match=r"^tt_ranks: got \[100000, 100000\] with tt_p_shapes=\[10, 10, 10\], "
                                         r"tt_q_shapes=\[2, 2, 4\]: the cores hold 200,006,000,000 parameters and need "
                                         r"[0-9.]+ GiB to be made, but 64.0 GiB of memory is available"):
        ttrec.TTEmbeddingBag(1000, 16, 100000)
    # the bound: the cores' own bytes plus three float64 temporaries of the largest core (drawn so, then cast)
    spec = ttrec.TTSpec(1000, 16, (10, 10, 10), (2, 2, 4), (8, 8))
    need = spec.param_count * 4 + max(math.prod(s) for s in spec.core_shapes) * 8 * 3
    monkeypatch.setattr(init, "_available_bytes", lambda: need)
    ttrec.TTEmbeddingBag(1000, 16, 8, tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 2, 4])
    monkeypatch.setattr(init, "_available_bytes", lambda: need - 1)
    with pytest.raises(ValueError, match="memory is available; lower the ranks"):
        ttrec.TTEmbeddingBag(1000, 16, 8, tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 2, 4])
    monkeypatch.setattr(init, "_available_bytes", lambda: None)  # (no /proc/meminfo: not checked)
    ttrec.TTEmbeddingBag(1000, 16, 8, tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 2, 4])
