"""Zoo tests run single-threaded (the CI machine has 2 cores shared by every test)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
