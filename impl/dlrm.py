"""DLRM (Naumov et al. 2019) with the structure of the MLPerf reference, in plain PyTorch, with the
k largest embedding tables in TT format (TT-Rec, the paper's section 5 setup).

Model, top to bottom (B samples, F = 1 + number of tables feature vectors of width D):

- bottom MLP over the 13 dense features: Linear + ReLU per layer, output width D;
- one embedding bag per categorical feature (one lookup per sample, sum pooling): the ``k``
  largest tables are :class:`ttrec.TTEmbeddingBag` (optionally behind an LFU cache,
  :class:`ttrec.cache.CachedTTEmbeddingBag`), the others ``nn.EmbeddingBag`` with sparse gradients;
- dot interaction: the F vectors stacked (B, F, D), all pairwise dot products (B, F, F), the
  F(F-1)/2 pairs i < j (no self-interaction) concatenated with the bottom MLP's output;
- top MLP: Linear + ReLU per layer, the last layer linear: one logit per sample. The loss is BCE
  on the logit (``binary_cross_entropy_with_logits``: the reference's sigmoid + BCE, fused for
  stability); the optimizer SGD.

MLP weights are initialized as the DLRM reference does: W ~ N(0, 2 / (fan_in + fan_out)),
b ~ N(0, 1 / fan_out). Dense embedding tables: :data:`DENSE_INITS` (paper Table 1), DLRM's
Uniform(-1/sqrt(n), 1/sqrt(n)) by default.

The forward is split in two so a training loop can time the embedding part on its own:
``embed(sparse) -> (B, T, D)`` and ``interact(dense, embedded) -> (B,)`` logits.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import CachedTTEmbeddingBag
from .datasets import DATASETS, Dataset
from .registry import build_embedding
from .tt import TTEmbeddingBag

__all__ = ["DLRMArch", "ARCHS", "DENSE_INITS", "init_dense_table", "build_tables", "DLRM", "build_dlrm",
           "table_sizes", "binary_metrics", "roc_auc"]

NUM_DENSE = 13


@dataclass(frozen=True)
class DLRMArch:
    """MLP widths and the MLPerf-DLRM reference's hyperparameters for one Criteo dataset.

    bottom_mlp: widths after the 13 dense inputs (the last is embedding_dim);
    top_mlp: widths after the interaction (the last is 1);
    batch_size, learning_rate: the reference scripts' mini-batch and SGD step.
    """

    dataset: str
    embedding_dim: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    batch_size: int
    learning_rate: float

    def __post_init__(self) -> None:
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(f"bottom_mlp: got {self.bottom_mlp}; its last width must be embedding_dim="
                             f"{self.embedding_dim} (the interaction needs equal widths)")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp: got {self.top_mlp}; its last width must be 1 (one logit)")

    def describe(self) -> tuple[str, str]:
        """'13-512-256-64-16', '367-512-256-1' (the top's input width for 26 tables included)."""
        top_in = self.embedding_dim + 27 * 26 // 2
        return ("-".join(map(str, (NUM_DENSE, *self.bottom_mlp))), "-".join(map(str, (top_in, *self.top_mlp))))


# dlrm_s_criteo_kaggle.sh: dim 16, bottom 13-512-256-64-16, top 512-256-1, lr 0.1, mini-batch 128;
# dlrm_s_criteo_terabyte.sh (MLPerf's DLRM before v0.7): dim 64, bottom 13-512-256-64,
# top 512-512-256-1, lr 0.1, mini-batch 2048, max index range 10M.
ARCHS = {
    "kaggle": DLRMArch("kaggle", 16, (512, 256, 64, 16), (512, 256, 1), 128, 0.1),
    "terabyte": DLRMArch("terabyte", 64, (512, 256, 64), (512, 512, 256, 1), 2048, 0.1),
}

# Paper Table 1: name -> (label, std of the entries given the table's rows n; None = uniform)
DENSE_INITS: dict[str, tuple[str, Callable[[int], float] | None]] = {
    "uniform": ("U(-1/sqrt(n), 1/sqrt(n))", None),
    "gauss_1": ("N(0, 1)", lambda n: 1.0),
    "gauss_1_2": ("N(0, 1/2)", lambda n: math.sqrt(0.5)),
    "gauss_1_8": ("N(0, 1/8)", lambda n: math.sqrt(1 / 8)),
    "gauss_1_3n": ("N(0, 1/(3n))", lambda n: math.sqrt(1 / (3 * n))),
    "gauss_1_9n2": ("N(0, 1/(9n^2))", lambda n: 1 / (3 * n)),
}


@torch.no_grad()
def init_dense_table(weight: torch.Tensor, scheme: str, generator: torch.Generator | None = None) -> None:
    """Fill an (n, D) table in place with ``scheme`` of :data:`DENSE_INITS` (n = rows)."""
    if scheme not in DENSE_INITS:
        raise ValueError(f"dense_init: got {scheme!r}; allowed: {list(DENSE_INITS)}")
    n = weight.shape[0]
    std = DENSE_INITS[scheme][1]
    if std is None:
        bound = n ** -0.5
        weight.copy_(torch.rand(weight.shape, generator=generator, dtype=weight.dtype) * 2 * bound - bound)
    else:
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * std(n))


def table_sizes(dataset: Dataset | str, scale_down: int = 1) -> list[int]:
    """Rows per table, each ceil(rows / scale_down) (at least 1): the real cardinalities, shrunk."""
    if isinstance(dataset, str) and dataset not in DATASETS:
        raise ValueError(f"dataset: got {dataset!r}; allowed: {list(DATASETS)}")
    ds = DATASETS[dataset] if isinstance(dataset, str) else dataset
    if isinstance(scale_down, bool) or not isinstance(scale_down, int) or scale_down < 1:
        raise ValueError(f"scale_down: got {scale_down!r}; must be an int >= 1")
    return [max(1, -(-n // scale_down)) for n in ds.table_rows]


def check_table_rows(table_rows, count: int | None = None) -> list[int]:
    """``table_rows`` as a list of ints, each a whole number >= 1 (numpy ints too; a float, bool or
    string was truncated or read as a count), else a ValueError naming it; ``count``: how many.
    The one check of a model's table sizes: build_tables, SyntheticClicks, CriteoClicks."""
    try:
        rows = list(table_rows)
    except TypeError:
        raise ValueError(f"table_rows: got {table_rows!r}; need a sequence of row counts, one per categorical "
                         "feature") from None
    if not rows:
        raise ValueError("table_rows: got no tables; need one row count per categorical feature")
    if count is not None and len(rows) != count:
        raise ValueError(f"table_rows: got {len(rows)} row counts; need {count}, one per categorical feature")
    for j, n in enumerate(rows):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"table_rows: got {n!r} rows for table {j}; each must be an int >= 1")
    return [int(n) for n in rows]


def build_tables(table_rows: Sequence[int], embedding_dim: int, tt_features: Sequence[int] = (), *,
                 tt_rank: int = 32, tt_init: str = "sampled_gaussian", tt_d: int = 3, dense_init: str = "uniform",
                 learning_rate: float = 0.1, fused: bool = True, backend: str = "auto",
                 cache_fraction: float | None = None, cache_warmup_iters: int = 0, cache_refresh_every: int = 0,
                 seed: int = 0) -> nn.ModuleList:
    """One embedding bag per table, in feature order (table j is seeded with ``seed + j``).

    Features in ``tt_features`` get a TTEmbeddingBag (rank, init, d cores, shapes suggested), with
    the fused sparse SGD of ``learning_rate`` inside backward when ``fused`` (else the cores get
    autograd gradients) and, with ``cache_fraction``, an LFU cache in front (trained by the same
    fused SGD). The rest get nn.EmbeddingBag (sparse gradients), initialized by ``dense_init``.
    """
    table_rows = check_table_rows(table_rows)
    tt_features = set(tt_features)
    unknown = sorted(f for f in tt_features if not 0 <= f < len(table_rows))
    if unknown:
        raise ValueError(f"tt_features: got {unknown}; features are 0..{len(table_rows) - 1}")
    tables = []
    for j, n in enumerate(table_rows):
        if j in tt_features:
            tt = build_embedding("tt", n, embedding_dim, tt_ranks=tt_rank, d=tt_d, init=tt_init, backend=backend,
                                 seed=seed + j, optimizer="sgd" if fused else None, learning_rate=learning_rate)
            if cache_fraction is not None:
                tt = CachedTTEmbeddingBag(tt, cache_fraction, warmup_iters=cache_warmup_iters,
                                          refresh_every=cache_refresh_every, optimizer="sgd" if fused else None,
                                          learning_rate=learning_rate, sparse=True)
            tables.append(tt)
        else:
            table = build_embedding("dense", n, embedding_dim, sparse=True, seed=seed + j)
            if dense_init != "uniform":
                init_dense_table(table.weight, dense_init, torch.Generator().manual_seed(seed + j))
            tables.append(table)
    return nn.ModuleList(tables)


def _mlp(widths: Sequence[int], last_relu: bool, generator: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (m, n) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(m, n)
        with torch.no_grad():  # the DLRM reference's init
            lin.weight.copy_(torch.randn(n, m, generator=generator) * math.sqrt(2.0 / (m + n)))
            lin.bias.copy_(torch.randn(n, generator=generator) * math.sqrt(1.0 / n))
        layers.append(lin)
        if i < len(widths) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """DLRM over ``tables`` (one embedding bag per categorical feature, all of width D).

    forward(dense float32 (B, 13), sparse int64 (B, T)) -> logits float32 (B,).
    """

    def __init__(self, arch: DLRMArch, tables: nn.ModuleList, seed: int = 0) -> None:
        super().__init__()
        widths = [t.embedding_dim for t in tables]
        if any(w != arch.embedding_dim for w in widths):
            raise ValueError(f"tables: got embedding dims {sorted(set(widths))}; the {arch.dataset} DLRM's interaction "
                             f"needs every table of width embedding_dim={arch.embedding_dim}")
        gen = torch.Generator().manual_seed(seed)
        self.arch, self.tables = arch, tables
        num_features = 1 + len(tables)
        self.bottom = _mlp((NUM_DENSE, *arch.bottom_mlp), last_relu=True, generator=gen)
        self.top = _mlp((arch.embedding_dim + num_features * (num_features - 1) // 2, *arch.top_mlp),
                        last_relu=False, generator=gen)
        iu = torch.triu_indices(num_features, num_features, offset=1)
        self.register_buffer("_pairs_i", iu[0], persistent=False)
        self.register_buffer("_pairs_j", iu[1], persistent=False)
        self._offsets = torch.empty(0, dtype=torch.int64)

    def embed(self, sparse: torch.Tensor) -> torch.Tensor:
        """(B, T) row ids -> (B, T, D): feature j looked up in table j (one lookup per bag)."""
        if sparse.dim() != 2 or sparse.shape[1] != len(self.tables) or sparse.shape[0] < 1:
            raise ValueError(f"sparse: got shape {tuple(sparse.shape)}; expected (batch >= 1, {len(self.tables)})")
        b = sparse.shape[0]
        if self._offsets.numel() != b:
            self._offsets = torch.arange(b, dtype=torch.int64, device=sparse.device)
        return torch.stack([t(sparse[:, j].contiguous(), self._offsets) for j, t in enumerate(self.tables)], dim=1)

    def interact(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Bottom MLP of ``dense`` (B, 13), dot interaction with ``embedded`` (B, T, D), top MLP -> logits (B,)."""
        if dense.dim() != 2 or dense.shape[1] != NUM_DENSE or dense.shape[0] != embedded.shape[0]:
            raise ValueError(f"dense: got shape {tuple(dense.shape)}; expected ({embedded.shape[0]}, {NUM_DENSE}) "
                             "(one row of dense features per sample of the sparse batch)")
        x = self.bottom(dense)
        feats = torch.cat([x.unsqueeze(1), embedded], dim=1)           # (B, F, D)
        z = torch.bmm(feats, feats.transpose(1, 2))                     # (B, F, F)
        pairs = z[:, self._pairs_i, self._pairs_j]                      # (B, F(F-1)/2)
        return self.top(torch.cat([x, pairs], dim=1)).squeeze(1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.interact(dense, self.embed(sparse))

    def mlp_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters()) + list(self.top.parameters())

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Table parameters a torch optimizer must step: nn.EmbeddingBag weights (sparse gradients)
        and TT cores / cache rows without a fused update. Fused ones update inside backward."""
        out = []
        for t in self.tables:
            if isinstance(t, CachedTTEmbeddingBag):
                if t.tt.optimizer is None:
                    out += list(t.tt.parameters())
                if t.cache_optimizer is None:
                    out.append(t.cache_weight)
            elif isinstance(t, TTEmbeddingBag):
                if t.optimizer is None:
                    out += list(t.parameters())
            else:
                out += list(t.parameters())
        return out

    def embedding_bytes(self) -> int:
        """Bytes of every table's parameters (TT cores, cache rows, dense tables), fp32."""
        return sum(p.numel() * p.element_size() for p in self.tables.parameters())


def build_dlrm(dataset: str, table_rows: Sequence[int] | None = None, tt_tables: int = 0, *, seed: int = 0,
               **table_kwargs) -> DLRM:
    """The DLRM of ``dataset`` ("kaggle"/"terabyte") with its ``tt_tables`` largest tables in TT format.

    table_rows: rows per table (default: the dataset's); ``table_kwargs`` go to :func:`build_tables`.
    """
    if dataset not in ARCHS:
        raise ValueError(f"dataset: got {dataset!r}; allowed: {list(ARCHS)}")
    ds, arch = DATASETS[dataset], ARCHS[dataset]
    rows = list(table_rows) if table_rows is not None else list(ds.table_rows)
    if len(rows) != len(ds.table_rows):
        raise ValueError(f"table_rows: got {len(rows)} sizes; {dataset} has {len(ds.table_rows)} tables")
    if isinstance(tt_tables, bool) or not isinstance(tt_tables, int) or not 0 <= tt_tables <= len(rows):
        raise ValueError(f"tt_tables: got {tt_tables!r}; must be an int in [0, {len(rows)}]")
    order = sorted(range(len(rows)), key=lambda i: -rows[i])  # Dataset.largest's order, on these sizes
    tables = build_tables(rows, arch.embedding_dim, order[:tt_tables], seed=seed, **table_kwargs)
    return DLRM(arch, tables, seed=seed)


# ---- evaluation ----

def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` against 0/1 (or bool) ``labels``, 1 = positive, by the
    rank-sum (Mann-Whitney) formula, ties given their mean rank. NaN when only one class is present,
    or when a score is NaN (a diverged model has no ranking)."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    if scores.size != labels.size:
        raise ValueError(f"scores, labels: got {scores.size} and {labels.size} values; need the same number")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"labels: got {labels[bad][0].item()!r}; each must be 0 or 1")
    labels = labels == 1
    if np.isnan(scores).any():
        return math.nan
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                   # rank of the last member of each tie group (1-based)
    mean_rank = ends - (counts - 1) / 2.0      # mean 1-based rank within each tie group
    rank_sum = mean_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy (%, threshold 0.5), bce (mean, nats) and auc of logits (N,) against 0/1 labels (N,),
    and ``nan_logits``, how many logits are NaN. A NaN logit (a diverged model) makes all three
    metrics NaN: it predicts nothing (counted as a "no click" it would score the negatives' share).
    An infinite logit (float32 overflow) is a certain prediction: its BCE term is 0 when its sign
    matches the label, else inf (torch's formula gives NaN for it)."""
    logits, labels = logits.detach().double().flatten(), labels.detach().double().flatten()
    if logits.numel() != labels.numel() or logits.numel() == 0:
        raise ValueError(f"logits, labels: got {logits.numel()} and {labels.numel()} values; need the same, > 0")
    if not ((labels == 0) | (labels == 1)).all():
        bad = labels[(labels != 0) & (labels != 1)][0].item()
        raise ValueError(f"labels: got {bad}; each must be 0 or 1")
    nan = int(torch.isnan(logits).sum())
    acc = math.nan if nan else float(((logits > 0).double() == labels).double().mean()) * 100
    terms = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    inf = torch.isinf(logits)
    if inf.any():  # -log sigmoid(+-inf): 0 on the label's side, inf on the other (torch: NaN)
        terms = torch.where(inf, torch.where((logits > 0) == (labels == 1), 0.0, math.inf), terms)
    bce = float(terms.mean())
    return {"accuracy": acc, "bce": bce, "auc": roc_auc(logits.numpy(), labels.numpy()), "nan_logits": nan}
