"""The computed (untimed) experiments: paper Table 2, Figure 5 and Figure 3.

Each function takes the bench config and the experiment's name and returns tidy rows, one per
(point, metric), in the columns every timed result has (``metric, unit, median, q1, q3, iqr, n,
note`` + the environment): a computed value is exact, so ``q1 = q3 = median``, ``iqr = 0``, ``n = 1``.

- :func:`tt_shapes_rows` (Table 2): suggested TT shapes, parameters and memory reduction of Kaggle's
  7 largest tables at each rank of ``analysis.ranks``.
- :func:`model_size_rows` (Figure 5): embedding bytes of a whole dataset with its ``k`` largest tables
  in TT format (rank ``tt.rank``) and the rest uncompressed fp32, for each ``k`` of ``analysis.tt_tables``.
- :func:`init_distribution_rows` (Figure 3): entries of rows reconstructed from freshly initialized
  cores, per scheme of ``analysis.inits``, against the target N(0, 1/(3N)): density, KS distance,
  std ratio, excess kurtosis.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import ttrec
from ttrec.datasets import DATASETS, KAGGLE
from ttrec.shapes import BYTES_PER_FP32

from .config import BenchConfig
from .environment import capture

__all__ = ["TABLE2_TABLES", "DENSITY_RANGE", "tt_shapes_rows", "model_size_rows", "init_distribution_rows",
           "ks_distance_normal"]

TABLE2_TABLES = 7           # Table 2 lists Kaggle's 7 largest tables
DENSITY_RANGE = (-5.0, 5.0)  # density bins span +-5 target stds
_ERF = np.frompyfunc(math.erf, 1, 1)


def _measurement(value: float, metric: str, unit: str, note: str | None = None) -> dict:
    return {"metric": metric, "unit": unit, "median": value, "q1": value, "q3": value, "iqr": 0.0, "n": 1,
            "note": note}


def _rows(experiment: str, point: dict, metrics: list[dict], env: dict) -> list[dict]:
    return [{"experiment": experiment, **point, **m, **env} for m in metrics]


def _joined(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _core_shapes(spec: ttrec.TTSpec) -> str:
    """'(1,200,2,32) (32,220,2,32) (32,250,4,1)'."""
    return " ".join("(" + ",".join(map(str, s)) + ")" for s in spec.core_shapes)


# ---- Table 2 ----

def tt_shapes_rows(cfg: BenchConfig, experiment: str = "table2") -> list[dict]:
    """Kaggle's 7 largest tables x ``analysis.ranks``: suggested shapes (``tt.d`` cores), TT parameters
    (unit parameters) and memory reduction (unit x: dense parameters / TT parameters)."""
    env = capture()
    rows: list[dict] = []
    for position, feature in enumerate(KAGGLE.largest(TABLE2_TABLES), start=1):
        n = KAGGLE.table_rows[feature]
        for rank in cfg.analysis.ranks:
            spec = ttrec.TTSpec.suggest(n, KAGGLE.embedding_dim, rank, d=cfg.tt.d)
            point = {"dataset": KAGGLE.name, "table_position": position, "feature": feature, "num_embeddings": n,
                     "embedding_dim": KAGGLE.embedding_dim, "tt_rank": rank, "tt_d": spec.d,
                     "tt_p_shapes": _joined(spec.tt_p_shapes), "tt_q_shapes": _joined(spec.tt_q_shapes),
                     "core_shapes": _core_shapes(spec)}
            rows += _rows(experiment, point, [_measurement(spec.param_count, "tt_params", "parameters"),
                                              _measurement(spec.compression_ratio, "memory_reduction", "x")], env)
    return rows


# ---- Figure 5 ----

def model_size_rows(cfg: BenchConfig, experiment: str = "fig5") -> list[dict]:
    """Per dataset of ``analysis.datasets`` and k of ``analysis.tt_tables``: bytes of all embedding
    tables with the k largest in TT format (suggested shapes, rank ``tt.rank``) and the rest fp32.

    Metrics: ``model_bytes``, ``tt_bytes`` (the k TT tables), ``uncompressed_bytes`` (the rest), unit
    bytes; ``reduction`` (unit x): all tables uncompressed / model_bytes.
    """
    env = capture()
    rank = cfg.tt.rank
    rows: list[dict] = []
    for name in cfg.analysis.datasets:
        data = DATASETS[name]
        for k in cfg.analysis.tt_tables:
            in_tt = set(data.largest(k))
            tt_bytes = sum(ttrec.TTSpec.suggest(data.table_rows[i], data.embedding_dim, rank, d=cfg.tt.d).param_bytes
                           for i in in_tt)
            dense_rows = sum(n for i, n in enumerate(data.table_rows) if i not in in_tt)
            uncompressed = dense_rows * data.embedding_dim * BYTES_PER_FP32
            model = tt_bytes + uncompressed
            point = {"dataset": name, "tt_tables": k, "tt_rank": rank, "tt_d": cfg.tt.d,
                     "embedding_dim": data.embedding_dim, "num_tables": len(data.table_rows)}
            rows += _rows(experiment, point, [_measurement(model, "model_bytes", "bytes"),
                                              _measurement(tt_bytes, "tt_bytes", "bytes"),
                                              _measurement(uncompressed, "uncompressed_bytes", "bytes"),
                                              _measurement(data.dense_bytes / model, "reduction", "x")], env)
    return rows


# ---- Figure 3 ----

def ks_distance_normal(x: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic sup |F_n(x) - Phi(x)| of the sample ``x`` against N(0, 1)."""
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = x.size
    if n == 0:
        raise ValueError("x: got an empty sample; the KS distance needs at least one value")
    cdf = 0.5 * (1.0 + _ERF(x / math.sqrt(2.0)).astype(np.float64))
    above = np.arange(1, n + 1) / n - cdf   # F_n just after each point
    below = cdf - np.arange(0, n) / n       # F_n just before it
    return float(max(above.max(), below.max()))


def _sample_entries(cfg: BenchConfig, spec: ttrec.TTSpec, scheme: str) -> np.ndarray:
    """``analysis.samples`` entries of randomly chosen reconstructed rows (seeded by ``seed``)."""
    # one stream per scheme: reproducible alone, and independent of the other schemes' draws (with one
    # shared seed, normal and calibrated would be the same draw up to a scale)
    gen = torch.Generator().manual_seed(cfg.seed * len(ttrec.INIT_SCHEMES) + ttrec.INIT_SCHEMES.index(scheme))
    cores = [c.double() for c in ttrec.init_tt_cores(spec, scheme, generator=gen)]
    samples = cfg.analysis.samples
    n_rows = -(-samples // spec.embedding_dim)
    idx = torch.randint(spec.num_embeddings, (n_rows,), generator=gen)
    with torch.no_grad():
        values = ttrec.tt_rows(cores, spec, idx).flatten()[:samples]
    return values.numpy()


def init_distribution_rows(cfg: BenchConfig, experiment: str = "fig3") -> list[dict]:
    """Per init scheme of ``analysis.inits``: cores of a (table.num_embeddings x table.embedding_dim)
    table at rank ``tt.rank`` (``tt.p_shapes``/``q_shapes``, else suggested), ``analysis.samples`` reconstructed entries, in units
    of the target std sqrt(1/(3N)).

    Metrics: ``density`` (unit 1/std, one row per bin over [-5, 5] with column ``x`` = bin centre,
    ``analysis.bins`` bins), ``density_own_std`` (the same with x in units of the sample's own std:
    the shape alone), ``outside_fraction`` (share of entries beyond +-5 std, not in any bin),
    ``ks_distance`` (against N(0, 1), unit -), ``std_ratio`` (sample std / target std),
    ``expected_std_ratio`` (closed form, ttrec.expected_row_std), ``excess_kurtosis`` (0 for a normal).
    """
    t, a = cfg.table, cfg.analysis
    if cfg.tt.p_shapes is not None or cfg.tt.q_shapes is not None:  # the config's shapes, the rest suggested
        p, q = ttrec.suggest_tt_shapes(t.num_embeddings, t.embedding_dim, cfg.tt.d)
        spec = ttrec.TTSpec(t.num_embeddings, t.embedding_dim, tuple(cfg.tt.p_shapes or p),
                            tuple(cfg.tt.q_shapes or q), (cfg.tt.rank,) * (cfg.tt.d - 1))
    else:
        spec = ttrec.TTSpec.suggest(t.num_embeddings, t.embedding_dim, cfg.tt.rank, d=cfg.tt.d)
    target = ttrec.target_row_std(t.num_embeddings)
    edges = np.linspace(*DENSITY_RANGE, a.bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    env = capture()
    rows: list[dict] = []
    for init in a.inits:
        scheme = getattr(init, "value", init)
        if scheme not in ttrec.INIT_SCHEMES:
            raise ValueError(f"analysis.inits: got {scheme!r}; allowed: {list(ttrec.INIT_SCHEMES)}")
        x = _sample_entries(cfg, spec, scheme) / target
        centred = x - x.mean()
        var = float(np.mean(centred**2))
        density = np.histogram(x, bins=edges)[0] / (x.size * width)
        # the shape alone: the same entries in units of their own std (Figure 3 compares shapes)
        shape = np.histogram(centred / math.sqrt(var), bins=edges)[0] / (x.size * width) if var > 0 else 0 * centres
        point = {"init": scheme, "num_embeddings": t.num_embeddings, "embedding_dim": t.embedding_dim,
                 "tt_rank": cfg.tt.rank, "tt_d": spec.d, "tt_p_shapes": _joined(spec.tt_p_shapes),
                 "tt_q_shapes": _joined(spec.tt_q_shapes), "samples": int(x.size), "target_std": target,
                 "seed": cfg.seed}
        metrics = [
            _measurement(float(np.mean(np.abs(x) > DENSITY_RANGE[1])), "outside_fraction", "fraction",
                         f"entries beyond +-{DENSITY_RANGE[1]:g} target stds, in no density bin"),
            _measurement(ks_distance_normal(x), "ks_distance", "-", "sup |F_sample - Phi| in units of sqrt(1/(3N))"),
            _measurement(math.sqrt(var), "std_ratio", "-"),
            _measurement(ttrec.expected_row_std(spec, scheme) / target, "expected_std_ratio", "-",
                         "closed form: sqrt(prod R) * (core std)^d / target std"),
            _measurement(float(np.mean(centred**4)) / var**2 - 3.0 if var > 0 else math.nan, "excess_kurtosis", "-"),
        ]
        rows += _rows(experiment, {**point, "x": None}, metrics, env)
        for metric, values, note in (("density", density, None),
                                     ("density_own_std", shape, "x in units of the sample's own std")):
            rows += [{"experiment": experiment, **point, "x": float(c), **_measurement(float(v), metric, "1/std", note),
                      **env} for c, v in zip(centres, values)]
    return rows
