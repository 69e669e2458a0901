"""Fixtures shared by several test folders."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer, 32-wide GPT-2 with the char tokenizer (random init), saved once per session."""
    from ratiorl.policy import make_tiny_model

    d = tmp_path_factory.mktemp("tiny_model")
    make_tiny_model(str(d), n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=0)
    return str(d)
