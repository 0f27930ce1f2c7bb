"""Click data for DLRM training: a synthetic click stream with a planted ground truth, and Criteo files.

:class:`SyntheticClicks` draws samples shaped like Criteo's: 13 dense features and one row id per
categorical table (the real table cardinalities, optionally shrunk), labels from a hidden model.

- Row ids: per table, Zipf(``zipf_alpha``) ranks scattered over the table by a random permutation
  (:class:`ttrec.workloads.WorkloadStream`'s sampler, one seeded stream per table).
- Dense features: log(1 + x) with x exponential of a per-feature mean (1 to 1000, log-spaced),
  Criteo's preprocessing of counts.
- Labels: y ~ Bernoulli(sigmoid(logit)) with the planted model (:class:`PlantedModel`)
  ``logit = bias + w . standardize(dense) + sum_j a_j[r_j] + sum_{j<k} <v_j[r_j], v_k[r_k]>``:
  a dense part, a first-order value per table row and pairwise interactions of low-dimensional
  row vectors (``planted_dim``), all random, i.i.d. per row (full rank: a TT table cannot store
  them exactly). The parts' standard deviations are set by ``dense_std``, ``first_order_std``
  and ``interaction_std`` (each table's share scaled as if every table had many rows: a table of
  one row, common at a large ``scale_down``, adds a constant, so the measured spread of the
  first-order part is below ``first_order_std``), and ``bias`` so that the click rate is ``ctr``.

Because the labels' probabilities are known, the Bayes-optimal accuracy of a held-out set (the
planted model's own accuracy on it) is known: :meth:`SyntheticClicks.bayes_metrics`.

Order of draws from the seeded streams: a calibration sample (standardization, bias), then the
held-out set, then the training batches, so the held-out set never overlaps the training stream's
draws and everything is reproducible from ``seed``.

:class:`CriteoClicks` serves Criteo text files (:class:`ttrec.criteo.CriteoReader`) through the same
interface; the first ``eval_samples`` samples are held out (or a separate file, sharing the training
file's dictionaries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .criteo import NUM_CAT_FEATURES, CriteoReader
from .dlrm import NUM_DENSE, binary_metrics, check_table_rows
from .workloads import Workload, WorkloadStream

__all__ = ["ClickBatch", "SyntheticClicks", "PlantedModel", "CriteoClicks"]

_ID_CHUNK = 8192  # row ids drawn per table at a time


@dataclass(frozen=True)
class ClickBatch:
    """dense float32 (B, 13), sparse int64 (B, T) row ids, labels float32 (B,) 0/1."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def split(self, size: int) -> list["ClickBatch"]:
        """Consecutive pieces of ``size`` samples (the last may be smaller)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: got {size!r}; must be an int >= 1 (samples per piece)")
        return [ClickBatch(self.dense[s:s + size], self.sparse[s:s + size], self.labels[s:s + size])
                for s in range(0, len(self), size)]


class PlantedModel(nn.Module):
    """The hidden ground truth: forward(dense (B, 13), sparse (B, T)) -> logits (B,) (see the module
    docstring). ``first_order[j]`` is (n_j,), ``vectors[j]`` (n_j, planted_dim)."""

    def __init__(self, first_order: list[torch.Tensor], vectors: list[torch.Tensor], dense_weight: torch.Tensor,
                 dense_mean: torch.Tensor, dense_std: torch.Tensor, bias: float = 0.0) -> None:
        super().__init__()
        self.first_order, self.vectors = first_order, vectors
        self.dense_weight, self.dense_mean, self.dense_std = dense_weight, dense_mean, dense_std
        self.bias = bias

    def parts(self, dense: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dense part, first-order part, interaction part), each (B,), without the bias."""
        d = ((dense.double() - self.dense_mean) / self.dense_std) @ self.dense_weight
        first = sum(a[sparse[:, j]] for j, a in enumerate(self.first_order))
        vs = torch.stack([v[sparse[:, j]] for j, v in enumerate(self.vectors)], dim=1)  # (B, T, k)
        # sum over pairs j < k of <v_j, v_k> = (|sum_j v_j|^2 - sum_j |v_j|^2) / 2
        inter = 0.5 * (vs.sum(1).pow(2).sum(1) - vs.pow(2).sum((1, 2)))
        return d, first, inter

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        d, first, inter = self.parts(dense, sparse)
        return (self.bias + d + first + inter).float()


def _dense_features(rng: np.random.Generator, n: int, means: np.ndarray) -> np.ndarray:
    return np.log1p(rng.exponential(means, size=(n, means.size))).astype(np.float32)


class SyntheticClicks:
    """A seeded synthetic click stream over tables of ``table_rows`` rows (see the module docstring).

    batch_size: samples per training batch; eval_samples: size of the held-out set.
    """

    def __init__(self, table_rows: Sequence[int], batch_size: int, eval_samples: int = 65536, *, seed: int = 0,
                 zipf_alpha: float = 1.05, planted_dim: int = 4, ctr: float = 0.25, dense_std: float = 0.5,
                 first_order_std: float = 2.0, interaction_std: float = 2.0, calibration_samples: int = 65536) -> None:
        for name, value in (("batch_size", batch_size), ("eval_samples", eval_samples), ("planted_dim", planted_dim),
                            ("calibration_samples", calibration_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}; must be an int >= 1")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: got {seed!r}; must be an int >= 0")
        rows = check_table_rows(table_rows)
        if not 0 < ctr < 1:
            raise ValueError(f"ctr: got {ctr}; must be in (0, 1)")
        for name, value in (("dense_std", dense_std), ("first_order_std", first_order_std),
                            ("interaction_std", interaction_std)):
            if not 0 <= value < math.inf:
                raise ValueError(f"{name}: got {value}; must be finite and >= 0")
        if not zipf_alpha > 0:
            raise ValueError(f"zipf_alpha: got {zipf_alpha}; must be > 0")
        self.table_rows = rows
        self.batch_size, self.eval_samples, self.seed = batch_size, eval_samples, seed
        t = len(self.table_rows)
        planted_seed, dense_seed, *table_seeds = np.random.SeedSequence(seed).spawn(2 + t)
        self._streams = [
            WorkloadStream(Workload(distribution="zipf", zipf_alpha=zipf_alpha, permute=True, batch_size=_ID_CHUNK,
                                    pooling_factor=1, seed=int(s.generate_state(1)[0] >> 1)), n)
            for s, n in zip(table_seeds, self.table_rows)]
        self._buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64) for _ in self._streams]
        self._rng = np.random.Generator(np.random.PCG64(dense_seed))
        self._dense_means = np.logspace(0, 3, NUM_DENSE)
        # the planted model: per-row values i.i.d., scaled so each part has (about) its std
        g = torch.Generator().manual_seed(int(planted_seed.generate_state(1)[0] >> 1))
        first_scale = first_order_std / math.sqrt(t)
        pairs = t * (t - 1) / 2
        vec_scale = (interaction_std ** 2 / (pairs * planted_dim)) ** 0.25 if pairs else 0.0
        first = [torch.randn(n, generator=g, dtype=torch.float64) * first_scale for n in self.table_rows]
        vecs = [torch.randn(n, planted_dim, generator=g, dtype=torch.float64) * vec_scale for n in self.table_rows]
        weight = torch.randn(NUM_DENSE, generator=g, dtype=torch.float64)
        weight *= dense_std / weight.norm()
        calib = self._draw(calibration_samples, label=False)
        mean = calib.dense.double().mean(0)
        std = calib.dense.double().std(0).clamp(min=1e-12)
        self.planted = PlantedModel(first, vecs, weight, mean, std)
        self.planted.bias = _bias_for_rate(self.planted(calib.dense, calib.sparse).double(), ctr)
        self.ctr = ctr
        self.eval_set = self._draw(eval_samples)

    def _ids(self, n: int) -> torch.Tensor:
        """The next n row ids of every table (B, T): each stream is drawn in chunks of _ID_CHUNK and
        consumed in order, so the ids do not depend on how the samples are batched."""
        cols = []
        for j, stream in enumerate(self._streams):
            buf = self._buffers[j]
            while buf.numel() < n:
                buf = torch.cat([buf, stream.next_batch().indices])
            cols.append(buf[:n])
            self._buffers[j] = buf[n:]
        return torch.stack(cols, dim=1)

    def _draw(self, n: int, label: bool = True) -> ClickBatch:
        dense = torch.from_numpy(_dense_features(self._rng, n, self._dense_means))
        sparse = self._ids(n)
        if not label:
            return ClickBatch(dense, sparse, torch.full((n,), math.nan))
        p = torch.sigmoid(self.planted(dense, sparse).double()).numpy()
        labels = torch.from_numpy((self._rng.random(n) < p).astype(np.float32))
        return ClickBatch(dense, sparse, labels)

    def next_batch(self) -> ClickBatch:
        """The next training batch (batch_size fresh samples)."""
        return self._draw(self.batch_size)

    def bayes_metrics(self) -> dict[str, float]:
        """The planted model's accuracy (%), BCE and AUC on the held-out set: the best any model can
        score on it in expectation. Also ``bayes_accuracy_expected``: mean of max(p, 1 - p) (%), the
        same ceiling without the labels' sampling noise."""
        e = self.eval_set
        logits = self.planted(e.dense, e.sparse)
        out = binary_metrics(logits, e.labels)
        p = torch.sigmoid(logits.double())
        out["accuracy_expected"] = float(torch.maximum(p, 1 - p).mean()) * 100
        return out


def _bias_for_rate(logits: torch.Tensor, rate: float) -> float:
    """b such that mean(sigmoid(logits + b)) = rate (bisection; the mean is increasing in b)."""
    lo, hi = -50.0, 50.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if float(torch.sigmoid(logits + mid).mean()) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class CriteoClicks:
    """Batches of a Criteo text file (``path``), mapped into tables of ``table_rows`` rows.

    The held-out set is ``eval_path``'s first ``eval_samples`` samples when given, else the first
    ``eval_samples`` samples of ``path`` (training then starts after them). Both files must be
    labelled (40 fields): an unlabelled one (39 fields, like Kaggle's ``test.txt``) is an error.

    Training reads the file once, then again from its start after the held-out part, as one stream
    of samples: every batch has ``batch_size`` samples (a batch may span the end of one pass and the
    start of the next).

    With ``mapping="dictionary"`` the held-out file shares the training file's dictionaries, so a
    row id means the same categorical value in training and evaluation: the training file is read
    once before the held-out one (numbering its values in order of first occurrence, the ids training
    then uses), and a held-out value the training file never has gets the next free row of its
    table (a row training never updates: it keeps its initial values, as in DLRM, whose dictionaries
    span all files); more distinct values than ``table_rows`` is an error, as for the training file.
    No planted model: ``planted`` is None.
    """

    planted = None

    def __init__(self, path: str | Path, table_rows: Sequence[int], batch_size: int, eval_samples: int = 65536,
                 eval_path: str | Path | None = None, mapping: str = "hash") -> None:
        if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 1:
            raise ValueError(f"eval_samples: got {eval_samples!r}; must be an int >= 1 (samples held out)")
        self.table_rows, self.batch_size = check_table_rows(table_rows, NUM_CAT_FEATURES), batch_size
        self._reader = CriteoReader(path, self.table_rows, batch_size, mapping, require_label=True)
        held_out_reader = self._reader
        if eval_path:
            # the training file first: checked (format, labels, not empty) before any work, and with
            # dictionary mapping its values numbered before the held-out file's
            empty = True
            for _ in self._reader:
                empty = False
                if mapping != "dictionary":
                    break
            if empty:
                raise ValueError(f"criteo: {path} has no samples")
            held_out_reader = CriteoReader(eval_path, self.table_rows, batch_size, mapping,
                                           dictionaries=self._reader.dictionaries, require_label=True)
        parts, n = [], 0
        for cb in held_out_reader:
            parts.append(cb)
            n += cb.labels.numel()
            if n >= eval_samples:
                break
        if not parts:
            raise ValueError(f"criteo: {eval_path or path} has no samples")
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])[:eval_samples]  # noqa: E731
        self.eval_set = ClickBatch(cat("dense"), cat("sparse"), cat("labels"))
        self._skip = 0 if eval_path else len(self.eval_set)
        self._iter = None

    def _passes(self):
        """The training samples in pieces, pass after pass over the file (held-out part skipped)."""
        while True:
            seen, empty = 0, True
            for cb in self._reader:
                empty = False
                start = max(0, self._skip - seen)
                seen += cb.labels.numel()
                if start < cb.labels.numel():
                    yield ClickBatch(cb.dense[start:], cb.sparse[start:], cb.labels[start:])
            if empty:
                raise ValueError(f"criteo: {self._reader.path} has no samples")
            if seen <= self._skip:
                raise ValueError(f"criteo: {self._reader.path} has {seen} samples and eval_samples={self._skip} holds "
                                 f"them all out: none left to train on (lower eval_samples or give a held-out file)")

    def _batches(self):
        """Full batches of ``batch_size`` samples; a pass's remainder is carried over into the next."""
        parts, n = [], 0
        for piece in self._passes():
            parts.append(piece)
            n += len(piece)
            while n >= self.batch_size:
                whole = ClickBatch(*(torch.cat([getattr(p, k) for p in parts]) for k in ("dense", "sparse", "labels")))
                b = self.batch_size
                yield ClickBatch(whole.dense[:b], whole.sparse[:b], whole.labels[:b])
                parts = [ClickBatch(whole.dense[b:], whole.sparse[b:], whole.labels[b:])]
                n -= b

    def next_batch(self) -> ClickBatch:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter)

    def bayes_metrics(self) -> None:
        return None
