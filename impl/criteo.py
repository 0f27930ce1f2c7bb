"""Reader for the Criteo Kaggle / Terabyte text format, mapping categorical values to table rows.

Each line is one sample, tab-separated: an optional label (0/1), 13 integer features, then 26
categorical features written as hexadecimal strings. Any field may be empty. Two widths exist:
40 fields (label first: Kaggle ``train.txt`` and Terabyte ``day_N``) and 39 fields (no label:
Kaggle ``test.txt``); the width is taken from the first line and every other line must match it.

Preprocessing follows DLRM's ``data_utils.getCriteoAdData``:

- an empty field reads as 0 (both integer and categorical features, and the label);
- integer features below 0 become 0 and are transformed to log(x + 1) (float32);
- an integer feature is ``int(field)`` of an optional ``-`` and decimal digits only (no ``+``,
  spaces or underscores);
- a categorical value is ``int(field, 16)`` of hexadecimal digits only (0-9, a-f, A-F: no sign,
  ``0x`` prefix, spaces or underscores); it becomes a table row either by
  ``mapping="dictionary"``: per feature, distinct values numbered 0, 1, 2, ... in order of first
  occurrence (DLRM's ``convertDicts``; reading a whole file gives DLRM's ids), or by
  ``mapping="hash"``: ``value % num_embeddings`` (DLRM's ``max_ind_range``, without its later
  re-numbering).

A dictionary that needs more rows than its table has is an error (naming the feature, its table
size and the line), not a silent wrap-around. A malformed line (wrong field count, a label that is
not 0/1, a non-integer integer feature, a non-hexadecimal categorical value) raises ValueError
with the file name and the 1-based line number. ``require_label=True`` (training and held-out data)
makes a 39-field (unlabelled) file an error naming the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .workloads import Batch

__all__ = ["NUM_INT_FEATURES", "NUM_CAT_FEATURES", "MAPPINGS", "CriteoBatch", "CriteoReader", "feature_batches"]

NUM_INT_FEATURES = 13
NUM_CAT_FEATURES = 26
MAPPINGS = ("dictionary", "hash")
_INT_FIELD = re.compile(r"-?[0-9]+")
_HEX_FIELD = re.compile(r"[0-9a-fA-F]+")
_WIDTHS = {NUM_INT_FEATURES + NUM_CAT_FEATURES + 1: True, NUM_INT_FEATURES + NUM_CAT_FEATURES: False}


@dataclass(frozen=True)
class CriteoBatch:
    """labels float32 (B,) (NaN for unlabelled files), dense float32 (B, 13) = log(max(x, 0) + 1),
    sparse int64 (B, 26): feature j's table row of each sample."""

    labels: torch.Tensor
    dense: torch.Tensor
    sparse: torch.Tensor

    def feature(self, j: int) -> Batch:
        """Feature ``j`` as an embedding-bag batch: one lookup per sample (pooling factor 1)."""
        b = self.sparse.shape[0]
        return Batch(self.sparse[:, j].contiguous(), torch.arange(b, dtype=torch.int64), None)


class CriteoReader:
    """Iterates a Criteo text file in batches of ``batch_size`` samples (the last may be smaller).

    num_embeddings: one table size for all 26 features, or 26 sizes.
    mapping: "dictionary" or "hash" (see the module docstring). The dictionaries live on the
    reader, so a second pass over the same file gives the same ids; ``dictionaries`` shares another
    reader's (ids continue that reader's numbering: a value it has seen keeps its row).
    require_label: a file without labels (39 fields) is an error.
    """

    def __init__(self, path: str | Path, num_embeddings: int | Sequence[int], batch_size: int = 2048,
                 mapping: str = "hash", dictionaries: list[dict[int, int]] | None = None,
                 require_label: bool = False) -> None:
        self.path = Path(path)
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping: got {mapping!r}; allowed: {MAPPINGS}")
        sizes = [num_embeddings] * NUM_CAT_FEATURES if isinstance(num_embeddings, int) else list(num_embeddings)
        if len(sizes) != NUM_CAT_FEATURES:
            raise ValueError(f"num_embeddings: got {len(sizes)} table sizes; need one int or {NUM_CAT_FEATURES}")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"num_embeddings: got {s!r}; every table size must be an int >= 1")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; must be an int >= 1")
        if not self.path.is_file():
            raise FileNotFoundError(f"criteo path: {self.path} is not a file")
        self.num_embeddings, self.batch_size, self.mapping = sizes, batch_size, mapping
        if dictionaries is not None and len(dictionaries) != NUM_CAT_FEATURES:
            raise ValueError(f"dictionaries: got {len(dictionaries)}; need {NUM_CAT_FEATURES} (one per feature)")
        self.dictionaries: list[dict[int, int]] = (dictionaries if dictionaries is not None
                                                   else [{} for _ in range(NUM_CAT_FEATURES)])
        self.require_label = require_label
        self.has_label: bool | None = None

    def _row(self, j: int, value: int, where: str) -> int:
        if self.mapping == "hash":
            return value % self.num_embeddings[j]
        d = self.dictionaries[j]
        row = d.get(value)
        if row is None:
            row = len(d)
            if row >= self.num_embeddings[j]:
                raise ValueError(f"{where}: categorical feature {j} has more than num_embeddings="
                                 f"{self.num_embeddings[j]} distinct values; use a larger table or mapping='hash'")
            d[value] = row
        return row

    def _parse(self, line: str, lineno: int) -> tuple[float, list[float], list[int]]:
        where = f"{self.path}:{lineno}"
        parts = line.rstrip("\r\n").split("\t")
        if self.has_label is None:
            if len(parts) not in _WIDTHS:
                raise ValueError(f"{where}: got {len(parts)} tab-separated fields; expected 40 (label, 13 integer, "
                                 "26 categorical) or 39 (no label)")
            if self.require_label and not _WIDTHS[len(parts)]:
                raise ValueError(f"{where}: no labels: {len(parts)} fields, a labelled Criteo file has 40 "
                                 "(label first); training and held-out data need labels")
            self.has_label = _WIDTHS[len(parts)]
        expected = 40 if self.has_label else 39
        if len(parts) != expected:
            raise ValueError(f"{where}: got {len(parts)} tab-separated fields; expected {expected} like the first line")
        label = math.nan
        if self.has_label:
            if parts[0] not in ("", "0", "1"):
                raise ValueError(f"{where}: label: got {parts[0]!r}; expected 0, 1 or empty")
            label = float(parts[0] or 0)
            parts = parts[1:]
        dense = []
        for j, f in enumerate(parts[:NUM_INT_FEATURES]):
            if f and not _INT_FIELD.fullmatch(f):
                raise ValueError(f"{where}: integer feature {j}: got {f!r}; expected a decimal integer "
                                 "(optional '-', digits only) or empty")
            x = int(f) if f else 0
            dense.append(math.log(max(x, 0) + 1))
        sparse = []
        for j, f in enumerate(parts[NUM_INT_FEATURES:]):
            if f and not _HEX_FIELD.fullmatch(f):
                raise ValueError(f"{where}: categorical feature {j}: got {f!r}; "
                                 "expected hexadecimal digits only (0-9, a-f) or empty")
            value = int(f, 16) if f else 0
            sparse.append(self._row(j, value, where))
        return label, dense, sparse

    def __iter__(self) -> Iterator[CriteoBatch]:
        labels, dense, sparse = [], [], []
        with self.path.open("r", encoding="ascii", errors="replace", newline="") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip("\r\n"):
                    raise ValueError(f"{self.path}:{lineno}: empty line; every line must be one sample")
                y, x, c = self._parse(line, lineno)
                labels.append(y)
                dense.append(x)
                sparse.append(c)
                if len(labels) == self.batch_size:
                    yield _batch(labels, dense, sparse)
                    labels, dense, sparse = [], [], []
        if labels:
            yield _batch(labels, dense, sparse)


def _batch(labels, dense, sparse) -> CriteoBatch:
    return CriteoBatch(torch.tensor(labels, dtype=torch.float32),
                       torch.from_numpy(np.asarray(dense, dtype=np.float32).reshape(-1, NUM_INT_FEATURES)),
                       torch.from_numpy(np.asarray(sparse, dtype=np.int64).reshape(-1, NUM_CAT_FEATURES)))


def feature_batches(path: str | Path, feature: int, num_embeddings: int, batch_size: int = 2048,
                    mapping: str = "hash", repeat: bool = True,
                    device: str | torch.device = "cpu") -> Iterator[Batch]:
    """Embedding-bag batches of categorical feature ``feature`` (0..25) of a Criteo file, mapped into a
    table of ``num_embeddings`` rows (one bag per sample). With ``repeat`` the file is read again from
    the start when it ends (the dictionaries persist, so ids stay the same) as one stream of samples:
    every batch has ``batch_size`` bags (a pass's last samples open the next batch; a file shorter
    than a batch is read as often as it takes). Without, a pass's last batch may be smaller."""
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < NUM_CAT_FEATURES:
        raise ValueError(f"feature: got {feature!r}; must be an int in [0, {NUM_CAT_FEATURES})")
    reader = CriteoReader(path, num_embeddings, batch_size, mapping)
    pending = None  # (repeat) bags not yet in a full batch
    while True:
        empty = True
        for cb in reader:
            empty = False
            b = cb.feature(feature)
            if not repeat:
                yield Batch(b.indices.to(device), b.offsets.to(device), None)
                continue
            pending = b if pending is None else _joined(pending, b)
            while pending is not None and pending.num_bags >= batch_size:
                full, pending = _split(pending, batch_size)
                yield Batch(full.indices.to(device), full.offsets.to(device), None)
        if empty:
            raise ValueError(f"{path}: no samples")
        if not repeat:
            return


def _joined(a: Batch, b: Batch) -> Batch:
    """The bags of ``a``, then those of ``b`` (offsets: bag starts)."""
    return Batch(torch.cat([a.indices, b.indices]), torch.cat([a.offsets, b.offsets + a.num_lookups]), None)


def _split(batch: Batch, n: int) -> tuple[Batch, Batch | None]:
    """The first ``n`` bags of ``batch`` and the rest (None if none)."""
    if batch.num_bags == n:
        return batch, None
    cut = int(batch.offsets[n])
    return Batch(batch.indices[:cut], batch.offsets[:n], None), Batch(batch.indices[cut:], batch.offsets[n:] - cut, None)
