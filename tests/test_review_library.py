"""Found by a library-user walkthrough: TTEmbeddingBag (and the LFU cache around it) under
torch.inference_mode, with inference tensors later, in TorchScript, and a fused optimizer's refusal
reached through the cache. Checked against the no_grad forward, autograd on the reference backend
and the messages TTEmbeddingBag itself gives."""

from __future__ import annotations

import pytest
import torch

from ttrec.cache import CachedTTEmbeddingBag
from ttrec.cpu.build import unavailable_reason
from ttrec.tt import TTEmbeddingBag

BACKENDS = ["torch"] + ([] if unavailable_reason() is not None else ["cpu"])


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 1000, (64,), generator=g), torch.arange(0, 64, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_pools_like_no_grad(backend):
    """Inference tensors keep no version counter: the forward under inference_mode equals no_grad's,
    for the module and for the LFU cache around it (before and after it holds rows)."""
    idx, off = _batch()
    emb = TTEmbeddingBag(1000, 16, 4, backend=backend, seed=0)
    with torch.no_grad():
        want = emb(idx, off)
    with torch.inference_mode():
        assert torch.equal(emb(idx, off), want)
    cached = CachedTTEmbeddingBag(TTEmbeddingBag(1000, 16, 4, backend=backend, seed=0), cache_fraction=0.05,
                                  warmup_iters=1, refresh_every=0)
    for _ in range(2):  # the second call follows the warm-up: the cache holds rows
        with torch.inference_mode():
            got = cached(idx, off)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_made_under_inference_mode_trains_outside_it(backend):
    """Index tensors created under inference_mode, used for a training step after it: the gradient of
    every core is the reference backend's (float64 autograd) on the same batch."""
    with torch.inference_mode():
        idx, off = _batch()
    emb = TTEmbeddingBag(1000, 16, 4, backend=backend, seed=0)
    grad = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    emb(idx, off).backward(grad)
    ref = TTEmbeddingBag(1000, 16, 4, backend="torch", seed=0).double()
    ref(idx.clone(), off.clone()).backward(grad.double())
    for c, r in zip(emb.tt_cores, ref.tt_cores):
        torch.testing.assert_close(c.grad.double(), r.grad, rtol=1e-4, atol=1e-6)


def test_a_cached_fused_module_in_float64_is_refused_as_the_module_refuses_it():
    """The cache's lookups of rows it does not hold go through TTEmbeddingBag's own dispatch: a fused
    optimizer on a float64 module names why there is no backend, not a TypeError from inside."""
    idx, off = _batch()
    cached = CachedTTEmbeddingBag(TTEmbeddingBag(1000, 16, 4, optimizer="sgd"), cache_fraction=0.05,
                                  warmup_iters=1, refresh_every=0).double()
    with pytest.raises(RuntimeError, match=r"optimizer='sgd' \(fused update\) has no torch backend; backend 'auto' "
                                           r"resolved to 'torch' because: .*float64"):
        cached(idx, off)


def test_torchscript_is_refused_with_a_reason():
    """torch.jit.script: a ttrec message, not TorchScript's parse error; torch.jit.trace records the
    reference backend, and refuses the native one (its kernel is outside torch's operators)."""
    idx, off = _batch()
    with pytest.raises(RuntimeError, match="TTEmbeddingBag cannot be compiled by torch.jit.script"):
        torch.jit.script(TTEmbeddingBag(1000, 16, 4))
    ref = TTEmbeddingBag(1000, 16, 4, backend="torch", seed=0)
    traced = torch.jit.trace(ref, (idx, off), check_trace=False)
    torch.testing.assert_close(traced(idx, off), ref(idx, off))
    if "cpu" in BACKENDS:
        with pytest.raises(RuntimeError, match="torch.jit.trace cannot record backend 'cpu'"):
            torch.jit.trace(TTEmbeddingBag(1000, 16, 4, backend="cpu"), (idx, off))
