"""Analysis tests run tiny models on one thread: their operations are too small for a second thread to help,
and on a shared machine the synchronisation of two threads costs more than the work. The real-model tests
(`test_real_model.py`) keep torch's default."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    if request.module.__name__.endswith("test_real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
