"""HFRolloutEngine: layout, EOS handling, log-probs vs Policy, reproducibility, top-p, sync."""

import copy

import pytest
import torch

from ratiorl.policy import Policy
from ratiorl.rollout import HFRolloutEngine, Rollout, RolloutEngine

PROMPTS = ["12+34=", "7+5=", "a much longer prompt: 99+1=", "x"]


def engine_for(path, **kw):
    policy = Policy.from_pretrained(path, reference="none", **kw)
    return policy, HFRolloutEngine(policy.model, policy.tokenizer)


def test_layout_masks_and_eos(eos_model_dir):
    policy, eng = engine_for(eos_model_dir)
    assert isinstance(eng, RolloutEngine)
    G, max_new = 6, 8
    b = eng.generate(PROMPTS, G, max_new_tokens=max_new, generator=torch.Generator().manual_seed(0))
    assert isinstance(b, Rollout)
    B = len(PROMPTS) * G
    assert len(b) == B and b.prompt_ids.shape[0] == B and b.completion_ids.shape[0] == B
    assert b.completion_ids.shape[1] <= max_new
    assert b.behaviour_logp.dtype == torch.float32 and b.behaviour_logp.shape == b.completion_ids.shape
    assert torch.equal(b.group_ids, torch.arange(len(PROMPTS)).repeat_interleave(G))
    assert torch.equal(b.behaviour_logp, b.old_logp)  # the sampler is pi_old by default
    tok = eng.tokenizer
    eos = tok.eos_token_id
    for i in range(B):
        p = PROMPTS[i // G]
        ids = b.prompt_ids[i][b.prompt_mask[i].bool()].tolist()
        assert tok.decode(ids) == p  # left-padded prompt, real tokens at the end
        assert b.prompt_mask[i, -1] == 1
        m = b.completion_mask[i]
        n = int(m.sum())
        assert n >= 1 and m[:n].all() and not m[n:].any()  # right padding: a prefix of ones
        toks = b.completion_ids[i, :n].tolist()
        assert eos not in toks[:-1]  # generation stops at the first EOS
        assert bool(b.truncated[i]) == (toks[-1] != eos)
        if b.truncated[i]:
            assert n == max_new
        assert (b.behaviour_logp[i, n:] == 0).all() and (b.behaviour_logp[i, :n] < 0).all()
        assert (b.completion_ids[i, n:] == tok.pad_token_id).all()
        body = toks[:-1] if toks[-1] == eos else toks
        assert b.completion_texts[i] == tok.decode(body, skip_special_tokens=True)
        assert "<eos>" not in b.completion_texts[i] and "<pad>" not in b.completion_texts[i]
    lengths = b.completion_mask.sum(1)
    assert b.truncated.any() and (~b.truncated).any() and len(set(lengths.tolist())) > 2  # not vacuous


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_old_logp_matches_policy(eos_model_dir, temperature, top_p):
    policy, eng = engine_for(eos_model_dir, temperature=temperature)
    b = eng.generate(PROMPTS, 4, max_new_tokens=10, temperature=temperature, top_p=top_p,
                     generator=torch.Generator().manual_seed(int(temperature * 10)))
    s = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    torch.testing.assert_close(s.logp.detach(), b.behaviour_logp, rtol=1e-4, atol=1e-4)


def test_sampling_through_a_lora_model(eos_model_dir):
    """The sampler may be the PEFT-wrapped policy itself (adapters active while sampling)."""
    policy = Policy.from_pretrained(eos_model_dir, lora={"r": 4, "fan_in_fan_out": True}, temperature=0.8)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    eng = HFRolloutEngine(policy, policy.tokenizer)  # a Policy is accepted too
    assert eng.model is policy.model
    b = eng.generate(PROMPTS, 3, max_new_tokens=8, temperature=0.8, generator=torch.Generator().manual_seed(3))
    s = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, with_ref_logp=True)
    torch.testing.assert_close(s.logp.detach(), b.behaviour_logp, rtol=1e-4, atol=1e-4)
    assert (s.ref_logp - b.behaviour_logp).abs().max() > 1e-3  # the adapters were active while sampling


def test_llama_style_model(llama_dir):
    policy, eng = engine_for(llama_dir, temperature=0.9)
    b = eng.generate(PROMPTS, 3, max_new_tokens=7, temperature=0.9, generator=torch.Generator().manual_seed(1))
    assert b.completion_ids.shape[0] == 12
    s = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    torch.testing.assert_close(s.logp.detach(), b.behaviour_logp, rtol=1e-4, atol=1e-4)


def test_reproducible_with_generator(eos_model_dir):
    _, eng = engine_for(eos_model_dir)
    run = lambda seed: eng.generate(PROMPTS, 4, max_new_tokens=12, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.behaviour_logp, b.behaviour_logp)
    assert a.completion_texts == b.completion_texts
    assert not (a.completion_ids.shape == c.completion_ids.shape and torch.equal(a.completion_ids, c.completion_ids))


def test_top_p(eos_model_dir):
    _, eng = engine_for(eos_model_dir)
    gen = lambda **kw: eng.generate(PROMPTS, 8, max_new_tokens=6, generator=torch.Generator().manual_seed(3), **kw)
    greedy = eng.generate(PROMPTS, 1, max_new_tokens=6, temperature=0.0)
    tiny_p = gen(top_p=1e-6)
    # a vanishing nucleus keeps only the most likely token: every sample is the greedy one
    assert torch.equal(tiny_p.completion_ids, greedy.completion_ids.repeat_interleave(8, 0))
    # the logged log-prob is still that of the full softmax (not 0 = log of a renormalised 1)
    torch.testing.assert_close(tiny_p.behaviour_logp, greedy.behaviour_logp.repeat_interleave(8, 0))
    assert (tiny_p.behaviour_logp[tiny_p.completion_mask.bool()] < -1e-3).any()
    full = gen(top_p=1.0)
    assert len(set(full.completion_texts)) > len(PROMPTS)  # top_p = 1 samples diverse completions
    # with a moderate nucleus, every sampled token lies inside the top-p set of its state
    mid = gen(top_p=0.5)
    policy = Policy.from_pretrained(eng.model.name_or_path, reference="none")
    from tests.policy.helpers import full_logits

    with torch.no_grad():
        probs = full_logits(policy.model, mid.prompt_ids, mid.prompt_mask, mid.completion_ids,
                            mid.completion_mask).softmax(-1)
    p_tok = probs.gather(-1, mid.completion_ids[..., None]).squeeze(-1)
    mass_above = (probs * (probs > p_tok[..., None])).sum(-1)  # mass of strictly more likely tokens
    assert (mass_above[mid.completion_mask.bool()] < 0.5 + 1e-5).all()


def test_prompts_of_different_lengths_do_not_interact(eos_model_dir):
    """Greedy completions of a prompt are the same alone or batched with longer prompts."""
    _, eng = engine_for(eos_model_dir)
    batched = eng.generate(PROMPTS, 2, max_new_tokens=6, temperature=0.0)
    for k, p in enumerate(PROMPTS):
        alone = eng.generate([p], 1, max_new_tokens=6, temperature=0.0)
        n = alone.completion_ids.shape[1]
        row = 2 * k
        assert batched.completion_ids[row, :n].tolist() == alone.completion_ids[0].tolist()
        assert batched.completion_texts[row] == alone.completion_texts[0]
        torch.testing.assert_close(batched.behaviour_logp[row, :n], alone.behaviour_logp[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True}])
def test_load_weights(eos_model_dir, lora):
    from transformers import AutoModelForCausalLM

    policy = Policy.from_pretrained(eos_model_dir, lora=lora, reference="none")
    sampler_model = AutoModelForCausalLM.from_pretrained(eos_model_dir)
    eng = HFRolloutEngine(sampler_model, policy.tokenizer)
    with torch.no_grad():  # the policy moves away from the sampler
        g = torch.Generator().manual_seed(4)
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    b = eng.generate(PROMPTS, 2, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    stale = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask).logp
    assert (stale.detach() - b.behaviour_logp).abs().max() > 1e-3
    eng.load_weights(policy.model)
    b = eng.generate(PROMPTS, 2, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    fresh = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask).logp
    torch.testing.assert_close(fresh.detach(), b.behaviour_logp, rtol=1e-4, atol=1e-4)
    # sharing the policy's own model: load_weights is a no-op and the sampler is always current
    shared = HFRolloutEngine(policy.model, policy.tokenizer)
    before = copy.deepcopy(policy.model.state_dict())
    shared.load_weights(policy.model)
    shared.load_weights(policy)
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_errors(eos_model_dir):
    _, eng = engine_for(eos_model_dir)
    with pytest.raises(ValueError, match="num_generations"):
        eng.generate(PROMPTS, 0)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate(PROMPTS, 1, top_p=0.0)
    with pytest.raises(ValueError, match="list"):
        eng.generate("12+3=", 1)
    with pytest.raises(ValueError, match="no prompts"):
        eng.generate([], 1)
