"""Length buckets in the training forward: no padding computed, the same numbers.

``length_buckets`` picks at most k contiguous groups of length-sorted rows by a cost model (rows x
longest completion + a per-bucket overhead); ``completion_stats`` runs each bucket trimmed to its
longest completion and puts the states back in row order. Checked against a brute-force search
of the split, and against the one-bucket forward (values and gradients, float64 models, shared
and unshared prompts, LoRA, separate and adapter references).
"""

import itertools

import pytest
import torch

from ratiorl.policy import Policy
from ratiorl.policy.forward import (
    backbone,
    bucket_overhead_tokens,
    completion_lengths,
    length_buckets,
)

# ----------------------------------------------------------------------------- the split


def split_cost(lengths, buckets, overhead):
    return sum(len(rows) * width + overhead for rows, width in buckets)


def brute_force_cost(lengths, k, overhead):
    """Least cost over every split of the sorted nonzero lengths into <= k contiguous runs."""
    L = sorted(x for x in lengths if x > 0)
    best = max(L) * len(L) + overhead
    for n_cuts in range(1, k):
        for cuts in itertools.combinations(range(1, len(L)), n_cuts):
            bounds = (0, *cuts, len(L))
            cost = sum((b - a) * L[b - 1] + overhead for a, b in itertools.pairwise(bounds))
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_split_is_the_least_cost_split(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 40, (11,), generator=g)
    for k, overhead in ((2, 5.0), (3, 20.0), (4, 0.0)):
        buckets = length_buckets(lengths, k, overhead)
        assert len(buckets) <= k
        if buckets[0].rows is None:  # one bucket of every row
            cost = int((lengths > 0).sum()) * int(lengths.max()) + overhead
        else:
            cost = split_cost(lengths, buckets, overhead)
            rows = torch.cat([b.rows for b in buckets])
            # every row with tokens exactly once, rows without tokens in no bucket
            assert sorted(rows.tolist()) == [i for i in range(len(lengths)) if lengths[i] > 0]
            for rows, width in buckets:
                assert width == int(lengths[rows].max())
        assert cost == pytest.approx(brute_force_cost(lengths.tolist(), k, overhead))


def test_tiny_batches_keep_one_bucket(tiny_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    def overhead(n_embd):
        return bucket_overhead_tokens(GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=1, n_head=4, vocab_size=8)))

    assert overhead(128) == 1024 and overhead(64) == 4096 and overhead(256) == 256
    assert overhead(384) == pytest.approx(256 * (2 / 3) ** 4) and overhead(1024) == 1.0  # on CPU
    assert Policy.from_pretrained(tiny_dir, reference="none").bucket_overhead_tokens == overhead(32)
    g = torch.Generator().manual_seed(0)
    # the small benchmark (H = 128): 128 rows of at most 8 tokens; the examples (H = 64): 256 rows
    # of at most 5; whatever the lengths, a split saves fewer token positions than it costs
    for B, T, H in ((128, 8, 128), (256, 5, 64)):
        worst = torch.tensor([1] * (B - 1) + [T])
        for lengths in [worst] + [torch.randint(1, T + 1, (B,), generator=g) for _ in range(5)]:
            assert length_buckets(lengths, 4, overhead(H)) == [(None, int(lengths.max()))]
    assert length_buckets(torch.tensor([1, 500, 2, 3]), 1) == [(None, 500)]  # 1 = off


def test_long_and_short_rows_split():
    lengths = torch.tensor([200] * 32 + [20] * 32 + [100] * 32)
    buckets = length_buckets(lengths, 4)
    assert [(sorted(r.tolist()), w) for r, w in buckets] == [
        (list(range(32, 64)), 20), (list(range(64, 96)), 100), (list(range(32)), 200)]
    two = length_buckets(lengths, 2)
    assert len(two) == 2 and two[1].width == 200


def test_many_distinct_lengths_split_at_quantiles():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 2000, (3000,), generator=g)  # > MAX_SPLIT_POINTS distinct lengths
    buckets = length_buckets(lengths, 4, 256)
    assert len(buckets) == 4
    rows = torch.cat([b.rows for b in buckets])
    assert sorted(rows.tolist()) == (lengths > 0).nonzero().squeeze(1).tolist()
    assert all(w == int(lengths[r].max()) for r, w in buckets)
    one = int((lengths > 0).sum()) * int(lengths.max())
    assert split_cost(lengths, buckets, 256) < 0.7 * one  # uniform lengths: 4 buckets save ~1/3


def test_completion_lengths_use_the_last_real_token():
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    assert completion_lengths(m).tolist() == [2, 0, 4, 3]


# ----------------------------------------------------------------------------- the forward


def grouped_batch(P, G, Tp, Tc, V, seed):
    """P prompts of different lengths, G completions each of uneven lengths (one empty, one of a
    single token, one full), as the sampler lays them out."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, Tp + 1, (P,), generator=g)
    plen[0] = Tp
    pm = (torch.arange(Tp)[None] >= Tp - plen[:, None]).long()
    pids = torch.randint(4, V, (P, Tp), generator=g) * pm
    pids, pm = pids.repeat_interleave(G, 0), pm.repeat_interleave(G, 0)
    clen = torch.randint(1, Tc + 1, (P * G,), generator=g)
    clen[0], clen[1], clen[2] = Tc, 0, 1
    clen[G:2 * G] = torch.randint(1, 3, (G,), generator=g)  # a short group
    cm = (torch.arange(Tc)[None] < clen[:, None]).long()
    cids = torch.randint(4, V, (P * G, Tc), generator=g) * cm
    return pids, pm, cids, cm


def stats_and_grads(policy, batch, buckets, with_kl):
    policy.length_buckets, policy.bucket_overhead_tokens = buckets, 0.0
    policy.model.zero_grad(set_to_none=True)
    st = policy.completion_stats(*batch, with_entropy=True, with_kl=with_kl, with_ref_logp=with_kl)
    w = torch.linspace(0.5, 1.5, st.logp.numel(), dtype=st.logp.dtype).view_as(st.logp)
    loss = (st.logp * w).sum() + 0.3 * st.entropy.sum()
    if with_kl:
        loss = loss + st.token_kl.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return st, grads


def body_input_widths(policy):
    """Record the (rows, columns) of every call into the transformer body."""
    calls = []
    hook = backbone(policy.hf_model).register_forward_pre_hook(
        lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    return calls, hook


CASES = [  # (model, lora, share_prompts, with_kl)
    ("gpt2", None, True, True),
    ("gpt2", None, False, True),
    ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}, True, True),
    ("llama", None, True, False),
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}, False, True),
]


@pytest.mark.parametrize("arch,lora,share,with_kl", CASES)
def test_buckets_equal_the_one_bucket_forward(tiny_dir, llama_dir, arch, lora, share, with_kl):
    path = tiny_dir if arch == "gpt2" else llama_dir
    policy = Policy.from_pretrained(path, lora=lora, reference="auto" if with_kl else "none",
                                    dtype=torch.float64, share_prompts=share, temperature=0.9)
    if lora is not None:  # adapters start at zero: move them so the policy differs from its reference
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    elif with_kl:
        _ = policy.ref_model  # the separate reference: load it now, then move the policy away from it
        with torch.no_grad():
            for p in policy.model.parameters():
                p.mul_(1.05)
    batch = grouped_batch(P=4, G=4, Tp=6, Tc=12, V=100, seed=3)
    assert len(length_buckets(completion_lengths(batch[3]), 3, 0.0)) == 3

    calls, hook = body_input_widths(policy)
    st1, g1 = stats_and_grads(policy, batch, 1, with_kl)
    n_one = len(calls)
    st3, g3 = stats_and_grads(policy, batch, 3, with_kl)
    hook.remove()
    # the policy's pass (and the adapter reference's, the same model with adapters disabled)
    per_pass = 4 if share else 3
    n_pass = 2 if (lora is not None and with_kl) else 1
    bucket_calls = calls[n_one:]
    assert len(bucket_calls) == n_pass * per_pass and bucket_calls[:per_pass] * n_pass == bucket_calls
    bucket_calls = bucket_calls[:per_pass]
    if share:  # one prompt pass over the 4 distinct prompts, then one completion pass per bucket
        assert bucket_calls[0] == (4, 6)
        bucket_calls = bucket_calls[1:]
    assert sum(r for r, _ in bucket_calls) == 15  # the empty row runs nowhere
    if share:  # no completion column past a bucket's longest row is computed
        expected = sorted(b.width - 1 for b in length_buckets(completion_lengths(batch[3]), 3, 0.0))
        assert sorted(c for _, c in bucket_calls) == expected

    names = ("logp", "entropy") + (("token_kl", "ref_logp") if with_kl else ())
    for name in names:
        torch.testing.assert_close(getattr(st3, name), getattr(st1, name), rtol=1e-10, atol=1e-12)
    assert (st1.logp[batch[3] == 0] == 0).all() and (st3.logp[batch[3] == 0] == 0).all()
    assert g1.keys() == g3.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g3[n], g1[n], rtol=1e-9, atol=1e-11)


def test_buckets_without_gradients_match(tiny_dir):
    """The no-grad forwards (old log-probs, the reference) take the same buckets."""
    policy = Policy.from_pretrained(tiny_dir, reference="none", dtype=torch.float64)
    batch = grouped_batch(P=3, G=5, Tp=5, Tc=10, V=100, seed=7)
    with torch.no_grad():
        policy.length_buckets = 1
        one = policy.completion_stats(*batch).logp
        policy.length_buckets, policy.bucket_overhead_tokens = 4, 0.0
        four = policy.completion_stats(*batch).logp
    torch.testing.assert_close(four, one, rtol=1e-10, atol=1e-12)


def test_policy_rejects_zero_buckets(tiny_dir):
    with pytest.raises(ValueError, match="length_buckets"):
        Policy.from_pretrained(tiny_dir, reference="none", length_buckets=0)


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}])
def test_reference_logp_alone_skips_the_policy_forward(tiny_dir, lora):
    policy = Policy.from_pretrained(tiny_dir, lora=lora, reference="auto", dtype=torch.float64)
    with torch.no_grad():  # move the policy away from its reference
        for n, p in policy.model.named_parameters():
            if lora is None or "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    batch = grouped_batch(P=3, G=4, Tp=5, Tc=9, V=100, seed=4)
    with torch.no_grad():
        both = policy.completion_stats(*batch, with_ref_logp=True)
    # policy forwards: the body of the policy model itself, or (LoRA) any call of an adapter
    if lora is None:
        watched = [backbone(policy.hf_model)]
    else:
        watched = [m for n, m in policy.model.named_modules() if n.endswith("lora_A.default")]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append(m)) for m in watched]
    alone = policy.reference_logp(*batch)
    for h in hooks:
        h.remove()
    assert calls == []
    assert not alone.requires_grad and alone.dtype == torch.float32
    torch.testing.assert_close(alone, both.ref_logp, rtol=0, atol=0)
    assert not torch.allclose(both.logp, both.ref_logp)  # the policy differs from its reference
    with pytest.raises(ValueError, match="reference='none'"):
        Policy.from_pretrained(tiny_dir, reference="none").reference_logp(*batch)
