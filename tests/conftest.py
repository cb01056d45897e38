"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tests made of many tiny ops.

    On a 2-core machine shared with other work, OpenMP's spin-waiting second thread made such
    tests up to 15x slower; the previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
