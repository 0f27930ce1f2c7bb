"""Review tests: the baselines' constructor checks and nn.EmbeddingBag semantics, TTSpec.suggest's
rank argument, and the rank/rows sweep figures plotting each series' own data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reports import figures, paper_figures
from ttrec import TTEmbeddingBag, TTSpec
from ttrec.baselines import DenseEmbeddingBag, T3nsorEmbeddingBag, TltorchEmbeddingBag, tltorch_unavailable_reason

N, P, Q, R = 57, (3, 4, 5), (2, 2, 2), 3
D = math.prod(Q)


# ---- T3nsorEmbeddingBag: no fused update, no native backend ----

@pytest.mark.parametrize("kwargs,needle", [({"optimizer": "sgd"}, "optimizer: got 'sgd'"),
                                           ({"backend": "cpu"}, "backend: got 'cpu'"),
                                           ({"backend": "cuda"}, "backend: got 'cuda'")])
def test_t3nsor_refuses_settings_it_would_ignore(kwargs, needle):
    with pytest.raises(ValueError, match=rf"^{needle}; .*allowed"):
        T3nsorEmbeddingBag(N, D, R, P, Q, **kwargs)


def test_t3nsor_runs_on_torch_whatever_auto_would_pick():
    """'auto' is accepted and means torch: it reports 'torch' (not the native kernel 'auto' resolves
    to for TTEmbeddingBag's float32 cores), and its output is the dense table's rows."""
    assert T3nsorEmbeddingBag(N, D, R, P, Q, backend="auto").resolved_backend() == "torch"
    m = T3nsorEmbeddingBag(N, D, R, P, Q, backend="auto", dtype=torch.float64, seed=0)
    assert m.resolved_backend() == "torch"
    idx = torch.tensor([0, 5, N - 1])
    out = m(idx, torch.tensor([0, 1]))
    full = m.full_weight()
    torch.testing.assert_close(out, torch.stack([full[0], full[5] + full[N - 1]]))


# ---- DenseEmbeddingBag: the sizes are checked as TTEmbeddingBag checks them ----

@pytest.mark.parametrize("args,name", [((0, D), "num_embeddings"), ((-3, D), "num_embeddings"),
                                       ((N, 0), "embedding_dim"), ((N, -1), "embedding_dim"),
                                       ((5.0, D), "num_embeddings"), ((True, D), "num_embeddings")])
def test_dense_refuses_bad_sizes_like_tt(args, name):
    for cls in (DenseEmbeddingBag, lambda n, d: TTEmbeddingBag(n, d, R)):
        with pytest.raises(ValueError, match=rf"^{name}: got .*; must be an int >= 1"):
            cls(*args)


def test_dense_accepts_numpy_sizes():
    m = DenseEmbeddingBag(np.int64(N), np.int64(D), seed=0)
    assert m.weight.shape == (N, D) and float(m.weight.detach().abs().max()) <= N ** -0.5


# ---- every baseline: nn.EmbeddingBag's semantics against a loop over the dense table ----

def _baselines():
    yield "t3nsor", lambda **kw: T3nsorEmbeddingBag(N, D, R, P, Q, seed=2, **kw)
    yield "dense", lambda **kw: DenseEmbeddingBag(N, D, seed=2, **kw)
    if tltorch_unavailable_reason() is None:
        yield "tltorch", lambda **kw: TltorchEmbeddingBag(N, D, R, P, Q, seed=2, **kw)


def _table(name, m) -> torch.Tensor:
    if name == "dense":
        return m.weight.detach().double()
    if name == "t3nsor":
        return m.full_weight().double()
    return TTEmbeddingBag(N, D, R, P, Q, seed=2, backend="torch").full_weight().double()  # tltorch's cores


@pytest.mark.parametrize("name,make", list(_baselines()), ids=[n for n, _ in _baselines()])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_baselines_pool_like_a_loop_over_the_table(name, make, mode, weighted, include_last_offset, index_dtype):
    m = make(mode=mode, include_last_offset=include_last_offset)
    table = _table(name, m)
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, N, (20,), generator=gen, dtype=index_dtype)
    starts = [0, 0, 3, 3, 10, 20]  # empty bags first, in the middle and (without include_last_offset) last
    w = torch.randn(20, generator=gen, requires_grad=True) if weighted else None
    out = m(idx, torch.tensor(starts, dtype=index_dtype), w)
    ends = starts if include_last_offset else starts + [20]
    expected = []
    for s, e in zip(ends[:-1], ends[1:]):
        rows = table[idx[s:e].long()] * (1.0 if w is None else w.detach().double()[s:e, None])
        bag = rows.sum(0) if e > s else torch.zeros(D, dtype=torch.float64)
        expected.append(bag / (e - s) if mode == "mean" and e > s else bag)
    torch.testing.assert_close(out.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)
    if weighted:  # d out_b / d w_i = row_i . grad_b
        grad = torch.randn(out.shape, generator=gen)
        out.backward(grad)
        bag_of = torch.repeat_interleave(torch.arange(len(ends) - 1), torch.tensor(np.diff(ends)))
        torch.testing.assert_close(w.grad.double(), (table[idx.long()] * grad.double()[bag_of]).sum(1),
                                   rtol=1e-5, atol=1e-6)


# ---- TTSpec.suggest: the rank's type ----

@pytest.mark.parametrize("bad", [None, 8.0, np.int64(8), True, "8"])
def test_suggest_names_a_bad_rank(bad):
    with pytest.raises(TypeError, match=r"^tt_rank: got .*; allowed: an int, or a tuple of d - 1 ints"):
        TTSpec.suggest(1000, 16, bad)


def test_suggest_takes_one_rank_or_one_per_bond():
    assert TTSpec.suggest(1000, 16, 8, d=4).tt_ranks == (8, 8, 8)
    assert TTSpec.suggest(1000, 16, [4, 8]).tt_ranks == (4, 8)


# ---- figures: a series is one config, never the median of several ----

@pytest.fixture
def drawn(monkeypatch):
    kept = {}

    def keep(fig, out_dir, name):
        kept[name] = fig
        return Path(out_dir) / f"{name}.png"

    monkeypatch.setattr(figures, "save", keep)
    monkeypatch.setattr(paper_figures, "save", keep)
    yield kept
    for fig in kept.values():
        figures.plt.close(fig)


def _row(impl, rank, value, **point):
    return {"impl": impl, "backend": "cpu" if impl == "tt" else ("torch" if impl == "t3nsor" else "aten"),
            "tt_rank": rank, "metric": "time_per_lookup", "unit": "ns", "median": value, "q1": value * 0.9,
            "q3": value * 1.1, "mode": "train", "table": "t", "embedding_dim": 16, "threads": 2, "cpu_model": "Test CPU",
            "pooling_factor": 1, "batch_size": 4096, "num_embeddings": 1000, **point}


def _plotted(ax) -> dict[str, list[float]]:
    """{label: y values} of the panel's data lines (error-bar and hline artists, by their label)."""
    out = {}
    for container in ax.containers:
        out[container.get_label()] = [float(v) for v in container.lines[0].get_ydata()]
    for line in ax.get_lines():
        if not line.get_label().startswith("_"):
            out.setdefault(line.get_label(), [float(v) for v in line.get_ydata()])
    return out


def test_rank_sweep_draws_each_batch_size_as_its_own_series(drawn, tmp_path):
    ranks = (8, 16, 32)
    rows = [_row("tt", r, 100.0 * r * (1 if b == 4096 else 3), batch_size=b) for b in (1024, 4096) for r in ranks]
    rows += [_row("dense", None, v, batch_size=b) for b, v in ((1024, 500.0), (4096, 200.0))]
    figures.plot_rank_sweep(pd.DataFrame(rows), tmp_path, name="sweep", mode="train")
    lines = _plotted(drawn["sweep"].axes[0])
    assert lines == {"TT-EmbeddingBag (cpu), batch_size 1024": [300.0 * r for r in ranks],
                     "TT-EmbeddingBag (cpu), batch_size 4096": [100.0 * r for r in ranks],
                     "nn.EmbeddingBag, batch_size 1024": [500.0, 500.0],
                     "nn.EmbeddingBag, batch_size 4096": [200.0, 200.0]}
    legend = [t.get_text() for t in drawn["sweep"].legends[0].get_texts()]
    assert sorted(legend) == sorted(lines)


def test_rank_sweep_legend_has_a_series_missing_from_the_first_panel(drawn, tmp_path):
    rows = [_row("tt", r, 100.0, pooling_factor=p) for p in (1, 10) for r in (8, 16)]
    rows.append(_row("dense", None, 50.0, pooling_factor=10))
    figures.plot_rank_sweep(pd.DataFrame(rows), tmp_path, name="sweep", mode="train")
    legend = [t.get_text() for t in drawn["sweep"].legends[0].get_texts()]
    assert sorted(legend) == ["TT-EmbeddingBag (cpu)", "nn.EmbeddingBag"]


def test_rows_sweep_draws_each_rank_as_its_own_series(drawn, tmp_path):
    sizes = (1_000, 10_000, 100_000)
    rows = [_row(impl, r, scale * r * n / 1000, num_embeddings=n, param_bytes=4 * r * n)
            for impl, scale in (("tt", 1.0), ("t3nsor", 10.0)) for r in (32, 64) for n in sizes]
    rows += [_row("dense", None, 20.0, num_embeddings=n, param_bytes=64 * n) for n in sizes]
    paper_figures.plot_rows_sweep(pd.DataFrame(rows), tmp_path, name="rows")
    lines = _plotted(drawn["rows"].axes[0])
    expected = {f"{label}, tt_rank {r}": [scale * r * n / 1000 for n in sizes]
                for label, scale in (("TT-EmbeddingBag (cpu)", 1.0), ("T3nsor-style (decompress)", 10.0))
                for r in (32, 64)}
    expected["nn.EmbeddingBag"] = [20.0] * len(sizes)
    assert lines == expected
