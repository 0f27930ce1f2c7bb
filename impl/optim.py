"""The fused sparse optimizers' names and the checks of their hyper-parameters: one definition for
TTEmbeddingBag, the LFU cache and the native CPU and CUDA sparse updates.

SGD: w -= lr g. Adagrad (as torch.optim.Adagrad): h += g^2, w -= lr g / (sqrt(h) + eps), on the
rows or core slices a batch touched.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["FUSED_OPTIMIZERS", "check_optimizer", "check_lr", "check_eps"]

FUSED_OPTIMIZERS = ("sgd", "adagrad")


def check_optimizer(optimizer, allow_none: bool = False) -> None:
    allowed = (None, *FUSED_OPTIMIZERS) if allow_none else FUSED_OPTIMIZERS
    if optimizer not in allowed:
        raise ValueError(f"optimizer: got {optimizer!r}; allowed: {', '.join(map(repr, allowed))}")


def check_lr(value, name: str = "learning_rate") -> None:
    """A learning rate: a finite number > 0, also in float32, the kernels' precision (1e39 became inf
    there, and 1e-50 zero: no update at all). ``name``: the caller's parameter name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf \
            or not 0 < _float32(value) < math.inf:
        raise ValueError(f"{name}: got {value!r}; must be a finite number > 0 that float32 holds "
                         f"(1.4e-45 to 3.4e38)")


def _float32(value) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def check_eps(value) -> None:
    """Adagrad's eps: > 0 also in float32 (the kernels' precision). With eps = 0 an element whose
    gradients have all been 0 so far (a touched slice's entry, a cached row not looked up) has
    h = 0, and its step 0 / (sqrt(0) + 0) would write NaN into the table."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf \
            or not 0 < _float32(value) < math.inf:
        raise ValueError(f"eps: got {value!r}; must be a finite number > 0 that float32 holds (1.4e-45 to 3.4e38): "
                         "Adagrad divides by sqrt(h) + eps, and h is 0 where every gradient so far was 0")
