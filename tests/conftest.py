"""Fixtures shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that set torch's thread count (the native kernel's thread paths) leave it as found."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def threads_at_any_size(monkeypatch):
    """Native calls take every thread torch allows however few the lookups, so that the tests of
    results across thread counts run the threaded paths on small batches (in use,
    ttrec.cpu.ops.MIN_LOOKUPS_PER_THREAD keeps small batches on one thread)."""
    from ttrec.cpu import ops

    monkeypatch.setattr(ops, "MIN_LOOKUPS_PER_THREAD", 1)


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report's plot functions would save (reports.figures, paper_figures,
    cache_figures, training_figures), kept open and drawn instead: {name: figure}."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from reports import cache_figures, figures, paper_figures, training_figures

    kept = {}

    def keep(fig, out_dir, name):
        fig.canvas.draw()
        kept[name] = fig
        return Path(out_dir) / f"{name}.png"

    for module in (figures, paper_figures, cache_figures, training_figures):
        monkeypatch.setattr(module, "save", keep)
    yield kept
    for fig in kept.values():
        plt.close(fig)
