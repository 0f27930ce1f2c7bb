"""What the autograd Functions around the native kernels (CPU, CUDA) and the cache's fused rows
refuse in their backward, in one place: what autograd checks by itself for ordinary ops
(saved tensors changed in place, a second backward through freed buffers, second derivatives) but
cannot see through a kernel that reads raw pointers or updates parameters in place.
"""

from __future__ import annotations

from typing import Callable

import torch

from .bags import Bags, changed_in_place

__all__ = ["refuse_changed_batch", "fused_update_once", "without_second_derivative"]


def refuse_changed_batch(bags: Bags, kernel: str) -> None:
    """Raise if an in-place torch op changed the batch since the forward: the ``kernel``'s backward
    reads the batch again (its indices through pointers, unchecked), as nn.EmbeddingBag's does."""
    changed = changed_in_place(bags)
    if changed is not None:
        raise RuntimeError(f"{changed}: modified by an in-place operation between the forward and the backward; "
                           f"the {kernel}'s backward reads the batch again (nn.EmbeddingBag's backward refuses this "
                           "too): change a copy (.clone()) instead")


def fused_update_once(ctx, kernel: str, update: Callable[[], None]) -> None:
    """Run a fused optimizer update from ``ctx``'s backward, at most once per forward. A second
    backward through a retained graph (``backward(retain_graph=True)`` twice) would apply a second
    step, computed from the forward's rows although the first step has changed the parameters
    since: autograd refuses the same for a saved tensor an optimizer changed in place, so this
    refuses it too."""
    if getattr(ctx, "fused_update_ran", False):
        raise RuntimeError(f"a second backward through the same forward of the {kernel} with a fused optimizer: its update "
                           "already ran in the first backward (retain_graph=True) and changed the parameters the "
                           "forward used; run the forward again before each backward")
    update()
    ctx.fused_update_ran = True


class _NoSecondDerivative(torch.autograd.Function):
    """A kernel's gradient under create_graph=True, tied to what it depends on (the upstream
    gradient and the cores): differentiating it raises. The kernel's gradients have no graph, so
    a second derivative through them (a gradient penalty, a Hessian-vector product) would otherwise
    miss their part silently; torch's once_differentiable does not catch torch.autograd.grad,
    which skips its error node."""

    @staticmethod
    def forward(ctx, kernel, grad, *depends_on):
        ctx.kernel = kernel
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"a second derivative through the {ctx.kernel} (create_graph=True, then "
                           "differentiating its core gradients): it has none; use backend='torch'")


def without_second_derivative(grads: list[torch.Tensor], grad_out: torch.Tensor, cores, kernel: str) -> list:
    """``grads`` as a backward returns them: as they are, or under create_graph=True tied to
    ``grad_out`` and ``cores`` so that differentiating them raises (they must not pass for constants)."""
    if not torch.is_grad_enabled():
        return grads
    return [_NoSecondDerivative.apply(kernel, g, grad_out, *cores) for g in grads]
