"""Fixtures of the trainer tests: one intra-op thread, and the tiny synthetic dataset they
train on (helpers.py holds the model and training configuration)."""
from __future__ import annotations

import pytest
import torch

from maskrcnn.data import generate_shapes


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (``pytestmark`` names it with
    ``pytest.mark.usefixtures``): as fast on these tiny tensors, and immune to the 10-40x slowdown
    measured when two OpenMP threads compete with other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 training and 2 validation images of 64..96 px with 1-2 large shapes each (read only:
    a test that breaks a split works on a copy)."""
    root = tmp_path_factory.mktemp("shapes")
    return generate_shapes(root, num_train=6, num_val=2, image_size=(64, 96), objects_per_image=(1, 2),
                           object_size=(24, 40), seed=0)
