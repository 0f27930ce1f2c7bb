"""Build any implementation by name from plain values (what a config holds)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .baselines import DenseEmbeddingBag, T3nsorEmbeddingBag, TltorchEmbeddingBag
from .tt import TTEmbeddingBag

__all__ = ["IMPLEMENTATIONS", "build_embedding"]

IMPLEMENTATIONS = ("tt", "t3nsor", "dense", "tltorch")


def build_embedding(
    impl: str,
    num_embeddings: int,
    embedding_dim: int,
    *,
    tt_ranks: int | Sequence[int] = 32,
    tt_p_shapes: Sequence[int] | None = None,
    tt_q_shapes: Sequence[int] | None = None,
    d: int = 3,
    init: str = "calibrated",
    backend: str = "auto",
    mode: str = "sum",
    sparse: bool = False,
    seed: int | None = 0,
    device=None,
    optimizer: str | None = None,
    learning_rate: float = 0.01,
) -> nn.Module:
    """An embedding-bag module: ``tt`` (TTEmbeddingBag), ``t3nsor``, ``dense`` (nn.EmbeddingBag) or
    ``tltorch`` (optional peer).

    TT arguments are ignored by ``dense``; ``sparse`` (sparse gradients) only applies to ``dense``;
    ``optimizer``/``learning_rate`` (a fused sparse update inside backward) only to ``tt``.
    """
    if optimizer is not None and impl != "tt":
        raise ValueError(f"optimizer: a fused update exists for impl 'tt' only, got impl={impl!r}")
    if impl == "dense":
        return DenseEmbeddingBag(num_embeddings, embedding_dim, mode=mode, sparse=sparse, seed=seed, device=device)
    tt_kwargs = dict(tt_ranks=tt_ranks, tt_p_shapes=tt_p_shapes, tt_q_shapes=tt_q_shapes, d=d, init=init,
                     mode=mode, seed=seed, device=device)
    if impl == "tt":
        return TTEmbeddingBag(num_embeddings, embedding_dim, backend=backend, optimizer=optimizer,
                              learning_rate=learning_rate, **tt_kwargs)
    if impl == "t3nsor":
        return T3nsorEmbeddingBag(num_embeddings, embedding_dim, **tt_kwargs)
    if impl == "tltorch":
        return TltorchEmbeddingBag(num_embeddings, embedding_dim, **tt_kwargs)
    raise ValueError(f"impl: got {impl!r}; allowed: {IMPLEMENTATIONS}")
