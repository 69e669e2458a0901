import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The lab's many small tensor ops run fastest on one intra-op thread (and so does
    ``run_lab``); restore the setting for the rest of the suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
