"""One check shared by the native-kernel tests: forward and core gradients against the reference."""

from __future__ import annotations

import torch

import ttrec
from ttrec.cpu import ops


def assert_matches_reference(cores, spec, bags, grad_out, mode: str = "sum") -> None:
    """ops.forward and ops.backward equal the float64 reference and its autograd (fp32 tolerances
    scaled by the largest reference value)."""
    ref_cores = [c.double().requires_grad_() for c in cores]
    want = ttrec.tt_embedding_bag(ref_cores, spec, bags, mode)
    got = ops.forward(cores, spec, bags, mode)
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    grads = ops.backward(cores, spec, bags, mode, grad_out)
    for a, b in zip(grads, torch.autograd.grad(want, ref_cores, grad_out.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)
