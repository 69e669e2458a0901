import pytest
import torch

from ratiorl.policy import make_tiny_model
from tests.policy.helpers import perturb_, save_tiny_llama


def make_eos_model(seed=0, c=3.0):
    """Tiny GPT-2 whose EOS probability is ~0.15 per step, so that rows end at varied lengths."""
    model, tok = make_tiny_model(n_embd=32, n_head=2, n_layer=2, n_positions=128, seed=seed)
    perturb_(model, seed=seed)
    with torch.no_grad():
        e = model.transformer.wte.weight[tok.eos_token_id]
        model.transformer.ln_f.bias.copy_(c * e / e.norm() ** 2)  # adds ~c to the EOS logit
    return model, tok


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eos_gpt2")
    model, tok = make_eos_model()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_rollout")
    save_tiny_llama(path, seed=1)
    return str(path)
