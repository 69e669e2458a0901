"""bf16 autocast with fp32 master weights, and gradient checkpointing, in the training forward.

- the lean head with ``matmul_dtype=torch.bfloat16`` equals a float64 computation from the
  bf16-rounded logits (the only rounding it does), its gradient is close to the float32 one;
- ``Policy(autocast_dtype=torch.bfloat16)``: the body's linear layers really run in bf16, the
  statistics stay close to float32 at bf16 tolerance, parameters / gradients / AdamW state are fp32;
- ``Policy(gradient_checkpointing=True)``: blocks are recomputed in the backward and the gradients
  equal the plain ones (float64).
"""

import pytest
import torch

from ratiorl.policy import Policy, lean_token_stats

from .test_length_buckets import grouped_batch


def rounded_logits(h, W, b, T):
    """What the bf16 head computes: bf16 inputs, one bf16 rounding of the product, then float64."""
    z = torch.mm((h / T).bfloat16(), W.bfloat16().T).double()
    return z + (b.double() / T if b is not None else 0.0)


def test_lean_head_bf16_matmul_equals_the_rounded_logits():
    g = torch.Generator().manual_seed(0)
    N, H, V, T = 37, 24, 300, 0.7
    h, hq = torch.randn(N, H, generator=g) * 2, torch.randn(N, H, generator=g) * 2
    W, b = torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    # one tile, so that the product is the same matmul call as below
    logp, ent, kl, ref_logp = lean_token_stats(
        h, W, y, bias=b, temperature=T, ref_hidden=hq, with_entropy=True, with_kl=True, return_ref_logp=True,
        vocab_chunk=V, token_chunk=N, matmul_dtype=torch.bfloat16)
    assert logp.dtype == torch.float32
    z, zq = rounded_logits(h, W, b, T), rounded_logits(hq, W, b, T)
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zq, -1)
    # the target logit is accumulated in float32 from the bf16 inputs (no rounding of the product)
    zt = ((h / T).bfloat16().double() * W.bfloat16().double()[y]).sum(-1) + b.double()[y] / T
    ztq = ((hq / T).bfloat16().double() * W.bfloat16().double()[y]).sum(-1) + b.double()[y] / T
    torch.testing.assert_close(logp.double(), zt - torch.logsumexp(z, -1), rtol=0, atol=2e-5)
    torch.testing.assert_close(ref_logp.double(), ztq - torch.logsumexp(zq, -1), rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), -(lp.exp() * lp).sum(-1), rtol=0, atol=2e-5)
    torch.testing.assert_close(kl.double(), (lp.exp() * (lp - lq)).sum(-1), rtol=0, atol=2e-5)


@pytest.mark.parametrize("chunks", [(300, 64), (64, 16)])
def test_lean_head_bf16_gradients_are_close_to_float32(chunks):
    g = torch.Generator().manual_seed(1)
    N, H, V, T = 40, 32, 300, 0.9
    h0, hq = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    W0, b0 = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g) * 0.1
    y = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(3, N, generator=g)
    out = {}
    for mm in (None, torch.bfloat16):
        h, W, b = (t.clone().requires_grad_(True) for t in (h0, W0, b0))
        lp, ent, kl = lean_token_stats(h, W, y, bias=b, temperature=T, ref_hidden=hq, ref_weight=W0 * 1.1,
                                       with_entropy=True, with_kl=True, vocab_chunk=chunks[0], token_chunk=chunks[1],
                                       matmul_dtype=mm)
        ((w[0] * lp).sum() + (w[1] * ent).sum() + (w[2] * kl).sum()).backward()
        out[mm] = (lp.detach(), h.grad, W.grad, b.grad)
    for name, a, c in zip(("logp", "h", "W", "b"), out[None], out[torch.bfloat16]):
        assert c.dtype == torch.float32
        rel = float((a - c).norm() / a.norm())
        assert rel < 2e-2, (name, rel)


def stats_and_grads(policy, batch):
    policy.model.zero_grad(set_to_none=True)
    st = policy.completion_stats(*batch, with_entropy=True, with_kl=True, with_ref_logp=True)
    (st.logp.sum() + 0.3 * st.entropy.sum() + st.token_kl.sum()).backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
    return st, grads


def lora_policy(path, seed=0, **kw):
    torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
    policy = Policy.from_pretrained(path, lora={"r": 4, "lora_alpha": 8, "target_modules": "auto"}, **kw)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return policy


def away_from_reference(policy):
    """A policy that differs from its reference: LoRA adapters are already nonzero; a full model
    loads its separate reference now, then its own weights move."""
    if not policy.is_lora:
        _ = policy.ref_model  # loaded now, before the policy moves
        with torch.no_grad():
            for p in policy.model.parameters():
                p.mul_(1.03)
    return policy


@pytest.mark.parametrize("arch,lora", [("gpt2", False), ("llama", True)])
def test_autocast_is_close_to_float32_and_keeps_fp32_masters(tiny_dir, llama_dir, arch, lora):
    path = tiny_dir if arch == "gpt2" else llama_dir
    build = (lambda **kw: lora_policy(path, **kw)) if lora else (lambda **kw: Policy.from_pretrained(path, **kw))
    batch = grouped_batch(P=4, G=4, Tp=6, Tc=12, V=100, seed=3)
    st32, g32 = stats_and_grads(away_from_reference(build(reference="auto")), batch)
    policy = away_from_reference(build(reference="auto", autocast_dtype=torch.bfloat16))
    linear_dtypes = []
    hooks = [m.register_forward_hook(lambda m, a, o: linear_dtypes.append(o.dtype))
             for m in policy.hf_model.modules() if type(m).__name__ in ("Linear", "Conv1D")]
    st16, g16 = stats_and_grads(policy, batch)
    for h in hooks:
        h.remove()
    assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16}  # autocast really ran the body in bf16
    m = batch[3].bool()
    for name in ("logp", "entropy", "token_kl", "ref_logp"):
        a, c = getattr(st32, name), getattr(st16, name)
        assert c.dtype == torch.float32
        d = (a - c).detach()[m].abs()
        assert float(d.max()) < 0.25 and float(d.mean()) < 0.03, name
    assert g32.keys() == g16.keys()
    flat32 = torch.cat([g32[n].flatten() for n in g32])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    assert float((flat32 - flat16).norm() / flat32.norm()) < 0.1
    # master weights, their gradients and the optimizer state stay fp32
    params = policy.trainable_parameters()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert all(t.dtype == torch.float32 for s in opt.state.values() for k, t in s.items() if k != "step")


@pytest.mark.parametrize("arch,lora", [("llama", True), ("gpt2", True), ("gpt2", False)])
def test_frozen_weights_keep_their_cast_and_give_the_same_numbers(tiny_dir, llama_dir, arch, lora, monkeypatch):
    """Under autocast the frozen matmul weights (LoRA base layers; a full model's separate
    reference) read a kept bf16 cast: the statistics and gradients are bitwise those of autocast
    casting them at every call, the same cast serves every call while the weight is unchanged,
    trainable weights, norms, embeddings and the output head are left alone, and the modules get
    their own weights back after the region, also when it raises."""
    import contextlib

    from ratiorl.policy import scoring
    from ratiorl.policy.lora import is_linear

    path = llama_dir if arch == "llama" else tiny_dir
    build = (lambda **kw: lora_policy(path, **kw)) if lora else (lambda **kw: Policy.from_pretrained(path, **kw))
    batch = grouped_batch(P=4, G=4, Tp=6, Tc=12, V=100, seed=5)
    policy = away_from_reference(build(reference="auto", autocast_dtype=torch.bfloat16))
    models = [policy.hf_model] + ([policy.ref_model] if policy.ref_model is not None else [])
    before = {id(m): m._parameters.get("weight") for model in models for m in model.modules()}
    kept, seen = stats_and_grads(policy, batch), []

    real = scoring.frozen_matmul_weights

    @contextlib.contextmanager
    def watch(ms, dtype):
        with real(ms, dtype):
            seen.append({id(m): m._parameters.get("weight") for model in ms for m in model.modules()})
            yield

    monkeypatch.setattr(scoring, "frozen_matmul_weights", watch)
    again = stats_and_grads(policy, batch)
    stats_and_grads(policy, batch)
    monkeypatch.setattr(scoring, "frozen_matmul_weights", lambda ms, dtype: contextlib.nullcontext())
    plain = stats_and_grads(policy, batch)
    for st, grads in (kept, again):
        for name in ("logp", "entropy", "token_kl", "ref_logp"):
            assert torch.equal(getattr(st, name), getattr(plain[0], name)), name
        assert grads.keys() == plain[1].keys()
        assert all(torch.equal(grads[n], plain[1][n]) for n in grads)
    inside = seen[0]
    changed = {k for k, w in inside.items() if w is not before[k]}
    assert changed and all(inside[k].dtype == torch.bfloat16 and not inside[k].requires_grad for k in changed)
    modules = {id(m): m for model in models for m in model.modules()}
    heads = [model.get_output_embeddings() for model in models]
    for k in changed:
        assert is_linear(modules[k]) and all(modules[k] is not h for h in heads)
        assert not before[k].requires_grad
    frozen_matmuls = {k for k, m in modules.items() if is_linear(m) and all(m is not h for h in heads)
                      and before[k] is not None and not before[k].requires_grad}
    assert changed == frozen_matmuls
    assert all(seen[1][k].data_ptr() == inside[k].data_ptr() for k in changed)  # the same kept cast
    after = {id(m): m._parameters.get("weight") for model in models for m in model.modules()}
    assert all(after[k] is before[k] for k in before)
    with pytest.raises(RuntimeError, match="inside"):
        with real(models, torch.bfloat16):
            raise RuntimeError("inside")
    assert all(m._parameters.get("weight") is before[k] for k, m in modules.items())


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("arch,lora,share", [("gpt2", False, True), ("gpt2", True, False), ("llama", True, True)])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, llama_dir, arch, lora, share):
    path = tiny_dir if arch == "gpt2" else llama_dir
    kw = {"reference": "auto", "dtype": torch.float64, "share_prompts": share}
    build = (lambda **k: lora_policy(path, **k)) if lora else (lambda **k: Policy.from_pretrained(path, **k))
    batch = grouped_batch(P=3, G=4, Tp=5, Tc=9, V=100, seed=5)
    # checkpointing turns the KV cache off, so the checkpointed forward is the unshared one; the
    # plain one is unshared too (Llama's RoPE tables are float32, so the two paths differ by ~1e-7)
    plain = away_from_reference(build(**{**kw, "share_prompts": False}))
    policy = away_from_reference(build(gradient_checkpointing=True, **kw))
    plain.model.train(False)
    policy.model.train(False)  # as the trainer leaves it: checkpointing must still apply
    blocks = [m for m in policy.hf_model.modules() if type(m).__name__ in ("GPT2Block", "LlamaDecoderLayer")]
    runs = []
    # the block's MLP: a checkpointed block's recompute calls it again in the backward
    hook = blocks[0].mlp.register_forward_pre_hook(lambda m, a: runs.append(torch.is_grad_enabled()))
    st0, g0 = stats_and_grads(plain, batch)
    st1, g1 = stats_and_grads(policy, batch)
    hook.remove()
    # forward with gradients + the recompute in the backward (+ the reference's no-grad forward)
    assert runs.count(True) == 2
    assert not policy.hf_model.training  # the mode is restored
    for name in ("logp", "entropy", "token_kl", "ref_logp"):
        torch.testing.assert_close(getattr(st1, name), getattr(st0, name), rtol=1e-10, atol=1e-12)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- attention on CPU


def reference_attention(q, k, v, allowed, scale):
    """float64 softmax(q k^T scale) v over the allowed (query, key) pairs; k, v repeated to q's heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf")).where(allowed.any(-1, keepdim=True), 0.0)  # no NaN: rows with no key
    return (torch.softmax(s, -1) @ v).transpose(1, 2)  # (B, T, H, D)


def attention_case(S, mask_kind, seed=0):
    """q (2, 4, T, 8) over S keys with 2 key/value heads; the mask transformers would pass for it, and
    which (query, key) pairs it allows."""
    g = torch.Generator().manual_seed(seed)
    B, H, KV, T, D = 2, 4, 2, S, 8
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, S, D, generator=g), torch.randn(B, KV, S, D, generator=g)
    causal = torch.ones(T, S, dtype=torch.bool).tril()
    if mask_kind == "causal":  # no mask: sdpa's is_causal
        return q, k, v, None, causal.expand(B, 1, T, S)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, :3] = True  # row 1 is left-padded by three tokens
    allowed = causal & ~pad[:, None, None, :]
    if mask_kind == "bool":
        return q, k, v, allowed, allowed
    if mask_kind == "per head":  # odd heads do not see key 1 (from query 2 on)
        heads = allowed.expand(B, H, T, S).clone()
        heads[:, 1::2, 2:, 1] = False
        return q, k, v, heads, heads
    return q, k, v, torch.zeros(B, 1, T, S).masked_fill(~allowed, torch.finfo(torch.float32).min), allowed


class Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive", "per head"])
@pytest.mark.parametrize("S", [12, 200], ids=["plain", "flash"])  # 200 keys: above the float32 plain limit
def test_cpu_attention_float32_equals_float64(S, mask_kind):
    from ratiorl.policy.models import MATH_ATTENTION_MAX_KEYS, cpu_attention

    assert (S <= MATH_ATTENTION_MAX_KEYS[torch.float32]) == (S == 12)
    q0, k0, v0, mask, allowed = attention_case(S, mask_kind)
    q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
    out, weights = cpu_attention(Attn(), q, k, v, mask, scaling=0.3, dropout=0.0)
    assert weights is None and out.dtype == torch.float32 and out.shape == (2, S, 4, 8)
    valid = allowed.expand(2, 4, S, S).any(-1).transpose(1, 2)[..., None].expand_as(out)  # queries that see a key
    qd, kd, vd = (x.double().requires_grad_(True) for x in (q0, k0, v0))
    ref = reference_attention(qd, kd, vd, allowed, 0.3)
    torch.testing.assert_close(out[valid].double(), ref[valid], rtol=0, atol=2e-6)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)) * valid
    (out * w).sum().backward()
    (ref * w.double()).sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=2e-5)


@pytest.mark.parametrize("S", [12, 200], ids=["plain", "flash"])
def test_cpu_attention_keeps_float64(S):
    from ratiorl.policy.models import cpu_attention

    q, k, v, mask, allowed = attention_case(S, "bool", seed=2)
    q, k, v = (x.double() for x in (q, k, v))
    out, _ = cpu_attention(Attn(), q, k, v, mask, scaling=0.3)
    assert out.dtype == torch.float64
    valid = allowed.any(-1)[:, 0][:, :, None, None].expand_as(out)
    torch.testing.assert_close(out[valid], reference_attention(q, k, v, allowed, 0.3)[valid], rtol=0, atol=1e-12)


@pytest.mark.parametrize("how", ["autocast", "bf16 inputs"])
@pytest.mark.parametrize("S", [12, 300], ids=["plain", "flash"])  # 300 keys: above the bf16 plain limit
def test_cpu_attention_in_bf16(how, S, monkeypatch):
    """Up to the limit the matmuls run in bf16 (the probabilities are rounded to bf16 once); above it
    float32 flash attention. Under autocast the output stays in the compute dtype, otherwise it has
    the inputs' dtype."""
    from ratiorl.policy.models import MATH_ATTENTION_MAX_KEYS, cpu_attention

    assert (S <= MATH_ATTENTION_MAX_KEYS[torch.bfloat16]) == (S == 12)
    q, k, v, mask, allowed = attention_case(S, "bool", seed=1)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        seen.append(tuple(x.dtype for x in a[:3]))
        return sdpa(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    if how == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = cpu_attention(Attn(), q, k, v, mask, scaling=0.3)
        assert out.dtype == (torch.bfloat16 if S == 12 else torch.float32)
    else:
        q, k, v = (x.bfloat16() for x in (q, k, v))
        out, _ = cpu_attention(Attn(), q, k, v, mask, scaling=0.3)
        assert out.dtype == torch.bfloat16
    assert seen == ([] if S == 12 else [(torch.float32,) * 3])
    valid = allowed.any(-1)[:, 0][:, :, None, None].expand_as(out)
    ref = reference_attention(q, k, v, allowed, 0.3)
    err = (out.double() - ref)[valid].abs().max()
    assert err < 0.03  # bf16 rounding of the inputs, the scores, the probabilities and the output
    if S == 12:  # the plain form really runs its matmuls in bf16: not the float32 result
        exact = reference_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), allowed, 0.3)
        assert (out.double() - exact)[valid].abs().max() > 1e-4


@pytest.mark.parametrize("kw", [{}, {"autocast_dtype": torch.bfloat16}, {"dtype": torch.bfloat16}],
                         ids=["float32", "autocast", "bf16"])
def test_policy_uses_cpu_attention(llama_dir, tmp_path, kw):
    from ratiorl.policy.models import CPU_ATTENTION

    policy = lora_policy(llama_dir, reference="auto", **kw)
    assert policy.hf_model.config._attn_implementation == CPU_ATTENTION
    batch = grouped_batch(P=2, G=3, Tp=5, Tc=6, V=100, seed=0)
    st = policy.completion_stats(*batch, with_kl=True)  # the policy and its adapter reference
    assert torch.isfinite(st.logp).all() and torch.isfinite(st.token_kl).all()
    # against transformers' own sdpa: the same up to float32 rounding, or bf16's
    policy.hf_model.config._attn_implementation = "sdpa"
    plain = policy.completion_stats(*batch, with_kl=True)
    m = batch[3].bool()
    assert float((st.logp - plain.logp).detach()[m].abs().max()) < (1e-5 if not kw else 0.1)
    # the name is not saved: the saved model loads with plain sdpa
    policy.hf_model.config._attn_implementation = CPU_ATTENTION
    policy.save_pretrained(tmp_path / "saved", merged=True)
    assert "ratiorl" not in (tmp_path / "saved" / "config.json").read_text()
