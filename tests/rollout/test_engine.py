"""HFRolloutEngine: layout, EOS handling, log-probs vs Policy and vs the truncated distribution,
reproducibility, top-k / top-p, weight sync, a bf16 sampler, snapshots."""

import copy
import math

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


def truncated_reference(policy, b, temperature, top_k, top_p):
    """log q(y_t) of the distribution a top-k / top-p sampler draws from, position by position in
    float64 with plain Python: the top_k most likely tokens, then the smallest prefix of their
    renormalised distribution whose mass reaches top_p, renormalised."""
    from tests.policy.helpers import full_logits

    with torch.no_grad():
        logits = full_logits(policy.model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    probs = torch.softmax(logits.double() / temperature, -1)
    out = torch.zeros(b.completion_ids.shape, dtype=torch.float64)
    for i in range(probs.shape[0]):
        for t in range(int(b.completion_mask[i].sum())):
            p = probs[i, t].tolist()
            order = sorted(range(len(p)), key=lambda v: -p[v])
            keep = order[:top_k] if top_k > 0 else order
            z = sum(p[v] for v in keep)
            nucleus, mass = [], 0.0
            for v in keep:
                if mass >= top_p:
                    break
                nucleus.append(v)
                mass += p[v] / z
            y = int(b.completion_ids[i, t])
            assert y in nucleus, "a token outside the truncated support was sampled"
            out[i, t] = math.log(p[y] / sum(p[v] for v in nucleus))
    return out


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.3, 0.8, 0), (1.0, 1.0, 5),
                                                     (0.9, 0.85, 6)])
def test_behaviour_logp_is_the_sampled_distribution(eos_model_dir, temperature, top_p, top_k):
    policy, eng = engine_for(eos_model_dir, temperature=temperature)
    b = eng.generate(PROMPTS, 4, max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k,
                     generator=torch.Generator().manual_seed(int(temperature * 10)))
    s = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    mask = b.completion_mask.bool()
    if top_p == 1.0 and top_k == 0:  # no truncation: mu is the policy's tempered distribution
        torch.testing.assert_close(s.logp.detach(), b.behaviour_logp, rtol=1e-4, atol=1e-4)
        return
    ref = truncated_reference(policy, b, temperature, top_k, top_p)
    torch.testing.assert_close(b.behaviour_logp.double(), ref, rtol=1e-4, atol=1e-4)
    # the renormalised log-prob is above the full one wherever mass was cut: a measurable mismatch
    gap = (b.behaviour_logp - s.logp.detach())[mask]
    assert (gap >= -1e-4).all() and gap.max() > 1e-2


def test_truncated_logp_edge_cases():
    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]]), -1)
    assert HFRolloutEngine.truncated_logp(logp, 0, 1.0) is logp  # nothing truncated
    assert HFRolloutEngine.truncated_logp(logp, 4, 1.0) is logp  # top_k >= vocabulary
    one = HFRolloutEngine.truncated_logp(logp, 1, 1.0)
    assert one[0, 0] == 0 and torch.isinf(one[0, 1:]).all()
    two = HFRolloutEngine.truncated_logp(logp, 2, 1.0)
    p = logp[0].exp()
    torch.testing.assert_close(two[0, :2].exp(), p[:2] / p[:2].sum())
    # top_p = 0.5 on the uniform row keeps two of the four tokens (mass 0.25 before the third = 0.5)
    half = HFRolloutEngine.truncated_logp(logp, 0, 0.5)
    assert torch.isfinite(half[1]).sum() == 2
    torch.testing.assert_close(half[1][torch.isfinite(half[1])].exp(), torch.full((2,), 0.5))


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
    # the logged log-prob is that of the distribution drawn from: one token renormalised to 1
    assert (tiny_p.behaviour_logp == 0).all()
    assert (greedy.behaviour_logp[greedy.completion_mask.bool()] < -1e-3).any()  # the full softmax's is not
    top1 = gen(top_k=1)
    assert torch.equal(top1.completion_ids, greedy.completion_ids.repeat_interleave(8, 0))
    assert (top1.behaviour_logp == 0).all()
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
    with pytest.raises(ValueError, match="top_k"):
        eng.generate(PROMPTS, 1, top_k=-1)
    with pytest.raises(ValueError, match="list"):
        eng.generate("12+3=", 1)
    with pytest.raises(ValueError, match="no prompts"):
        eng.generate([], 1)


def test_bf16_sampler_is_a_measurable_mismatch(eos_model_dir):
    """A bf16 copy of an fp32 policy samples; its log-probs differ from the policy's by rounding only."""
    policy = Policy.from_pretrained(eos_model_dir, reference="none", temperature=0.9)
    eng = HFRolloutEngine(copy.deepcopy(policy.model).to(torch.bfloat16), policy.tokenizer)
    b = eng.generate(PROMPTS, 4, max_new_tokens=8, temperature=0.9, generator=torch.Generator().manual_seed(0))
    assert b.behaviour_logp.dtype == torch.float32
    s = policy.completion_stats(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    gap = (b.behaviour_logp - s.logp.detach())[b.completion_mask.bool()].abs()
    assert gap.mean() > 1e-4 and gap.max() < 0.2


def test_snapshot_is_a_frozen_copy_in_the_sampler_dtype(eos_model_dir):
    policy = Policy.from_pretrained(eos_model_dir, reference="none")
    eng = HFRolloutEngine(copy.deepcopy(policy.model).to(torch.bfloat16), policy.tokenizer)
    snap = eng.snapshot(policy.model)
    assert all(v.dtype == torch.bfloat16 for v in snap.values() if v.is_floating_point())
    cast_before = {k: v.to(torch.bfloat16) for k, v in policy.model.state_dict().items()}
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.1)
    assert all(torch.equal(snap[k], cast_before[k]) for k in snap)  # later updates do not reach it
    eng.load_snapshot(snap)
    assert all(torch.equal(eng.model.state_dict()[k], cast_before[k]) for k in snap)
    eng.load_weights(policy.model)  # a sync casts the new fp32 weights
    for k, v in policy.model.state_dict().items():
        assert torch.equal(eng.model.state_dict()[k], v.to(torch.bfloat16)), k


def test_prefill_gives_the_output_head_a_contiguous_input(eos_model_dir):
    """transformers applies the head to hidden_states[:, -1:, :] (a strided view, which torch's CPU
    matmul handles by copying the weight per row); the prefill makes it contiguous, and only then."""
    from ratiorl.policy import position_ids_from_mask

    policy, eng = engine_for(eos_model_dir)
    head = policy.model.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    eng.generate(PROMPTS, 2, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert seen[0] == ((len(PROMPTS), 1, head.in_features), True)  # the prefill's last positions
    assert not head._forward_pre_hooks  # the head is as before after the call
    enc = eng.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    seen.clear()
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    with torch.no_grad():
        out = HFRolloutEngine._prefill(policy.model, ids, mask, 1)
        plain = policy.model(**kw, logits_to_keep=1).logits  # transformers' own: a strided view
        ref = policy.model(**kw).logits  # every position
    hook.remove()
    assert [c for _s, c in seen] == [True, False, True]
    torch.testing.assert_close(out.logits[:, -1], ref[:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits[:, -1], plain[:, -1], rtol=0, atol=1e-5)
