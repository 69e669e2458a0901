"""Performance paths of the policy must not change values or gradients.

- ``share_prompts``: the G completions of one prompt run the prompt through the transformer once.
- ``fuse_activations``: GPT-2's Python tanh-GELU is swapped for PyTorch's one-kernel version.
"""

import pytest
import torch

from ratiorl.policy import Policy, make_tiny_model
from ratiorl.rollout import HFRolloutEngine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_shared")
    make_tiny_model(d, n_layer=2, n_embd=32, n_head=2)
    return str(d)


def _stats_and_grad(policy, b, share):
    policy.share_prompts = share
    policy.model.zero_grad(set_to_none=True)
    st = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask,
                                 with_entropy=True, with_kl=True, with_ref_logp=True)
    w = torch.linspace(0.5, 1.5, st.logp.numel()).view_as(st.logp)
    ((st.logp * w).sum() + 0.3 * st.entropy.sum() + st.token_kl.sum()).backward()
    grads = [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]
    return st, grads


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}])
def test_shared_prompt_pass_matches_full_forward(model_dir, lora):
    torch.manual_seed(0)
    policy = Policy.from_pretrained(model_dir, lora=lora, reference="auto")
    engine = HFRolloutEngine(policy, policy.tokenizer)
    # prompts of different lengths (left padding differs between groups)
    b = engine.generate(["1+2=", "13+45=", "7+7=", "99+100="], 3, max_new_tokens=5,
                        generator=torch.Generator().manual_seed(0))
    st0, g0 = _stats_and_grad(policy, b, share=False)
    st1, g1 = _stats_and_grad(policy, b, share=True)
    for name in ("logp", "entropy", "token_kl", "ref_logp"):
        torch.testing.assert_close(getattr(st1, name), getattr(st0, name), rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1)
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_shared_prompt_pass_single_token_and_unique_prompts(model_dir):
    policy = Policy.from_pretrained(model_dir, reference="none")
    engine = HFRolloutEngine(policy, policy.tokenizer)
    for G, T in ((4, 1), (1, 4)):  # one completion token; no repeated prompt (sharing is skipped)
        b = engine.generate(["1+2=", "13+45="], G, max_new_tokens=T, generator=torch.Generator().manual_seed(1))
        policy.share_prompts = False
        ref = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask).logp
        policy.share_prompts = True
        got = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask).logp
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_sampler_logp_matches_policy_with_shared_prefill(model_dir):
    policy = Policy.from_pretrained(model_dir, reference="none")
    engine = HFRolloutEngine(policy, policy.tokenizer)
    b = engine.generate(["5+5=", "123+4=", "8+80="], 4, max_new_tokens=6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(b.prompt_ids[0], b.prompt_ids[3]) and b.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with torch.no_grad():
        lp = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask).logp
    torch.testing.assert_close(b.old_logp, lp, rtol=1e-4, atol=1e-5)


def test_fused_gelu_is_the_same_function(model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    policy = Policy.from_pretrained(model_dir, reference="none")
    assert not any(type(m) is NewGELUActivation for m in policy.model.modules())
    assert any(type(m) is GELUTanh for m in policy.model.modules())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(policy.model(ids).logits, plain.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    kept = Policy.from_pretrained(model_dir, reference="none", fuse_activations=False)
    assert any(type(m) is NewGELUActivation for m in kept.model.modules())


def test_shared_prompt_pass_is_taken_not_a_silent_fallback(model_dir):
    from ratiorl.policy.forward import completion_hidden, completion_hidden_shared, prompt_groups

    policy = Policy.from_pretrained(model_dir, reference="none")
    engine = HFRolloutEngine(policy, policy.tokenizer)
    b = engine.generate(["1+2=", "13+45="], 3, max_new_tokens=4, generator=torch.Generator().manual_seed(2))
    pm, cm = b.prompt_mask.long(), b.completion_mask.long()
    pids, cids = b.prompt_ids.masked_fill(pm == 0, 0), b.completion_ids.masked_fill(cm == 0, 0)
    groups = prompt_groups(pids, pm)
    assert groups is not None and groups[0].tolist() == [0, 3] and groups[1].tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        shared = completion_hidden_shared(policy.hf_model, pids, pm, cids, cm, groups)
        full = completion_hidden(policy.hf_model, pids, pm, cids, cm, None)
    assert shared is not None  # the tiny GPT-2's cache can be shared: this path really runs
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
