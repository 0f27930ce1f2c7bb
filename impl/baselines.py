"""The baselines TT-Rec is measured against, behind TTEmbeddingBag's interface.

- :class:`T3nsorEmbeddingBag`: decompress-on-the-fly (T3nsor, Hrinchuk et al.): every forward
  rebuilds the whole (num_embeddings x embedding_dim) table from the cores, then pools from it.
  Gradients flow into the cores through the rebuild. Transient memory is O(num_embeddings * dim).
- :class:`DenseEmbeddingBag`: nn.EmbeddingBag on the uncompressed table, with the suite's input
  checks so every implementation fails the same way on bad input.
- :class:`TltorchEmbeddingBag` (optional peer, ``pip install .[peers]``): tensorly-torch's
  FactorizedEmbedding (blocktt), which gathers core slices per requested row and contracts them
  with einsum; pooled here with index_add. It starts from the same cores as TTEmbeddingBag.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bags import MODES, make_bags
from .reference import tt_to_dense
from .shapes import check_size
from .tt import TTEmbeddingBag, check_device, check_dtype, check_flag, check_seed

__all__ = ["T3nsorEmbeddingBag", "DenseEmbeddingBag", "TltorchEmbeddingBag", "tltorch_unavailable_reason"]


class T3nsorEmbeddingBag(TTEmbeddingBag):
    """Same cores and constructor as TTEmbeddingBag; forward rebuilds the full table each call.

    It always runs on torch ops (``backend`` may only be "torch" or "auto", and is "torch") and
    has no fused update (``optimizer`` must be None): cores get .grad through autograd.
    """

    def __init__(self, *args, backend: str = "torch", optimizer: str | None = None, **kwargs) -> None:
        if backend not in ("torch", "auto"):
            raise ValueError(f"backend: got {backend!r}; T3nsorEmbeddingBag decompresses with torch ops only, "
                             "allowed: 'torch' (or 'auto')")
        if optimizer is not None:
            raise ValueError(f"optimizer: got {optimizer!r}; T3nsorEmbeddingBag has no fused update, allowed: None "
                             "(train its cores with a torch optimizer)")
        super().__init__(*args, backend="torch", **kwargs)

    def forward(self, input, offsets=None, per_sample_weights=None):
        bags = make_bags(input, offsets, per_sample_weights, num_embeddings=self.num_embeddings,
                         mode=self.mode, include_last_offset=self.include_last_offset)
        full = tt_to_dense(list(self.tt_cores), self.spec)
        return F.embedding_bag(bags.indices, full, bags.offsets, mode=self.mode,
                               per_sample_weights=bags.weights_as(full.dtype), include_last_offset=True)


class DenseEmbeddingBag(nn.EmbeddingBag):
    """nn.EmbeddingBag, initialized Uniform(-1/sqrt(N), 1/sqrt(N)) as in DLRM, with input checks.

    Defaults: mode "sum", include_last_offset False, sparse False (dense gradients), seed None
    (torch's global RNG), dtype torch.float32, device None (CPU).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "sum",
                 include_last_offset: bool = False, sparse: bool = False, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        check_device(device)
        if mode not in MODES:
            raise ValueError(f"mode: got {mode!r}; allowed: {MODES}")
        num_embeddings, embedding_dim = check_size("num_embeddings", num_embeddings), check_size("embedding_dim", embedding_dim)
        include_last_offset, sparse = check_flag("include_last_offset", include_last_offset), check_flag("sparse", sparse)
        seed, dtype = check_seed(seed), check_dtype(dtype)
        super().__init__(num_embeddings, embedding_dim, mode=mode, include_last_offset=include_last_offset,
                         sparse=sparse, dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = num_embeddings ** -0.5
        with torch.no_grad():
            w = torch.rand(num_embeddings, embedding_dim, generator=gen, dtype=dtype) * 2 * bound - bound
            self.weight.copy_(w)

    def forward(self, input, offsets=None, per_sample_weights=None):
        bags = make_bags(input, offsets, per_sample_weights, num_embeddings=self.num_embeddings,
                         mode=self.mode, include_last_offset=self.include_last_offset)
        return F.embedding_bag(bags.indices, self.weight, bags.offsets, mode=self.mode, sparse=self.sparse,
                               per_sample_weights=bags.weights_as(self.weight.dtype), include_last_offset=True)


def tltorch_unavailable_reason() -> str | None:
    try:
        import tltorch  # noqa: F401
    except Exception as exc:  # ImportError, or tensorly missing underneath
        return f"tensorly-torch is not importable ({exc}); install the peers extra: pip install '.[peers]'"
    return None


class TltorchEmbeddingBag(nn.Module):
    """tltorch.FactorizedEmbedding(factorization='blocktt') behind nn.EmbeddingBag's forward.

    tltorch needs prod(p) == its row count, so it is built over prod(p) rows (the padding rows are
    never looked up, as in TTEmbeddingBag). Its cores have our layout (R_{k-1}, p_k, q_k, R_k) and
    are set to TTEmbeddingBag's init for the same arguments.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tt_ranks, tt_p_shapes=None, tt_q_shapes=None,
                 mode: str = "sum", include_last_offset: bool = False, init: str = "calibrated", d: int = 3,
                 seed: int | None = None, device=None) -> None:
        super().__init__()
        check_device(device)
        reason = tltorch_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"impl 'tltorch': {reason}")
        import tltorch

        tt = TTEmbeddingBag(num_embeddings, embedding_dim, tt_ranks, tt_p_shapes, tt_q_shapes, mode=mode,
                            include_last_offset=include_last_offset, init=init, d=d, backend="torch", seed=seed)
        self.spec, self.mode, self.include_last_offset = tt.spec, mode, include_last_offset
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        s = tt.spec
        self.inner = tltorch.FactorizedEmbedding(
            math.prod(s.tt_p_shapes), embedding_dim, auto_tensorize=False, tensorized_num_embeddings=s.tt_p_shapes,
            tensorized_embedding_dim=s.tt_q_shapes, rank=list(s.ranks), factorization="blocktt", device=device)
        with torch.no_grad():
            for factor, core in zip(self.inner.weight.factors, tt.tt_cores):
                factor.copy_(core)

    def forward(self, input, offsets=None, per_sample_weights=None):
        bags = make_bags(input, offsets, per_sample_weights, num_embeddings=self.num_embeddings,
                         mode=self.mode, include_last_offset=self.include_last_offset)
        rows = self.inner(bags.indices)
        if bags.per_sample_weights is not None:
            rows = rows * bags.weights_as(rows.dtype).unsqueeze(1)
        out = rows.new_zeros(bags.num_bags, self.embedding_dim).index_add(0, bags.bag_ids(), rows)
        if self.mode == "mean":
            out = out / bags.bag_sizes().clamp(min=1).unsqueeze(1).to(out.dtype)
        return out
