"""The baselines TT-Rec is measured against, behind TTEmbeddingBag's interface.

- :class:`T3nsorEmbeddingBag`: decompress-on-the-fly (T3nsor, Hrinchuk et al.): every forward
  rebuilds the whole (num_embeddings x embedding_dim) table from the cores, then pools from it.
  Gradients flow into the cores through the rebuild. Transient memory is O(num_embeddings * dim).
- :class:`DenseEmbeddingBag`: nn.EmbeddingBag on the uncompressed table, with the suite's input
  checks so every implementation fails the same way on bad input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bags import make_bags
from .reference import tt_to_dense
from .tt import TTEmbeddingBag

__all__ = ["T3nsorEmbeddingBag", "DenseEmbeddingBag"]


class T3nsorEmbeddingBag(TTEmbeddingBag):
    """Same cores and constructor as TTEmbeddingBag; forward rebuilds the full table each call."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("backend", "torch")
        super().__init__(*args, **kwargs)

    def forward(self, input, offsets=None, per_sample_weights=None):
        bags = make_bags(input, offsets, per_sample_weights, num_embeddings=self.num_embeddings,
                         mode=self.mode, include_last_offset=self.include_last_offset)
        full = tt_to_dense(list(self.tt_cores), self.spec)
        return F.embedding_bag(bags.indices, full, bags.offsets, mode=self.mode,
                               per_sample_weights=bags.per_sample_weights, include_last_offset=True)


class DenseEmbeddingBag(nn.EmbeddingBag):
    """nn.EmbeddingBag, initialized Uniform(-1/sqrt(N), 1/sqrt(N)) as in DLRM, with input checks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "sum",
                 include_last_offset: bool = False, sparse: bool = False, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
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
                               per_sample_weights=bags.per_sample_weights, include_last_offset=True)
