"""Fixtures shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that set torch's thread count (the native kernel's thread paths) leave it as found."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
