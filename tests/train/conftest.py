"""Fixtures of the trainer tests: one intra-op thread, and the tiny synthetic dataset they
train on (helpers.py holds the model and training configuration)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (``pytestmark`` names it with
    ``pytest.mark.usefixtures``): as fast on these tiny tensors, and immune to the 10-40x slowdown
    measured when two OpenMP threads compete with other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
