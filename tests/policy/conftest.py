import pytest

from .helpers import save_tiny, save_tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    save_tiny(path)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(path)
    return str(path)
