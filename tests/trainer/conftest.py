"""Fixtures of every trainer test.

``one_torch_thread`` (autouse, per module): on the shared 2-core machine, torch's intra-op
threads spin against other processes — a tiny SDXL forward takes ~2 s with 2 threads under
load and ~0.1 s with one — so each module runs single-threaded (restored afterwards)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
