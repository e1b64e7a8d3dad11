"""Fixtures for the attention tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run each test on one thread: the tiny models are too small to gain from more, and with other jobs
    on the 2-core machine a 2-thread forward was measured up to 40x slower (threads wait on each other)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
